"""GOT's cost in a real training step: one TRADES PGD-10 step of the MNIST SmallCNN, with and without GOT.

    python -m benchmarks.bench_overhead --device cuda --out DIR          # B = 128 and 512; under a minute on an H100
    python -m benchmarks.bench_overhead --threads 1                      # CPU (about 7 minutes)
    python -m benchmarks.bench_overhead --device cpu --quick --out /tmp/o  # smoke run

The step is TRADES' (examples.attacks.trades_kl_attack: eval mode, start x + 0.001·N(0, I), 10 signed
steps of 0.01 on KL within ε = 0.3; then train mode, CE(clean) + 6·KL(adv ‖ clean), backward, SGD step)
on examples.models' SmallCNN, without GOT and with each variant's line ``loss += got(logits, logits_adv, y)``
(β = 10, θ = 0.1, layer classifier.4, every other option at its default):

  +GOT-S            GOTRegularizer(model, layer)                          (Sinkhorn, default backend)
  +GOT-LM           ... label_matching=True
  +GOT-LM dual      ... label_matching=True, solver="dual"
  +GOT-S geomloss   ... backend="geomloss"                                 ('not installed' without GeomLoss)
  +GOT-S pot        ... backend="pot"                                      (not run unless asked for)
  +GOT-S graphs     ... cuda_graphs=True                                   (by default on CUDA only)
  +GOT-LM graphs    ... label_matching=True, cuda_graphs=True              (by default on CUDA only)
  +GOT-LM dual graphs ... label_matching=True, solver="dual", cuda_graphs=True (by default on CUDA only)
  ... graphs deferred  each graphs variant with deferred_checks=True      (by default on CUDA only)

The network is first trained briefly on clean data (--pretrain-steps Adam steps at B = 128), so that its
features, and so the transport problems, look like those of a real run; the timed steps then use lr = 0 (all
the work, the same weights for every variant). Data: MNIST test images from --data-dir (default
../shared/data/mnist), or random 28×28 inputs when the files are missing (the table says which).

Each variant runs on its own copy of the network (so only its own hooks are on it), interleaved with the
others (A B C … A B C …); the overhead is the median over rounds of (variant step / TRADES step of the same
round) − 1, with the interquartile range of those ratios: pairing within a round cancels the drift of a
shared machine. Steps are timed from an idle device with CUDA events (GPU) or perf_counter (CPU).

The got(...) call itself is timed two ways: 'fwd in step' = events around the got(...) line inside the
timed steps (forward only); 'fwd+bwd alone' = the same regulariser configuration called on features and
logits of a real step held as leaves (a stand-in module files them through the same hooks), timed from
just before got(...) to just after loss.backward(), i.e. the forward and GOT's share of the backward,
including its one host read. Its share of the TRADES step is the issue-12 target (≤ 3% on a GPU, ≤ 2% on
CPU).

Host synchronisations (CUDA only, else 'n/a'): one step per variant, and one isolated got(...) call with
its backward, run under torch.cuda.set_sync_debug_mode("warn"); every synchronising call warns and is
counted (the mode is restored afterwards). The table names the lines that synchronise most.
"""

from __future__ import annotations

import argparse
import copy
import sys
import traceback
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks._common import (
    Deadline,
    Span,
    SyncCount,
    describe,
    environment,
    fmt,
    load,
    md_table,
    median,
    mnist_or_random,
    pretrain,
    quartiles,
    set_threads,
    smallcnn,
    sync,
    time_once,
    write_outputs,
)
from examples.attacks import trades_kl_attack
from got_reg import FeatureCapture, GOTCollapseWarning, GOTConvergenceWarning, GOTRegularizer

BETA, THETA = 10.0, 0.1
EPSILON, STEP_SIZE, STEPS, TRADES_BETA = 0.3, 0.01, 10, 6.0
VARIANTS: dict[str, dict[str, Any] | None] = {
    "TRADES": None,
    "+GOT-S": dict(),
    "+GOT-LM": dict(label_matching=True),
    "+GOT-LM dual": dict(label_matching=True, solver="dual"),
    "+GOT-S geomloss": dict(backend="geomloss"),
    "+GOT-S pot": dict(backend="pot"),
    "+GOT-S graphs": dict(cuda_graphs=True),
    "+GOT-LM graphs": dict(label_matching=True, cuda_graphs=True),
    "+GOT-LM dual graphs": dict(label_matching=True, solver="dual", cuda_graphs=True),
    "+GOT-S graphs deferred": dict(cuda_graphs=True, deferred_checks=True),
    "+GOT-LM graphs deferred": dict(label_matching=True, cuda_graphs=True, deferred_checks=True),
    "+GOT-LM dual graphs deferred": dict(label_matching=True, solver="dual", cuda_graphs=True, deferred_checks=True),
}
DEFAULT_VARIANTS = ["TRADES", "+GOT-S", "+GOT-LM", "+GOT-LM dual", "+GOT-S geomloss"]
# On CPU they would run eagerly: by default on CUDA only.
GRAPH_VARIANTS = [n for n in VARIANTS if "graphs" in n]
NEEDS = {"+GOT-S geomloss": "geomloss", "+GOT-S pot": "ot"}


class Replay(nn.Module):
    """Stands in for the network in the isolated got() timing: ``forward(z, logits)`` passes the features
    through ``feat`` (so the regulariser's hooks file them) and returns a view of the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.feat = nn.Identity()

    def forward(self, z: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        self.feat(z)
        return logits.view_as(logits)


def missing(variant: str) -> str | None:
    module = NEEDS.get(variant)
    if module is None:
        return None
    try:
        __import__(module)
    except Exception:
        return module
    return None


class Runner:
    """One batch size: a network copy, optimiser and regulariser per variant, and the step they share."""

    def __init__(self, a, model: nn.Module, layer: str, x: torch.Tensor, y: torch.Tensor, device, variants) -> None:
        self.a, self.device, self.x, self.y, self.layer = a, device, x, y, layer
        self.variants = variants
        self.models = {n: copy.deepcopy(model) for n in variants}
        # lr = 0: every step does all its work, and the weights stay those of the pretrained network.
        self.opts = {n: torch.optim.SGD(m.parameters(), lr=0.0, momentum=0.9) for n, m in self.models.items()}
        self.regs = {
            n: GOTRegularizer(self.models[n], layer, beta=BETA, theta=THETA, **cfg) if cfg is not None else None
            for n, cfg in ((n, VARIANTS[n]) for n in variants)
        }
        self.spans = {n: Span(device) for n in variants}

    def step(self, n: str) -> None:
        model, opt, got, span = self.models[n], self.opts[n], self.regs[n], self.spans[n]
        x, y = self.x, self.y
        model.train()
        x_adv = trades_kl_attack(model, x, EPSILON, STEP_SIZE, STEPS)
        opt.zero_grad(set_to_none=True)
        logits, logits_adv = model(x), model(x_adv)
        loss = F.cross_entropy(logits, y) + TRADES_BETA * F.kl_div(
            F.log_softmax(logits_adv, 1), F.softmax(logits, 1), reduction="batchmean"
        )
        if got is not None:
            span.start()
            loss = loss + got(logits, logits_adv, y)
            span.stop()
        loss.backward()
        opt.step()

    def captured(self):
        """Features and logits of one real step (clean and adversarial), detached."""
        model = copy.deepcopy(self.models["TRADES"])
        with FeatureCapture(model, self.layer) as cap:
            model.train()
            x_adv = trades_kl_attack(model, self.x, EPSILON, STEP_SIZE, STEPS)
            with torch.no_grad():
                lc, la = model(self.x), model(x_adv)
                zc, za = cap.lookup(lc), cap.lookup(la)
        return [t.detach() for t in (zc, za, lc, la)]

    def isolated_call(self, n: str, held):
        """A closure: got(...) + backward for variant ``n`` on the held tensors, timed by the returned Span."""
        replay = Replay().to(self.device)
        got = GOTRegularizer(replay, "feat", beta=BETA, theta=THETA, **VARIANTS[n])  # type: ignore[arg-type]
        leaves = [t.clone().requires_grad_(True) for t in held]
        span = Span(self.device)

        def call() -> None:
            for t in leaves:
                t.grad = None
            oc, oa = replay(leaves[0], leaves[2]), replay(leaves[1], leaves[3])
            span.start()
            got(oc, oa, self.y).backward()
            span.stop()

        return call, span, got


def run_batch(a, B: int, rounds: int, model, layer, data, device, deadline: Deadline) -> list[dict[str, Any]]:
    x_all, y_all = data
    x, y = x_all[:B].to(device), y_all[:B].to(device)
    absent = {n: missing(n) for n in a.variants}
    present = [n for n in a.variants if absent[n] is None]
    r = Runner(a, model, layer, x, y, device, present)
    failed: dict[str, str] = {}  # a variant that raises is reported and dropped; the others go on

    def guarded(n: str, fn):
        if n in failed:
            return None
        try:
            return fn()
        except Exception as e:
            if n == "TRADES":
                raise
            traceback.print_exc()
            failed[n] = f"error: {type(e).__name__}: {str(e)[:200]}"
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return None

    for n in present:  # warm-up: lazy dual potential, Triton compilation, allocator, cuDNN autotuning
        for _ in range(a.warmup):
            guarded(n, lambda n=n: r.step(n))
    times: dict[str, list[float]] = {n: [] for n in present}
    got_fwd: dict[str, list[float]] = {n: [] for n in present}
    done = 0
    for _ in range(rounds):
        if done and deadline.passed():
            break
        for n in present:
            t = guarded(n, lambda n=n: time_once(lambda: r.step(n), device))
            if t is None:
                continue
            times[n].append(t)
            if r.regs[n] is not None:
                got_fwd[n].append(r.spans[n].ms())
        done += 1
    base = median(times["TRADES"])
    held = r.captured()
    rows = []
    for n in a.variants:
        row: dict[str, Any] = dict(B=B, variant=n, data=a.data_name, rounds=done)
        rows.append(row)
        if absent[n]:
            row["status"] = f"not installed ({absent[n]})"
            continue
        if n not in failed:
            guarded(n, lambda n=n, row=row: measure_variant(a, r, n, row, times, got_fwd, base, held, device))
        if n in failed:
            row.clear()
            row.update(B=B, variant=n, data=a.data_name, status=failed[n])
        print(row, flush=True)
    for got in r.regs.values():
        if got is not None:
            got.remove()
    return rows


def measure_variant(a, r: Runner, n: str, row, times, got_fwd, base: float, held, device) -> None:
    """The row of variant ``n``: paired overhead, host syncs of one step, and the got() call on its own."""
    ratios = [t / b for t, b in zip(times[n], times["TRADES"], strict=True)]  # paired within each round
    q1, q3 = quartiles(ratios)
    row.update(
        ms=median(times[n]),
        ms_min=min(times[n]),
        overhead_pct=100 * (median(ratios) - 1),
        overhead_q1_pct=100 * (q1 - 1),
        overhead_q3_pct=100 * (q3 - 1),
    )
    with SyncCount(device) as sc:
        r.step(n)
    sync(device)
    row.update(syncs_step=sc.n, syncs_step_where=sc.top())
    got = r.regs[n]
    if got is None:
        return
    row["got_fwd_in_step_ms"] = median(got_fwd[n])
    if got.diagnostics is not None and got.config.solver == "sinkhorn":
        row["iterations"] = int(got.diagnostics.iterations)
    call, span, _ = r.isolated_call(n, held)
    for _ in range(a.warmup + 1):
        call()
    alone = []
    for _ in range(max(3, a.got_repeats)):
        sync(device)
        call()
        alone.append(span.ms())
    row.update(got_call_ms=median(alone), got_call_min_ms=min(alone), got_call_share_pct=100 * median(alone) / base)
    with SyncCount(device) as sc:
        call()
    sync(device)
    row.update(syncs_got=sc.n, syncs_got_where=sc.top())


def render(a, env, rows, elapsed_min: float) -> list[str]:
    cuda = env["device_type"] == "cuda"
    target = "≤ 3% on a GPU" if cuda else "≤ 2% on CPU"
    data = rows[0]["data"] if rows else "?"
    L = [
        f"# GOT in a TRADES PGD-10 step (MNIST SmallCNN, β = {BETA:g}, θ = {THETA:g})\n",
        f"Machine: {describe(env)}; {elapsed_min:.1f} min.\n",
        f"Network trained for {a.pretrain_steps} clean Adam steps first; timed on {data} with lr = 0; variants "
        "interleaved, each on its own copy of the network. 'overhead' = median over rounds of (variant step / "
        "TRADES step of the same round) − 1 [interquartile range]. 'got() fwd in step' = the got(...) line inside "
        "the timed steps (forward only); 'got() fwd+bwd alone' = got(...) and loss.backward() on the features and "
        "logits of a real step held as leaves (GOT's forward and its share of the backward), and its share of the "
        f"median TRADES step (target of issue 12: {target}). "
        + (
            "Times: CUDA events from an idle device. Host syncs: counted with "
            "torch.cuda.set_sync_debug_mode('warn') over one step and over one isolated got() call with its "
            "backward; 'where' names the lines that synchronise most."
            if cuda
            else "Times: perf_counter. Host syncs: n/a on CPU."
        )
        + " Iterations: Sinkhorn sweeps of the cross term in the last step.\n",
    ]
    body = []
    for r in rows:
        if "ms" not in r:
            body.append([r["B"], r["variant"], r.get("status", "")] + [""] * 10)
            continue
        ov = "" if r["variant"] == "TRADES" else f"{r['overhead_pct']:+.1f}%"
        iqr = "" if r["variant"] == "TRADES" else f"{r['overhead_q1_pct']:+.1f}% … {r['overhead_q3_pct']:+.1f}%"
        body.append(
            [
                r["B"],
                r["variant"],
                r["rounds"],
                fmt(r["ms"], ".4g"),
                fmt(r["ms_min"], ".4g"),
                ov,
                iqr,
                fmt(r.get("got_fwd_in_step_ms"), ".3g"),
                fmt(r.get("got_call_ms"), ".3g"),
                f"{r['got_call_share_pct']:.2f}%" if "got_call_share_pct" in r else "",
                fmt(r.get("iterations")),
                fmt(r.get("syncs_step")) if cuda else "n/a",
                fmt(r.get("syncs_got")) if cuda else "n/a",
            ]
        )
    L += md_table(
        [
            "B",
            "variant",
            "rounds",
            "ms / step",
            "min ms",
            "overhead",
            "IQR",
            "got() fwd in step ms",
            "got() fwd+bwd alone ms",
            "share of TRADES step",
            "iterations",
            "host syncs / step",
            "syncs in got() fwd+bwd",
        ],
        body,
    )
    if cuda:
        where = [r for r in rows if r.get("syncs_step_where") or r.get("syncs_got_where")]
        if where:
            L += ["", "## Where the host synchronisations come from (top 3 lines)\n"]
            L += md_table(
                ["B", "variant", "in the step", "in got() fwd+bwd"],
                [[r["B"], r["variant"], r.get("syncs_step_where", ""), r.get("syncs_got_where", "")] for r in where],
            )
    return L


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--quick", action="store_true", help="B = 16, 2 rounds, 5 pretraining steps: the smoke test")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--batch", type=int, nargs="+", default=[128, 512])
    p.add_argument(
        "--rounds", type=int, nargs="+", default=None, help="rounds per batch size (default: 31 21 on GPU, 21 7 on CPU)"
    )
    p.add_argument(
        "--variants", nargs="+", default=None, choices=list(VARIANTS), help="default: all but pot (graphs: CUDA only)"
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--got-repeats", type=int, default=None, help="isolated got() calls (default: 50 GPU, 10 CPU)")
    p.add_argument("--data-dir", default=None, help="MNIST idx files (default: ../shared/data/mnist)")
    p.add_argument("--pretrain-steps", type=int, default=300, help="clean Adam steps (B = 128) before timing")
    p.add_argument("--time-limit", type=float, default=0, help="seconds; no new round or batch size after (0: none)")
    p.add_argument("--out", default="benchmarks/results", help="folder for NAME.md and NAME.json")
    p.add_argument("--name", default=None, help="file name (default: overhead_gpu / overhead_cpu, _quick with --quick)")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    gpu = device.type == "cuda"
    if gpu and not torch.cuda.is_available():
        print("--device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    if a.quick:
        a.batch, a.rounds, a.pretrain_steps, a.warmup = [16], [2], 5, 1
        a.got_repeats = a.got_repeats or 3
        a.threads = a.threads or 1
    a.rounds = a.rounds or ([31, 21] if gpu else [21, 7])
    a.got_repeats = a.got_repeats or (50 if gpu else 10)
    a.variants = a.variants or DEFAULT_VARIANTS + (GRAPH_VARIANTS if gpu else [])
    if "TRADES" not in a.variants:
        a.variants.insert(0, "TRADES")
    name = a.name or ("overhead_gpu" if gpu else "overhead_cpu") + ("_quick" if a.quick else "")
    set_threads(a.threads)
    warnings.simplefilter("ignore", GOTConvergenceWarning)
    warnings.simplefilter("ignore", GOTCollapseWarning)
    deadline = Deadline(a.time_limit)
    env = environment(device)
    print(describe(env), flush=True)
    a.data_name, (x_train, y_train, x_test, y_test) = mnist_or_random(a.data_dir)
    torch.manual_seed(0)
    model, layer = smallcnn(device)
    pretrain(model, x_train, y_train, a.pretrain_steps, device)
    rows: list[dict[str, Any]] = []
    for B, rounds in zip(a.batch, a.rounds + a.rounds[-1:] * len(a.batch), strict=False):
        if rows and deadline.passed():
            rows += [dict(B=B, variant=n, status=f"skipped (--time-limit {a.time_limit:g} s)") for n in a.variants]
            continue
        rows += run_batch(a, B, rounds, model, layer, (x_test, y_test), device, deadline)
        env["load_end"] = load()
        md = render(a, env, rows, deadline.elapsed() / 60)
        path = write_outputs(a.out, name, md, dict(env=env, args=vars(a), rows=rows))
        print(f"wrote {path}", flush=True)
    env["load_end"] = load()
    md = render(a, env, rows, deadline.elapsed() / 60)
    write_outputs(a.out, name, md, dict(env=env, args=vars(a), rows=rows))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
