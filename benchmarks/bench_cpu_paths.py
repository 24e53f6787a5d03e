"""The CPU solver's log-sum-exp operator and Anderson step against those they replaced, in one process.

    python -m benchmarks.bench_cpu_paths --threads 1                       # B = 128, 256, 512; about 5 min
    python -m benchmarks.bench_cpu_paths --quick --out /tmp/r               # smoke run

On CPU, got-reg's Sinkhorn loop (got_reg.solvers.sinkhorn_log) runs on two pieces chosen for the device:

  log-sum-exp    KernelLSE (a cached, stabilised kernel: one matrix-vector product per call, rebuilt when
                 the potentials have moved) or BlockedLSE (five passes over the cost with an exp per call);
  Anderson step  _HostAnderson (numpy on views, the small system solved on the host) or _Anderson (torch
                 operators that never read the device, what a GPU needs).

Each variant below is one choice of the two, set for the duration of its calls (the benchmark patches the
solver's private selection; the library has no switch for it):

  before           BlockedLSE + _Anderson     (got-reg 0.2.0.dev0 up to this change)
  kernel LSE       KernelLSE  + _Anderson
  host step        BlockedLSE + _HostAnderson
  after (default)  KernelLSE  + _HostAnderson

The problems are those of bench_acceleration (a briefly trained MNIST SmallCNN, TRADES' PGD-10 adversarial
batches, the cosine + KL cost): for each batch, the three solves of one GOT call (cross, clean-clean,
adv-adv) without the mask (GOT-S) and with the label mask (GOT-LM), as TorchSinkhorn.solve_many runs them on
CPU. The variants are interleaved within each round (before, kernel LSE, host step, after, before, ...), and
each variant's time is divided by the 'before' time of the same round: pairing within a round cancels the
drift of a shared machine. The table gives the median time of a call, the median and interquartile range of
those paired ratios, the call's sweeps (the sum of its three solves), and how far the variant's values and
plans are from the 'before' ones (the solves stop at tol = 1e-3, so differences of that order are the
stopping rule's, not an error).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import warnings
from typing import Any

import torch

from benchmarks._common import (
    describe,
    environment,
    fmt,
    got_problems,
    load,
    md_table,
    median,
    quartiles,
    set_threads,
    write_outputs,
)
from got_reg import GOTConvergenceWarning
from got_reg.functional import label_mask
from got_reg.solvers import lse, sinkhorn, sinkhorn_log

TOL, THETA, MAX_ITER = 1e-3, 0.1, 1000  # the library's defaults

# name: (KernelLSE, _HostAnderson)
VARIANTS = {
    "before": (False, False),
    "kernel LSE": (True, False),
    "host step": (False, True),
    "after (default)": (True, True),
}


def _device_step(x: torch.Tensor, memory: int) -> sinkhorn._Anderson:
    return sinkhorn._Anderson(x, memory, sinkhorn.ANDERSON_REG[x.dtype])


@contextlib.contextmanager
def paths(kernel: bool, host: bool):
    """The solver with the chosen CPU pieces (restored afterwards)."""
    saved = lse._KERNEL_MAX_ELEMENTS, sinkhorn._anderson
    try:
        if not kernel:
            lse._KERNEL_MAX_ELEMENTS = -1  # every matrix is "too large": BlockedLSE
        if not host:
            sinkhorn._anderson = _device_step
        yield
    finally:
        lse._KERNEL_MAX_ELEMENTS, sinkhorn._anderson = saved


def got_call(costs: dict[str, torch.Tensor], mask) -> tuple[float, list[Any]]:
    """(ms, results) of the three solves of one GOT call, as TorchSinkhorn.solve_many runs them on CPU."""
    t0 = time.perf_counter()
    results = [sinkhorn_log(C, THETA, mask, tol=TOL, max_iter=MAX_ITER) for C in costs.values()]
    return 1e3 * (time.perf_counter() - t0), results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="B = 32, one batch, 2 rounds, 5 pretraining steps")
    p.add_argument("--batch", type=int, nargs="+", default=[128, 256, 512])
    p.add_argument("--batches", type=int, default=3, help="test batches per batch size")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds per batch and mask")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="MNIST idx files (default: ../shared/data/mnist)")
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--out", default="benchmarks/results", help="folder for NAME.md and NAME.json")
    p.add_argument("--name", default=None, help="file name (default: cpu_paths, cpu_paths_quick with --quick)")
    a = p.parse_args(argv)
    if a.quick:
        a.batch, a.batches, a.rounds, a.pretrain_steps, a.threads = [32], 1, 2, 5, a.threads or 1
    name = a.name or "cpu_paths" + ("_quick" if a.quick else "")
    device = torch.device("cpu")
    set_threads(a.threads)
    warnings.simplefilter("ignore", GOTConvergenceWarning)
    env = environment(device)
    data, problems_of = got_problems(device, a.batch, a.batches, a.data_dir, a.pretrain_steps)
    rows: list[dict[str, Any]] = []
    for B, k, costs, y in problems_of:
        for masked, mask in ((False, None), (True, label_mask(y))):
            for kernel, host in VARIANTS.values():  # warm-up: allocator, numpy/LAPACK first calls
                with paths(kernel, host):
                    got_call(costs, mask)
            for r in range(a.rounds):
                base = None
                for v, (kernel, host) in VARIANTS.items():
                    with paths(kernel, host):
                        ms, res = got_call(costs, mask)
                    if base is None:
                        base = ms, res
                    pairs = list(zip(res, base[1], strict=True))
                    row = dict(
                        B=B,
                        batch=k,
                        mask=masked,
                        round=r,
                        variant=v,
                        ms=ms,
                        ratio=ms / base[0],
                        sweeps=sum(int(x.iterations) for x in res),
                        converged=all(bool(x.converged) for x in res),
                        value_diff=max(abs(float(x.value - b.value)) for x, b in pairs),
                        plan_diff_l1=max(float((x.plan - b.plan).abs().sum()) for x, b in pairs),
                    )
                    rows.append(row)
            print({kk: vv for kk, vv in rows[-1].items() if kk != "round"}, flush=True)
    env["load_end"] = load()
    md = render(a, env, data, rows)
    path = write_outputs(a.out, name, md, dict(env=env, args=vars(a), data=data, rows=rows))
    print("\n".join(md))
    print(f"wrote {path}")
    return 0


def render(a, env, data: str, rows: list[dict[str, Any]]) -> list[str]:
    L = [
        "# The CPU solver's pieces against those they replaced (one process, interleaved)\n",
        f"Machine: {describe(env)}.\n",
        f"Data: {data}; SmallCNN after {a.pretrain_steps} clean Adam steps; TRADES PGD-10 (ε = 0.3) adversarial "
        f"batches; cosine + KL cost, θ = {THETA}, tol = {TOL:g}, max_iter = {MAX_ITER}. A call = the three "
        "solves of one GOT call (debias=True) by sinkhorn_log, without the mask (GOT-S) or with the label mask "
        f"(GOT-LM). {a.batches} batches × {a.rounds} rounds per B and mask, variants interleaved in each round; "
        "'× before' = median [interquartile range] of (variant / 'before') within a round. Sweeps: the sum "
        "over the call's three solves, annealing included (median [max]). Differences from 'before': the "
        "largest over the call's solves and all rounds. `python -m benchmarks.bench_cpu_paths` "
        "(benchmarks/README.md).\n",
    ]
    body = []
    for B in a.batch:
        for masked, method in ((False, "GOT-S"), (True, "GOT-LM")):
            for v in VARIANTS:
                sel = [r for r in rows if r["B"] == B and r["mask"] == masked and r["variant"] == v]
                if not sel:
                    continue
                q1, q3 = quartiles([r["ratio"] for r in sel])
                sweeps = [r["sweeps"] for r in sel]
                body.append(
                    [
                        B,
                        method,
                        v,
                        fmt(median([r["ms"] for r in sel])),
                        "" if v == "before" else f"{median([r['ratio'] for r in sel]):.2f} [{q1:.2f} … {q3:.2f}]",
                        f"{median(sweeps):.0f} [{max(sweeps)}]",
                        f"{sum(r['converged'] for r in sel)}/{len(sel)}",
                        "" if v == "before" else f"{max(r['value_diff'] for r in sel):.1e}",
                        "" if v == "before" else f"{max(r['plan_diff_l1'] for r in sel):.1e}",
                    ]
                )
    L += md_table(
        [
            "B",
            "call",
            "variant",
            "ms / call",
            "× before",
            "sweeps",
            "converged",
            "value diff",
            "plan diff (L1)",
        ],
        body,
    )
    return L


if __name__ == "__main__":
    sys.exit(main())
