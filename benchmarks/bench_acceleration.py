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
ABOVE = "fused launch (above FUSED_MAX)"


def timed_solve(C: torch.Tensor, mask, anderson: int, device: torch.device):
    """(result, ms) of one sinkhorn_log solve at the library's defaults with ``anderson`` past differences."""
    out = {}

    def solve() -> None:
        out["res"] = sinkhorn_log(C, THETA, mask, tol=TOL, max_iter=MAX_ITER, anderson=anderson)

    ms = time_once(solve, device)
    return out["res"], ms


def fused_above_limit(C: torch.Tensor) -> Any:
    """The Triton module if the kernel takes C (B, B') but the solvers do not send it there
    (FUSED_MAX < max(B, B') ≤ FUSED_LIMIT, float32, on CUDA), else None: where both are timed."""
    tri = triton_module()
    if tri is None or not tri._device_ok(C) or C.dtype != torch.float32:
        return None
    return tri if tri.fused_max() < max(C.shape[-2:]) <= tri.FUSED_LIMIT else None


def call_solvers(costs: torch.Tensor, mask, anderson: int) -> list[tuple[Any, str]]:
    """Functions running the three solves of one GOT call, each returning (largest sweep count, the three
    values) as tensors, and how they run: first as the solver chooses (one fused launch on CUDA at
    B ≤ FUSED_MAX, else three sinkhorn_log loops); then, where the kernel takes the size but the solvers do
    not send it (FUSED_MAX < B ≤ FUSED_LIMIT), as one fused launch too: the measurement that decides where
    FUSED_MAX should be."""
    tri = triton_module() if costs.is_cuda else None
    C = costs if mask is None else costs.masked_fill(~mask, float("inf"))
    dispatched = tri is not None and tri.fused_supported(C)
    kernels = tri if dispatched else fused_above_limit(C[0])

    def fused() -> tuple[torch.Tensor, torch.Tensor]:
        out = kernels.sinkhorn_fused(C, THETA, max_iter=MAX_ITER, tol=TOL, anderson=anderson, with_plan=True)
        return out[2].max(), out[5]

    if dispatched:
        return [(fused, "fused launch")]

    def loop() -> tuple[torch.Tensor, torch.Tensor]:
        res = [sinkhorn_log(c, THETA, mask, tol=TOL, max_iter=MAX_ITER, anderson=anderson) for c in costs]
        return torch.stack([r.iterations for r in res]).max(), torch.stack([r.value for r in res])

    variants = [(loop, "3 × sinkhorn_log")]
    if kernels is not None:
        variants.append((fused, ABOVE))
    return variants


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
            tri = fused_above_limit(C)
            if tri is not None:  # a call with debias=False solves this one problem: the fused launch alone
                Cm = C if mask is None else C.masked_fill(~mask, float("inf"))
                out: dict[str, Any] = {}

                def one(Cm=Cm, tri=tri, out=out) -> None:
                    out["r"] = tri.sinkhorn_fused(Cm, THETA, max_iter=MAX_ITER, tol=TOL, with_plan=True)

                one()  # compiles this padded shape
                rows[-1].update(
                    ms_fused=time_once(one, device),
                    it_fused=int(out["r"][2]),
                    err_fused=float(out["r"][6]),
                    fused_value_diff=abs(float(out["r"][5] - ra.value)),
                )
            print(rows[-1], flush=True)
        stack = torch.stack(list(costs.values()))
        for masked, mask in ((False, None), (True, label_mask(y))):
            for m in a.anderson:
                first = None
                for fn, how in call_solvers(stack, mask, m):
                    sweeps, values = fn()
                    first = values if first is None else first
                    ms = median(time_calls(fn, device, a.repeats, warmup=1, budget_s=1.0))
                    diff = float((values - first).abs().max())  # against the solver's own choice
                    calls.append(
                        dict(B=B, batch=k, mask=masked, anderson=m, how=how, sweeps=int(sweeps), ms=ms, value_diff=diff)
                    )
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
                for how in dict.fromkeys(c["how"] for c in sel):
                    per = [c for c in sel if c["how"] == how]
                    sw, ms = [c["sweeps"] for c in per], [c["ms"] for c in per]
                    body.append(
                        [
                            B,
                            method,
                            m,
                            how,
                            f"{statistics.median(sw):.0f} [{max(sw)}]",
                            f"{statistics.median(ms):.3f} [{max(ms):.3f}]",
                            "" if how == sel[0]["how"] else f"{max(c['value_diff'] for c in per):.1e}",
                        ]
                    )
    L += md_table(["B", "method", "anderson", "runs as", "sweeps", "ms", "max value diff"], body)
    L += render_above(rows, calls)
    return L


def render_above(rows: list[dict[str, Any]], calls: list[dict[str, Any]]) -> list[str]:
    """Where the fused kernel takes a size that the solvers do not send it: both ways, side by side."""
    single = [r for r in rows if "ms_fused" in r]
    paired = [c for c in calls if c["how"] == ABOVE and c["anderson"] == 8]
    if not single and not paired:
        return []
    L = [
        "\n## Above FUSED_MAX: the fused launch against the torch loop the solvers run there (anderson = 8)\n",
        "Each cell: median [max] over the batches, ms; ratio = fused / torch loop (below 1: the fused launch is "
        "faster, and FUSED_MAX in got_reg/solvers/_triton.py could be raised to this B); value diff: the largest "
        "|fused − loop| of the values.\n",
    ]
    body = []
    for B in dict.fromkeys(c["B"] for c in paired):
        for masked, method in ((False, "GOT-S"), (True, "GOT-LM")):
            keys = {c["batch"] for c in paired if c["B"] == B and c["mask"] == masked}
            loop = [c for c in calls if c["B"] == B and c["mask"] == masked and c["anderson"] == 8]
            pairs = []
            for k in sorted(keys):
                t = {c["how"]: c for c in loop if c["batch"] == k}
                pairs.append((t["3 × sinkhorn_log"]["ms"], t[ABOVE]["ms"], t[ABOVE]["value_diff"]))
            if not pairs:
                continue
            lo, fu, vd = zip(*pairs)
            ratio = [f / t for t, f in zip(lo, fu)]
            body.append(
                [
                    B,
                    f"{method} call (3 solves)",
                    f"{statistics.median(lo):.2f} [{max(lo):.2f}]",
                    f"{statistics.median(fu):.2f} [{max(fu):.2f}]",
                    f"{statistics.median(ratio):.2f}",
                    f"{max(vd):.1e}",
                ]
            )
    for B in dict.fromkeys(r["B"] for r in single):
        for masked in (False, True):
            sel = [r for r in single if r["B"] == B and r["mask"] == masked and r["problem"] == "cross"]
            if not sel:
                continue
            lo, fu = [r["ms_aa"] for r in sel], [r["ms_fused"] for r in sel]
            ratio = [f / t for t, f in zip(lo, fu)]
            body.append(
                [
                    B,
                    f"cross problem alone, {'masked' if masked else 'no mask'} (debias=False)",
                    f"{statistics.median(lo):.2f} [{max(lo):.2f}]",
                    f"{statistics.median(fu):.2f} [{max(fu):.2f}]",
                    f"{statistics.median(ratio):.2f}",
                    f"{max(r['fused_value_diff'] for r in sel):.1e}",
                ]
            )
    L += md_table(["B", "what", "torch loop ms", "fused ms", "ratio", "max value diff"], body)
    return L


if __name__ == "__main__":
    sys.exit(main())
