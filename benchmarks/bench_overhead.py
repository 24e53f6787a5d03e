"""GOT's overhead in a real training step: one TRADES PGD-10 step of the MNIST SmallCNN.

    .venv/bin/python benchmarks/bench_overhead.py            # B = 128 and 512
    .venv/bin/python benchmarks/bench_overhead.py --quick    # < 1 minute smoke run

The step is TRADES' (attack in eval mode from x + 0.001·randn maximising KL, 10 sign steps; then
train mode, CE(clean) + 6·KL(adv‖clean), backward, SGD step), with and without the GOT line, on
random 28×28 inputs. Variants run interleaved in one process (ABCD ABCD …) and the median per
variant is compared with the median of the plain step, so machine drift hits all alike.
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
from _common import machine, sync  # noqa: E402
from examples.attacks import trades_kl_attack  # noqa: E402
from examples.models import build_model, default_layer  # noqa: E402

from got_reg import GOTConvergenceWarning, GOTRegularizer  # noqa: E402

VARIANTS = {
    "TRADES": None,
    "+GOT-S torch": dict(solver="sinkhorn", backend="torch"),
    "+GOT-LM torch": dict(solver="sinkhorn", backend="torch", label_matching=True),
    "+GOT-S pot": dict(solver="sinkhorn", backend="pot"),
    "+GOT-S geomloss": dict(solver="sinkhorn", backend="geomloss"),
    "+GOT-S dual": dict(solver="dual"),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--batch", type=int, nargs="+", default=[128, 512])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="benchmarks/results/overhead_cpu")
    a = p.parse_args(argv)
    if a.quick:
        a.batch, a.rounds = [32], 2
    warnings.simplefilter("ignore", GOTConvergenceWarning)
    warnings.filterwarnings("ignore", message="Sinkhorn did not converge")
    device = torch.device(a.device)
    results = []
    for B in a.batch:
        torch.manual_seed(0)
        model = build_model("smallcnn", 10, in_channels=1, image_size=28).to(device)
        # lr = 0: the step does all its work but the weights stay put, so every variant times the same
        # model (random labels at β = 10 would otherwise drive the shared weights unstable).
        opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
        x, y = torch.rand(B, 1, 28, 28, device=device), torch.randint(0, 10, (B,), device=device)
        regs = {name: GOTRegularizer(model, default_layer("smallcnn"), **kw) if kw else None
                for name, kw in VARIANTS.items()}

        def step(got):
            model.train()
            x_adv = trades_kl_attack(model, x, 0.3, 0.01, 10)
            opt.zero_grad()
            lc, la = model(x), model(x_adv)
            loss = F.cross_entropy(lc, y) + 6.0 * F.kl_div(F.log_softmax(la, 1), F.softmax(lc, 1), reduction="batchmean")
            if got is not None:
                loss = loss + got(lc, la, y)
            loss.backward()
            opt.step()

        times = {n: [] for n in VARIANTS}
        for n, g in regs.items():  # warm-up (lazy dual potential, allocator)
            step(g)
        for _ in range(a.rounds):
            for n, g in regs.items():
                sync(device)
                t = time.perf_counter()
                step(g)
                sync(device)
                times[n].append(time.perf_counter() - t)
        base = statistics.median(times["TRADES"])
        for n in VARIANTS:
            med = statistics.median(times[n])
            results.append(dict(B=B, variant=n, ms=1e3 * med, overhead_pct=100 * (med / base - 1)))
            print(json.dumps(results[-1]), flush=True)
        for g in regs.values():
            if g is not None:
                g.remove()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"machine": machine(), "rounds": a.rounds, "rows": results}, indent=1))
    lines = [f"# GOT overhead in a TRADES PGD-10 step (SmallCNN, 28×28)\n\nMachine: {machine()}. "
             f"Median of {a.rounds} interleaved rounds.\n", "| B | variant | ms / step | overhead vs TRADES |", "|---|---|---|---|"]
    lines += [f"| {r['B']} | {r['variant']} | {r['ms']:.1f} | {r['overhead_pct']:+.1f}% |" for r in results]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
