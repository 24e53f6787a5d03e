"""Anderson-accelerated vs plain Sinkhorn on the transport problems of a real network.

    python -m benchmarks.bench_acceleration --threads 1                      # B = 128 and 512, 5 batches each
    python -m benchmarks.bench_acceleration --device cpu --quick --out /tmp/r  # smoke run

The MNIST SmallCNN of ``bench_overhead`` is trained briefly on clean data; for each test batch, TRADES'
attack (PGD-10, ε = 0.3) gives the adversarial batch, got_reg.FeatureCapture the features of the default
layer, and the GOT cost (cosine + KL) is solved by got-reg's log-domain Sinkhorn
(got_reg.solvers.sinkhorn_log) at the default tol = 1e-3 with Anderson acceleration (anderson=8, the default)
and without (anderson=0: plain Sinkhorn), with and without the label mask; and so are the two self-transport
problems of the debiased loss (clean-clean, adversarial-adversarial). The tables give the median iterations
and solve times, the largest value and plan (L1) differences between the two solves, and per GOT call the
largest of its three sweep counts (what the fused kernel's time follows on a GPU).
"""

from __future__ import annotations

import argparse
import statistics
import sys
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
    set_threads,
    time_calls,
    time_once,
    write_outputs,
)
from got_reg import GOTConvergenceWarning
from got_reg.functional import label_mask
from got_reg.solvers import sinkhorn_log
from got_reg.solvers.lse import triton_module

TOL, THETA, MAX_ITER = 1e-3, 0.1, 1000  # the library's defaults


def timed_solve(C: torch.Tensor, mask, anderson: int, device: torch.device):
    """(result, ms) of one sinkhorn_log solve at the library's defaults with ``anderson`` past differences."""
    out = {}

    def solve() -> None:
        out["res"] = sinkhorn_log(C, THETA, mask, tol=TOL, max_iter=MAX_ITER, anderson=anderson)

    ms = time_once(solve, device)
    return out["res"], ms


def call_solver(costs: torch.Tensor, mask, anderson: int):
    """A function running the three solves of one GOT call, returning their largest sweep count (a tensor)."""
    tri = triton_module() if costs.is_cuda else None
    C = costs if mask is None else costs.masked_fill(~mask, float("inf"))
    if tri is not None and tri.fused_supported(C):

        def fused() -> torch.Tensor:
            out = tri.sinkhorn_fused(C, THETA, max_iter=MAX_ITER, tol=TOL, anderson=anderson, with_plan=True)
            return out[2].max()

        return fused, "fused launch"

    def loop() -> torch.Tensor:
        its = [sinkhorn_log(c, THETA, mask, tol=TOL, max_iter=MAX_ITER, anderson=anderson).iterations for c in costs]
        return torch.stack(its).max()

    return loop, "3 × sinkhorn_log"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="B = 32, one batch, 5 pretraining steps")
    p.add_argument("--batch", type=int, nargs="+", default=[128, 512])
    p.add_argument("--batches", type=int, default=5, help="test batches per batch size")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--anderson", type=int, nargs="+", default=[8, 4, 0], help="memories timed per GOT call (0 = plain)")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per GOT call and memory")
    p.add_argument("--data-dir", default=None, help="MNIST idx files (default: ../shared/data/mnist)")
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--out", default="benchmarks/results", help="folder for NAME.md and NAME.json")
    p.add_argument("--name", default=None, help="file name (default: acceleration_cpu / _gpu, _quick with --quick)")
    a = p.parse_args(argv)
    if a.quick:
        a.batch, a.batches, a.pretrain_steps, a.threads, a.repeats = [32], 1, 5, a.threads or 1, 2
    device = torch.device(a.device)
    kind = "acceleration_gpu" if device.type == "cuda" else "acceleration_cpu"
    name = a.name or kind + ("_quick" if a.quick else "")
    set_threads(a.threads)
    warnings.simplefilter("ignore", GOTConvergenceWarning)
    env = environment(device)
    data, problems_of = got_problems(device, a.batch, a.batches, a.data_dir, a.pretrain_steps)
    rows: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    for B, k, costs, y in problems_of:
        # GOT-S solves the three unmasked, GOT-LM the three with the label mask (one call each).
        problems = [(name, C, mask) for mask in (None, label_mask(y)) for name, C in costs.items()]
        for problem, C, mask in problems:
            (ra, msa), (rp, msp) = (timed_solve(C, mask, m, device) for m in (8, 0))
            rows.append(
                dict(
                    B=B,
                    batch=k,
                    problem=problem,
                    mask=mask is not None,
                    it_aa=int(ra.iterations),
                    it_plain=int(rp.iterations),
                    ms_aa=msa,
                    ms_plain=msp,
                    err_aa=float(ra.marginal_error),
                    err_plain=float(rp.marginal_error),
                    value_diff=abs(float(ra.value - rp.value)),
                    plan_diff_l1=float((ra.plan - rp.plan).abs().sum()),
                )
            )
            print(rows[-1], flush=True)
        stack = torch.stack(list(costs.values()))
        for masked, mask in ((False, None), (True, label_mask(y))):
            for m in a.anderson:
                fn, how = call_solver(stack, mask, m)
                sweeps = fn()
                ms = median(time_calls(fn, device, a.repeats, warmup=1, budget_s=1.0))
                calls.append(dict(B=B, batch=k, mask=masked, anderson=m, how=how, sweeps=int(sweeps), ms=ms))
                print(calls[-1], flush=True)
    env["load_end"] = load()
    md = render(a, env, data, rows, calls)
    path = write_outputs(a.out, name, md, dict(env=env, args=vars(a), data=data, rows=rows, calls=calls))
    print("\n".join(md))
    print(f"wrote {path}")
    return 0


PROBLEMS = ("cross", "clean-clean", "adv-adv")


def render(a, env, data: str, rows: list[dict[str, Any]], calls: list[dict[str, Any]]) -> list[str]:
    L = [
        "# Anderson-accelerated vs plain Sinkhorn on a trained SmallCNN's GOT costs\n",
        f"Machine: {describe(env)}.\n",
        f"Data: {data}; SmallCNN after {a.pretrain_steps} clean Adam steps; TRADES PGD-10 (ε = 0.3) adversarial "
        f"batches; cosine + KL cost, θ = {THETA}, tol = {TOL:g} (L1 marginal error), max_iter = {MAX_ITER}; "
        "'cross' is the clean-adversarial problem, the other two the debiased loss' self-transport ones; the "
        "mask is the label mask (GOT-LM). Iterations: median [max] over "
        f"{a.batches} batches, annealing sweeps included; the differences are the largest over them (a solve "
        "that hit max_iter counts as not converged).\n",
    ]
    body = []
    for B in a.batch:
        for masked in (False, True):
            for problem in PROBLEMS:
                sel = [r for r in rows if r["B"] == B and r["problem"] == problem and r["mask"] == masked]
                if not sel:
                    continue
                med = {k: statistics.median(r[k] for r in sel) for k in ("it_aa", "it_plain", "ms_aa", "ms_plain")}
                top = {k: max(r[k] for r in sel) for k in ("it_aa", "it_plain")}
                n = len(sel)
                conv = f"{sum(r['err_aa'] <= TOL for r in sel)}/{n} / {sum(r['err_plain'] <= TOL for r in sel)}/{n}"
                body.append(
                    [
                        B,
                        problem,
                        fmt(masked),
                        f"{med['it_aa']:.0f} [{top['it_aa']}]",
                        f"{med['it_plain']:.0f} [{top['it_plain']}]",
                        conv,
                        f"{med['ms_aa']:.1f}",
                        f"{med['ms_plain']:.1f}",
                        f"{max(r['value_diff'] for r in sel):.1e}",
                        f"{max(r['plan_diff_l1'] for r in sel):.1e}",
                    ]
                )
    L += md_table(
        [
            "B",
            "problem",
            "mask",
            "iterations anderson=8",
            "iterations plain",
            "converged (8 / plain)",
            "ms anderson=8",
            "ms plain",
            "max value diff",
            "max plan diff (L1)",
        ],
        body,
    )
    # A GOT call with debias=True solves its three problems in one fused launch on a GPU (one program each):
    # its time follows the largest of the three counts.
    L.append("\n## Per GOT call (debias=True): the largest of its three sweep counts\n")
    body = []
    for B in a.batch:
        for masked, method in ((False, "GOT-S"), (True, "GOT-LM")):
            per_call = {}
            for r in rows:
                if r["B"] == B and r["mask"] == masked:
                    key = per_call.setdefault(r["batch"], {"aa": 0, "plain": 0})
                    key["aa"] = max(key["aa"], r["it_aa"])
                    key["plain"] = max(key["plain"], r["it_plain"])
            if not per_call:
                continue
            aa = [c["aa"] for c in per_call.values()]
            plain = [c["plain"] for c in per_call.values()]
            body.append(
                [
                    B,
                    method,
                    f"{statistics.median(aa):.0f} [{max(aa)}]",
                    f"{statistics.median(plain):.0f} [{max(plain)}]",
                ]
            )
    L += md_table(["B", "method", "sweeps anderson=8", "sweeps plain"], body)
    L.append(
        f"\n## Per GOT call, timed: its three solves for each memory (median of up to {a.repeats} calls per batch, "
        "fewer once they took a second, then the "
        f"median [max] over the {a.batches} batches; sweeps: the largest of the three counts)\n"
    )
    body = []
    for B in a.batch:
        for masked, method in ((False, "GOT-S"), (True, "GOT-LM")):
            for m in a.anderson:
                sel = [c for c in calls if c["B"] == B and c["mask"] == masked and c["anderson"] == m]
                if not sel:
                    continue
                sw, ms = [c["sweeps"] for c in sel], [c["ms"] for c in sel]
                body.append(
                    [
                        B,
                        method,
                        m,
                        sel[0]["how"],
                        f"{statistics.median(sw):.0f} [{max(sw)}]",
                        f"{statistics.median(ms):.3f} [{max(ms):.3f}]",
                    ]
                )
    L += md_table(["B", "method", "anderson", "runs as", "sweeps", "ms"], body)
    return L


if __name__ == "__main__":
    sys.exit(main())
