"""GOT's overhead in a real training step: one TRADES PGD-10 step of the MNIST SmallCNN.

    .venv/bin/python benchmarks/bench_overhead.py --threads 1           # B = 128 and 512
    .venv/bin/python benchmarks/bench_overhead.py --quick --out /tmp/o  # < 1 minute smoke run

The step is TRADES' (attack in eval mode from x + 0.001·randn maximising KL, 10 sign steps of 0.01
within ε = 0.3; then train mode, CE(clean) + 6·KL(adv‖clean), backward, SGD step), with and without
the GOT line (β = 10, θ = 0.1, layer classifier.4). The network is first trained briefly on clean MNIST
(``--pretrain-steps``, Adam) so that its features, and so the transport problem, look like those of a
real run (an untrained network maps every input to nearly the same features, which Sinkhorn solves in
a handful of iterations); the timed steps then use lr = 0 on MNIST test images. Without the MNIST files
(``--data-dir``) random 28×28 inputs are used, and the output says so.

Variants run interleaved in one process (A B C … A B C …). The overhead is the median over rounds of
(variant step / plain step of the same round) − 1, with the interquartile range of those ratios: pairing
within a round cancels the drift of a shared machine. The time of the got(...) call itself (cost +
solve, forward only) is taken inside each step as well (the extra backward through the cost matrix is
not in it).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import load, machine, set_threads, sync  # noqa: E402

from got_reg import GOTConvergenceWarning, GOTRegularizer  # noqa: E402

VARIANTS = {
    "TRADES": None,
    "+GOT-S torch": dict(solver="sinkhorn", backend="torch"),
    "+GOT-LM torch": dict(solver="sinkhorn", backend="torch", label_matching=True),
    "+GOT-S pot": dict(solver="sinkhorn", backend="pot"),
    "+GOT-S geomloss": dict(solver="sinkhorn", backend="geomloss"),
    "+GOT-S dual": dict(solver="dual"),
}


def get_model(device):
    """examples.models' SmallCNN (TRADES' MNIST network) if present, else a local copy of it."""
    try:
        from examples.models import build_model, default_layer

        return build_model("smallcnn", 10, in_channels=1, image_size=28).to(device), default_layer("smallcnn")
    except ImportError:
        from torch import nn

        feat = nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(32, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.ReLU(), nn.MaxPool2d(2))
        cls = nn.Sequential(nn.Linear(64 * 4 * 4, 200), nn.ReLU(), nn.Dropout(0.5), nn.Linear(200, 200), nn.ReLU(),
                            nn.Linear(200, 10))
        return nn.Sequential(feat, nn.Flatten(), cls).to(device), "2.4"


def trades_attack(model, x, epsilon=0.3, step_size=0.01, steps=10):
    try:
        from examples.attacks import trades_kl_attack

        return trades_kl_attack(model, x, epsilon, step_size, steps)
    except ImportError:
        was = model.training
        model.eval()
        with torch.no_grad():
            p = F.softmax(model(x), 1)
        xa = x + 0.001 * torch.randn_like(x)
        for _ in range(steps):
            xa.requires_grad_(True)
            g, = torch.autograd.grad(F.kl_div(F.log_softmax(model(xa), 1), p, reduction="sum"), [xa])
            xa = torch.min(torch.max(xa.detach() + step_size * g.sign(), x - epsilon), x + epsilon).clamp(0, 1)
        model.train(was)
        return xa.detach()


def mnist_or_random(data_dir):
    """MNIST tensors from the examples' loader, or random images of the same shape when they are missing."""
    try:
        from examples.data import load_mnist_tensors

        return "MNIST", load_mnist_tensors(data_dir)
    except (ImportError, FileNotFoundError) as e:
        print(f"no MNIST ({e}); timing on random 28×28 inputs", flush=True)
        g = torch.Generator().manual_seed(0)
        x, y = torch.rand(2048, 1, 28, 28, generator=g), torch.randint(0, 10, (2048,), generator=g)
        return "random", (x, y, x, y)


def pretrain(model, x, y, steps, device, batch=128):
    """Clean cross-entropy steps, so that the features separate the classes as in a real run."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x[idx].to(device)), y[idx].to(device)).backward()
        opt.step()


def quartiles(v):
    q = statistics.quantiles(v, n=4) if len(v) > 1 else [v[0]] * 3
    return q[0], q[2]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--batch", type=int, nargs="+", default=[128, 512])
    p.add_argument("--rounds", type=int, nargs="+", default=[21, 7], help="interleaved rounds per batch size")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--out", default="benchmarks/results/overhead_cpu")
    p.add_argument("--data-dir", default=None, help="MNIST idx files (default: ../shared/data/mnist)")
    p.add_argument("--pretrain-steps", type=int, default=300, help="clean Adam steps (B = 128) before timing")
    a = p.parse_args(argv)
    if a.quick:
        a.batch, a.rounds, a.threads, a.pretrain_steps = [16], [1], a.threads or 1, 5
        a.variants = ["TRADES", "+GOT-S torch", "+GOT-S dual"]
    if "TRADES" not in a.variants:
        a.variants.insert(0, "TRADES")
    set_threads(a.threads)
    warnings.simplefilter("ignore", GOTConvergenceWarning)
    warnings.filterwarnings("ignore", message="Sinkhorn did not converge")
    device = torch.device(a.device)
    load_before, t0 = load(), time.time()
    data_name, (x_train, y_train, x_test, y_test) = mnist_or_random(a.data_dir)
    torch.manual_seed(0)
    model, layer = get_model(device)
    pretrain(model, x_train, y_train, a.pretrain_steps, device)
    results = []
    for B, rounds in zip(a.batch, a.rounds + a.rounds[-1:] * len(a.batch)):
        # lr = 0: the step does all its work but the weights stay put, so every variant times the same model.
        opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
        x, y = x_test[:B].to(device), y_test[:B].to(device)
        regs = {n: GOTRegularizer(model, layer, **VARIANTS[n]) if VARIANTS[n] else None for n in a.variants}

        def step(got):
            model.train()
            x_adv = trades_attack(model, x)
            opt.zero_grad()
            lc, la = model(x), model(x_adv)
            loss = F.cross_entropy(lc, y) + 6.0 * F.kl_div(F.log_softmax(la, 1), F.softmax(lc, 1), reduction="batchmean")
            t_got = 0.0
            if got is not None:
                sync(device)
                t = time.perf_counter()
                loss = loss + got(lc, la, y)
                sync(device)
                t_got = time.perf_counter() - t
            loss.backward()
            opt.step()
            return t_got

        times = {n: [] for n in a.variants}
        got_times = {n: [] for n in a.variants}
        iters = {n: [] for n in a.variants}
        for n, g in regs.items():  # warm-up (lazy dual potential, allocator)
            step(g)
        for _ in range(rounds):
            for n, g in regs.items():
                sync(device)
                t = time.perf_counter()
                got_times[n].append(step(g))
                sync(device)
                times[n].append(time.perf_counter() - t)
                if g is not None:
                    iters[n].append(g.diagnostics.get("iterations"))
        base = statistics.median(times["TRADES"])
        for n in a.variants:
            ratios = [t / b for t, b in zip(times[n], times["TRADES"])]  # paired within each round
            q1, q3 = quartiles(ratios)
            gt = statistics.median(got_times[n])
            results.append(dict(B=B, variant=n, rounds=rounds, data=data_name, ms=1e3 * statistics.median(times[n]),
                                ms_min=1e3 * min(times[n]), overhead_pct=100 * (statistics.median(ratios) - 1),
                                overhead_q1_pct=100 * (q1 - 1), overhead_q3_pct=100 * (q3 - 1), got_call_ms=1e3 * gt,
                                got_call_pct=100 * gt / base, iterations=statistics.median(iters[n]) if iters[n] else None))
            print(json.dumps(results[-1]), flush=True)
        for g in regs.values():
            if g is not None:
                g.remove()
        write(a, results, load_before, t0)  # after every batch size: a long run leaves its results early


def write(a, results, load_before, t0):
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = dict(machine=machine(), load_before=load_before, load_after=load(), minutes=(time.time() - t0) / 60)
    out.with_suffix(".json").write_text(json.dumps({"env": env, "machine": env["machine"], "rows": results}, indent=1))
    lines = [f"# GOT overhead in a TRADES PGD-10 step (SmallCNN, 28×28, β = 10, θ = 0.1)\n",
             f"Machine: {env['machine']}; {env['load_before']} at the start, {env['load_after']} at the end "
             f"(shared machine), {env['minutes']:.0f} min. Network trained for {a.pretrain_steps} clean steps first; "
             f"timed on {results[0]['data'] if results else '?'} batches with lr = 0. Variants interleaved. "
             f"'overhead' = median over rounds of (variant step / plain TRADES step of the same round) − 1, with "
             f"the interquartile range of those ratios; 'got() call' = median time of the "
             f"got(logits_clean, logits_adv, y) line itself (cost + solve, forward) as a share of the TRADES step.\n",
             "| B | variant | rounds | ms / step (median) | min ms | overhead | IQR | got() call ms | got() call share | iterations |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['B']} | {r['variant']} | {r['rounds']} | {r['ms']:.1f} | {r['ms_min']:.1f} | {r['overhead_pct']:+.1f}% | "
              f"{r['overhead_q1_pct']:+.1f}% … {r['overhead_q3_pct']:+.1f}% | "
              f"{r['got_call_ms']:.1f} | {r['got_call_pct']:.2f}% | {r['iterations'] if r['iterations'] is not None else ''} |"
              for r in results]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
