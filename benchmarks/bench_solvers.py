"""Per-call cost of the OT solvers: time (forward + backward, cost matrix included), accuracy, memory.

    .venv/bin/python benchmarks/bench_solvers.py            # CPU grid used for benchmarks/results/
    .venv/bin/python benchmarks/bench_solvers.py --quick    # < 1 minute smoke run
    .venv/bin/python benchmarks/bench_solvers.py --device cuda --out benchmarks/results/solvers_gpu

Methods (all on the same adversarial-like batch: z_adv = z + noise, so the plan is near-diagonal):
  matmul      a same-size fp32 matmul (B×D @ D×B): the hardware reference
  cost        joint_cost alone (cosine + KL), forward + backward
  torch       got-reg's log-domain Sinkhorn (default backend), envelope gradient
  pot         POT ot.solve(method="sinkhorn_log", grad="envelope") called directly
  geomloss    got-reg's GeomLoss backend (SamplesLoss, fixed ε-schedule)
  dual-step   one Adam step on the learned potential + semi-dual value forward + backward
Accuracy is |value − ref| and the L1 plan (= gradient) error against a float64 solve at tol 1e-9.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import adversarial_batch, machine, median_time  # noqa: E402

from got_reg import GOTConvergenceWarning  # noqa: E402
from got_reg.functional import joint_cost, label_mask  # noqa: E402
from got_reg.solvers import KantorovichPotential, entropic_ot, semidual_plan, semidual_value, solve_sinkhorn  # noqa: E402

THETA = 0.1
METHODS = ("matmul", "cost", "torch", "pot", "geomloss", "dual-step")
warnings.simplefilter("ignore", GOTConvergenceWarning)
warnings.filterwarnings("ignore", message="Sinkhorn did not converge")


def make_call(method, B, D, M, masked, device, tol):
    z, za, lg, lga, y = adversarial_batch(B, D, M, device)
    mask = label_mask(y) if masked else None
    leaves = [t.requires_grad_(True) for t in (z, za, lg, lga)]
    info = {}

    def cost():
        return joint_cost(z, za, lg, lga)

    if method == "matmul":
        def call():
            return z.detach() @ za.detach().T
    elif method == "cost":
        def call():
            cost().sum().backward()
    elif method in ("torch", "geomloss"):
        def call():
            v, res = entropic_ot(cost(), THETA, mask, backend=method, tol=tol, warn=False)
            v.backward()
            info.update(value=float(v), plan=res.plan, iterations=res.iterations)
    elif method == "pot":
        import ot

        def call():
            C = cost()
            if mask is not None:
                C = C.masked_fill(~mask, float(C.detach()[mask].max()) + 1000 * THETA)
            res = ot.solve(C, reg=THETA, method="sinkhorn_log", grad="envelope", tol=tol, max_iter=1000)
            res.value.backward()
            info.update(value=float(res.value), plan=res.plan.detach(), iterations=-1)
    elif method == "dual-step":
        pot = KantorovichPotential(lr=1e-2)
        pot.build(D, device, torch.float32)

        def call():
            C = cost()
            pot.ascend(z.detach(), C.detach(), THETA, mask)
            phi = pot(z, detach_params=True)
            v = semidual_value(C, phi, THETA, mask)
            v.backward()
            info.update(value=float(v), plan=semidual_plan(C.detach(), phi.detach(), THETA, mask), iterations=1)
    else:
        raise ValueError(method)

    def reference():
        with torch.no_grad():
            r = solve_sinkhorn(cost().double(), THETA, mask, tol=1e-9, max_iter=20000, warn=False)
        return float(r.value), r.plan

    def clear():
        for t in leaves:
            t.grad = None

    return call, clear, info, reference


def memory_probe(method, B, D, M, masked, tol):
    """Run in a fresh process: peak RSS growth (MB) of one call over the data's baseline."""
    call, clear, _, _ = make_call(method, B, D, M, masked, torch.device("cpu"), tol)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    call()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny grid, for the smoke test")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048, 4096])
    p.add_argument("--dims", type=int, nargs="+", default=[512])
    p.add_argument("--classes", type=int, nargs="+", default=[10])
    p.add_argument("--cross-batch", type=int, default=512, help="B for the D × M cross (D ∈ 64/512/640, M ∈ 10/100)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget", type=float, default=20.0, help="skip larger B for a method once one call exceeds this (s)")
    p.add_argument("--memory-batch", type=int, default=4096, help="B of the peak-memory probe (D = 640, CPU)")
    p.add_argument("--out", default="benchmarks/results/solvers_cpu")
    p.add_argument("--_probe", nargs=5, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._probe:
        m, B, D, M, masked = a._probe
        print(json.dumps(memory_probe(m, int(B), int(D), int(M), masked == "1", a.tol)))
        return
    if a.quick:
        a.batch, a.cross_batch, a.repeats, a.memory_batch = [32, 64], 64, 2, 256
    device = torch.device(a.device)
    configs = [(B, a.dims[0], a.classes[0], masked) for masked in (False, True) for B in a.batch]
    configs += [(a.cross_batch, D, M, False) for D in (64, 512, 640) for M in (10, 100)
                if (a.cross_batch, D, M, False) not in configs]
    rows, over_budget = [], set()
    for B, D, M, masked in configs:
        ref = None
        for method in a.methods:
            key = (method, D, M, masked)
            if key in over_budget:
                rows.append(dict(method=method, B=B, D=D, M=M, mask=masked, skipped="over budget"))
                continue
            call, clear, info, reference = make_call(method, B, D, M, masked, device, a.tol)
            t = median_time(lambda: (clear(), call()), a.repeats if B <= 1024 else max(1, a.repeats // 2), device)
            row = dict(method=method, B=B, D=D, M=M, mask=masked, ms=1e3 * t)
            if "value" in info:
                if ref is None:
                    ref = reference()
                row.update(value_err=abs(info["value"] - ref[0]),
                           plan_err=float((info["plan"].double().cpu() - ref[1].cpu()).abs().sum()),
                           iterations=info["iterations"])
            rows.append(row)
            print(json.dumps(row), flush=True)
            if t > a.budget:
                over_budget.add(key)
    memory = {}
    if device.type == "cpu":
        for method in a.methods:
            out = subprocess.run([sys.executable, __file__, "--tol", str(a.tol), "--_probe", method,
                                  str(a.memory_batch), "640", "10", "0"], capture_output=True, text=True)
            memory[method] = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None
            print(method, "peak extra MB at B =", a.memory_batch, "D = 640:", memory[method], flush=True)
    write(a, rows, memory)


def write(a, rows, memory):
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    head = f"Machine: {machine()}. θ = {THETA}, tol = {a.tol} (L1 marginal error; POT: its own L2 test), fp32."
    out.with_suffix(".json").write_text(json.dumps({"machine": machine(), "rows": rows, "memory_mb": memory}, indent=1))
    lines = [f"# OT solver benchmark\n\n{head}\n", "| method | B | D | M | mask | ms / call | iterations | |value − ref| | L1 plan err |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['method']} | {r['B']} | {r['D']} | {r['M']} | {r['mask']} | {r['skipped']} | | | |")
            continue
        acc = (f"{r['iterations']} | {r['value_err']:.1e} | {r['plan_err']:.1e}" if "value_err" in r else " | | ")
        lines.append(f"| {r['method']} | {r['B']} | {r['D']} | {r['M']} | {r['mask']} | {r['ms']:.2f} | {acc} |")
    if memory:
        lines += ["", f"Peak extra memory of one call (MB, fresh process, B = {a.memory_batch}, D = 640, M = 10):", ""]
        lines += [f"- {m}: {v:.0f}" if v is not None else f"- {m}: failed" for m, v in memory.items()]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for ax, masked in zip(axes, (False, True)):
            for m in a.methods:
                pts = [(r["B"], r["ms"]) for r in rows if r["method"] == m and r["mask"] == masked
                       and r["D"] == a.dims[0] and r["M"] == a.classes[0] and "ms" in r]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=m)
            ax.set(xscale="log", yscale="log", xlabel="batch size B", title=f"D={a.dims[0]}, M={a.classes[0]}, mask={masked}")
            ax.grid(True, which="both", alpha=0.3)
        axes[0].set_ylabel("ms per call (fwd + bwd)")
        axes[0].legend()
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=120)
    except ImportError:
        pass
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
