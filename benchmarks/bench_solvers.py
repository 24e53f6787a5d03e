"""Per-call cost of the OT solvers: time (forward + backward, cost matrix included), accuracy, memory.

    .venv/bin/python benchmarks/bench_solvers.py --threads 1             # CPU results in benchmarks/results/
    .venv/bin/python benchmarks/bench_solvers.py --quick --out /tmp/s    # < 1 minute smoke run
    .venv/bin/python benchmarks/bench_solvers.py --device cuda --out benchmarks/results/solvers_gpu

Methods (same adversarial-like batch: z_adv = z + noise, logits_adv = logits + noise, near-diagonal plan):
  matmul     a same-size fp32 matmul (B×D @ D×B): the hardware reference
  cost       joint_cost alone (cosine + KL), forward + backward
  torch      got-reg's log-domain Sinkhorn (default backend), envelope gradient
  pot        POT ot.solve(method="sinkhorn_log", grad="envelope") called directly, stopThr = tol
  pot-eq     the same with stopThr = tol/√B: POT tests the L2 norm of the column error, got-reg the
             L1 norm of the row error, and ‖e‖₁ ≤ √B‖e‖₂, so this gives POT the same guarantee
  pot-lib    got-reg's backend="pot" (what a user of GOTRegularizer(backend="pot") gets)
  geomloss   got-reg's GeomLoss backend (SamplesLoss, fixed ε-scaling schedule)
  dual-step  one Adam step on the learned potential + semi-dual value forward + backward
Accuracy: |value − ref| and the L1 plan (= gradient) error against a float64 Newton solve of the same
cost (marginal error ~1e-15, see _common.newton_reference), for B ≤ --accuracy-max-batch.
Also written: iterations to tolerance for random vs near-diagonal clouds, per-iteration time against
a memory-streaming bound, peak extra memory per method in a fresh process (VmHWM; CUDA: max allocated).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import adversarial_batch, load, machine, median_time, newton_reference, peak_extra_mb, set_threads, sync  # noqa: E402

from got_reg import GOTConvergenceWarning  # noqa: E402
from got_reg.functional import joint_cost, label_mask  # noqa: E402
from got_reg.solvers.sinkhorn import _RowLogSumExp  # noqa: E402
from got_reg.solvers import (  # noqa: E402
    KantorovichPotential, entropic_ot, marginal_error, semidual_value_and_plan, solve_sinkhorn,
)

THETA = 0.1
METHODS = ("matmul", "cost", "torch", "pot", "pot-eq", "pot-lib", "geomloss", "dual-step")
SOLVED = ("torch", "pot", "pot-eq", "pot-lib", "geomloss", "dual-step")
warnings.simplefilter("ignore", GOTConvergenceWarning)
warnings.filterwarnings("ignore", message="Sinkhorn did not converge")


def pot_tol(method, tol, B):
    return tol / math.sqrt(B) if method == "pot-eq" else tol


def pot_cost(C, mask):
    """POT has no −∞ entries: forbidden pairs get a finite cost whose plan entry underflows to 0."""
    if mask is None:
        return C
    return C.masked_fill(~mask, float(C.detach()[mask].max()) + 1000 * THETA)


def make_call(method, B, D, M, masked, device, tol, max_iter, near=True):
    z, za, lg, lga, y = adversarial_batch(B, D, M, device, near=near)
    mask = label_mask(y) if masked else None
    leaves = [t.requires_grad_(True) for t in (z, za, lg, lga)]
    info = {}

    def cost():
        return joint_cost(z, za, lg, lga)

    if method == "matmul":
        zd, zad = z.detach(), za.detach()

        def call():
            return zd @ zad.T
    elif method == "cost":
        def call():
            cost().sum().backward()
    elif method in ("torch", "geomloss", "pot-lib"):
        backend = "pot" if method == "pot-lib" else method

        def call():
            v, res = entropic_ot(cost(), THETA, mask, backend=backend, tol=tol, max_iter=max_iter, warn=False)
            v.backward()
            info.update(value=float(v.detach()), plan=res.plan, iterations=res.iterations)
    elif method in ("pot", "pot-eq"):
        import ot

        def call():
            C = pot_cost(cost(), mask)
            res = ot.solve(C, reg=THETA, method="sinkhorn_log", grad="envelope", tol=pot_tol(method, tol, B),
                           max_iter=max_iter)
            res.value.backward()
            info.update(value=float(res.value), plan=res.plan.detach(), iterations=-1)
    elif method == "dual-step":
        pot = KantorovichPotential(lr=1e-2)
        pot.build(D, device, torch.float32)

        def call():
            C = cost()
            pot.ascend(z.detach(), C.detach(), THETA, mask)
            v, plan = semidual_value_and_plan(C, pot(z, detach_params=True), THETA, mask)
            v.backward()
            info.update(value=float(v.detach()), plan=plan, iterations=1)
    else:
        raise ValueError(method)

    def clear():
        for t in leaves:
            t.grad = None

    def run():
        clear()
        call()

    return run, info, cost, mask


def pot_iterations(cost, mask, tol, max_iter):
    """POT's iteration count (ot.solve does not report it): the same sinkhorn_log call with log=True."""
    import ot

    C = pot_cost(cost.detach(), mask)
    B, Bp = C.shape
    a, b = torch.full((B,), 1.0 / B, dtype=C.dtype), torch.full((Bp,), 1.0 / Bp, dtype=C.dtype)
    _, log = ot.bregman.sinkhorn_log(a, b, C, THETA, numItermax=max_iter, stopThr=tol, log=True, warn=False)
    return int(log["niter"]) + 1


# -- the same solver without got-reg's CPU log-sum-exp and over-relaxation (got-reg's code before 0.1) -----
# On this CPU torch's vectorised exp() of arguments below about −87 (fp32 results that are subnormal or 0)
# takes a slow path, 10–40× slower per element than in-range arguments, and every B×B temporary of a
# log-sum-exp goes through the allocator (mmap + page faults above 128 kB) and through memory. got-reg
# floors the exponent (a term below e^−87 cannot change a sum ≥ 1) and works in 1 MB row blocks of one
# reused buffer (got_reg.solvers.sinkhorn._RowLogSumExp). This plain version measures what that saves.
@torch.no_grad()
def sinkhorn_plain(cost, theta, mask=None, *, max_iter=1000, tol=1e-3, scaling=0.8):
    """got_reg.solvers.sinkhorn.sinkhorn_log_torch line for line, with torch.logsumexp on B×B temporaries."""
    B, Bp = cost.shape
    log_a, log_b = -math.log(B), -math.log(Bp)
    C = cost if mask is None else cost.masked_fill(~mask, math.inf)
    it = 0
    finite = C[torch.isfinite(C)]
    eps = float(finite.max() - finite.min())
    g = torch.zeros(Bp, dtype=C.dtype, device=C.device)
    while eps > theta and it < max_iter:
        f = -eps * (torch.logsumexp((g[None, :] - C) / eps, dim=1) + log_b)
        g = -eps * (torch.logsumexp((f[:, None] - C) / eps, dim=0) + log_a)
        eps *= scaling
        it += 1
    v = g / theta
    M = C / (-theta)
    u = -torch.logsumexp(M + v[None, :], dim=1) - log_b
    err = math.inf
    while it < max_iter:
        v = -torch.logsumexp(M + u[:, None], dim=0) - log_a
        it += 1
        lse_row = torch.logsumexp(M + v[None, :], dim=1)
        err = float(torch.expm1(u + lse_row + log_b).abs().mean())
        if err <= tol:
            break
        u = -lse_row - log_b
    value = theta * (u.mean() + v.mean())
    plan = torch.exp(M + u[:, None] + v[None, :] + (log_a + log_b))
    return value, plan, it, err


def bandwidth_rows(batches, device, repeats):
    """Per-iteration cost of the torch solver's loop body (library and plain) against a streaming bound."""
    rows = []
    for B in batches:
        z, za, lg, lga, y = adversarial_batch(B, 512, 10, device)
        C = joint_cost(z, za, lg, lga)
        v = solve_sinkhorn(C, THETA, max_iter=30, warn=False).log_v  # potentials of realistic size
        Mx = C / -THETA
        u = -torch.logsumexp(Mx + v[None, :], 1) + math.log(B)
        rows_lse, cols_lse = _RowLogSumExp(C), _RowLogSumExp(C.T.contiguous())
        r = max(3, repeats)
        t_read = median_time(lambda: Mx.sum(), r, device)
        t_exp = median_time(lambda: Mx.exp().sum(), r, device)
        # The arithmetic bound: B² exp() of in-range arguments (no slow path), written in place.
        Y = torch.rand(B, B, generator=torch.Generator().manual_seed(0)).to(device) * -80
        Yb = torch.empty_like(Y)
        t_exp_fast = median_time(lambda: torch.exp(Y, out=Yb), r, device)
        t_plain = median_time(lambda: (torch.logsumexp(Mx + u[:, None], 0), torch.logsumexp(Mx + v[None, :], 1)), r, device)
        t_lib = median_time(lambda: (cols_lse(u, -1 / THETA), rows_lse(v, -1 / THETA)), r, device)
        rows.append(dict(B=B, read_ms=1e3 * t_read, read_GBps=4 * B * B / t_read / 1e9, exp_sum_ms=1e3 * t_exp,
                         bound_ms=2e3 * t_read, exp_bound_ms=2e3 * t_exp_fast, iter_plain_ms=1e3 * t_plain, iter_lib_ms=1e3 * t_lib))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny grid, for the smoke test")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--batch", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048, 4096])
    p.add_argument("--dim", type=int, default=512, help="D of the B sweep")
    p.add_argument("--classes", type=int, default=10, help="M of the B sweep")
    p.add_argument("--cross-batch", type=int, default=512, help="B of the D × M cross (0: no cross)")
    p.add_argument("--cross-dims", type=int, nargs="+", default=[64, 512, 640])
    p.add_argument("--cross-classes", type=int, nargs="+", default=[10, 100])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--tol", type=float, default=1e-3, help="got-reg's default (L1 marginal error)")
    p.add_argument("--max-iter", type=int, default=1000, help="got-reg's default, also given to POT")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per config, after one warm-up call")
    p.add_argument("--big-batch", type=int, default=1024,
                   help="above this B: only --big-methods, one call each with no warm-up")
    p.add_argument("--big-methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--budget", type=float, default=20.0,
                   help="once one call of a method takes longer (s), larger B are skipped for it")
    p.add_argument("--accuracy-max-batch", type=int, default=1024, help="largest B with a float64 Newton reference")
    p.add_argument("--iteration-batches", type=int, nargs="+", default=[128, 512, 1024],
                   help="B of the iterations-to-tolerance table (random vs near-diagonal)")
    p.add_argument("--memory-batch", type=int, default=4096, help="B of the peak-memory probe (D = 640, M = 10)")
    p.add_argument("--memory-methods", nargs="+", default=None, help="default: all methods")
    p.add_argument("--memory-max-iter", type=int, default=30,
                   help="max_iter of the memory probe: the envelope gradient unrolls nothing, so the peak does not "
                        "grow with the iterations, and a few dozen keep the B = 4096 probe short")
    p.add_argument("--out", default="benchmarks/results/solvers_cpu")
    p.add_argument("--from-log", help="rebuild the tables from the stdout of an interrupted run (same flags)")
    p.add_argument("--_probe", nargs=5, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.from_log:
        return rebuild(a)
    if a.quick:
        a.batch, a.cross_batch, a.cross_dims, a.cross_classes = [32], 32, [64], [100]
        a.accuracy_max_batch = max(a.batch)
        a.repeats, a.memory_batch, a.iteration_batches = 2, 256, [32]
        a.memory_methods = a.memory_methods or ["torch"]
        a.threads = a.threads or 1
    set_threads(a.threads)
    if a._probe:
        m, B, D, M, masked = a._probe
        print(json.dumps(memory_probe(m, int(B), int(D), int(M), masked == "1", a.tol, a.max_iter, a.device)))
        return
    device = torch.device(a.device)
    load_before = load()
    t0 = time.time()

    configs = [(B, a.dim, a.classes, masked) for masked in (False, True) for B in a.batch]
    if a.cross_batch:
        configs += [(a.cross_batch, D, M, False) for D in a.cross_dims for M in a.cross_classes
                    if (a.cross_batch, D, M, False) not in configs]
    rows, over_budget = [], {}
    for B, D, M, masked in configs:
        ref = None
        for method in a.methods:
            key = (method, D, M, masked)
            if B > a.big_batch and method not in a.big_methods:
                continue
            if key in over_budget:
                rows.append(dict(method=method, B=B, D=D, M=M, mask=masked,
                                 skipped=f"skipped (> {a.budget:g} s at B = {over_budget[key]})"))
                print(json.dumps(rows[-1]), flush=True)
                continue
            run, info, cost, mask = make_call(method, B, D, M, masked, device, a.tol, a.max_iter)
            ts = []
            reps = a.repeats + 1 if B <= a.big_batch else 1
            for _ in range(reps):  # the first call is the warm-up (dropped unless it is the only one)
                sync(device)
                t = time.perf_counter()
                run()
                sync(device)
                ts.append(time.perf_counter() - t)
                if ts[0] > a.budget:
                    break
            ts = ts[1:] or ts
            row = dict(method=method, B=B, D=D, M=M, mask=masked, ms=1e3 * statistics.median(ts),
                       ms_min=1e3 * min(ts), repeats=len(ts))
            if "value" in info:
                plan = info["plan"]
                row["marginal_err"] = marginal_error(plan.double())
                it = info["iterations"]
                if method in ("pot", "pot-eq", "pot-lib"):
                    it = pot_iterations(cost(), mask, pot_tol(method, a.tol, B), a.max_iter)
                row["iterations"] = it
                if B <= a.accuracy_max_batch:
                    if ref is None:
                        rv, rp, _, rerr = newton_reference(cost(), THETA, mask)
                        ref = (rv, rp.cpu(), rerr)
                    row.update(value_err=abs(info["value"] - ref[0]),
                               plan_err=float((plan.double().cpu() - ref[1]).abs().sum()), ref_err=ref[2])
            rows.append(row)
            print(json.dumps(row), flush=True)
            if max(ts) > a.budget:
                over_budget[key] = B

    iters = iteration_rows(a, device)
    bw = bandwidth_rows([B for B in a.batch if B >= 256] or a.batch[-1:], device, a.repeats)
    plain = plain_rows(a, device)
    agree = reference_check(a, device)
    memory = {}
    for method in (a.memory_methods or a.methods):
        cmd = [sys.executable, __file__, "--tol", str(a.tol), "--max-iter", str(a.memory_max_iter), "--device", a.device,
               "--threads", str(a.threads), "--_probe", method, str(a.memory_batch), "640", "10", "0"]
        out = subprocess.run(cmd, capture_output=True, text=True)
        memory[method] = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None
        print(method, "peak extra MB at B =", a.memory_batch, "D = 640:", memory[method], flush=True)
    env = dict(machine=machine(), load_before=load_before, load_after=load(), minutes=(time.time() - t0) / 60,
               theta=THETA, tol=a.tol, max_iter=a.max_iter, threads=torch.get_num_threads())
    write(a, env, rows, iters, bw, plain, agree, memory)


def rebuild(a):
    """Tables from the JSON lines an interrupted run printed (each section prints one line per row)."""
    rows, iters, bw, plain, agree, memory = [], [], [], [], [], {}
    for line in Path(a.from_log).read_text().splitlines():
        if " peak extra MB at B = " in line:
            m, v = line.split(" peak extra MB", 1)[0], line.rsplit(":", 1)[1].strip()
            memory[m] = None if v == "None" else float(v)
            continue
        if not line.startswith("{"):
            continue
        r = json.loads(line)
        ({"method": rows, "cloud": iters, "read_ms": bw, "iterations_lib": plain, "newton_steps": agree}
         [next(k for k in ("newton_steps", "method", "cloud", "read_ms", "iterations_lib") if k in r)]).append(r)
    agree_iters = [r for r in iters if "newton_steps" not in r]
    set_threads(a.threads)
    env = dict(machine=machine(), load_before="(rebuilt from a log)", load_after=load(), minutes=float("nan"),
               theta=THETA, tol=a.tol, max_iter=a.max_iter, threads=torch.get_num_threads())
    write(a, env, rows, agree_iters, bw, plain, agree, memory)


def memory_probe(method, B, D, M, masked, tol, max_iter, device):
    """Fresh process: peak memory of one call (fwd + bwd) above what the data and a warm-up left resident."""
    device = torch.device(device)
    warm, _, _, _ = make_call(method, 64, D, M, masked, device, tol, max_iter)
    warm()  # imports and lazy state, at a size that leaves nothing B×B-sized resident
    run, _, _, _ = make_call(method, B, D, M, masked, device, tol, max_iter)
    if device.type == "cuda":
        run()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    return peak_extra_mb(run)


def iteration_rows(a, device):
    """Iterations to tolerance, fp32, no mask: random clouds vs near-diagonal (adversarial-like) pairs."""
    rows = []
    for B in a.iteration_batches:
        for near in (False, True):
            z, za, lg, lga, y = adversarial_batch(B, a.dim, a.classes, device, near=near)
            C = joint_cost(z, za, lg, lga)
            row = dict(B=B, cloud="near-diagonal" if near else "random",
                       cost_min=float(C.min()), cost_max=float(C.max()))
            for tol in (a.tol, a.tol / 10):
                r = solve_sinkhorn(C, THETA, tol=tol, max_iter=5 * a.max_iter, warn=False)
                row[f"torch@{tol:g}"] = r.iterations if r.converged else f">{r.iterations}"
            for name, tol in ((f"pot@{a.tol:g}", a.tol), ("pot@tol/√B", a.tol / math.sqrt(B))):
                n = pot_iterations(C, None, tol, 5 * a.max_iter)
                row[name] = n if n < 5 * a.max_iter else f">{n}"
            r = solve_sinkhorn(C, THETA, backend="geomloss", tol=a.tol, warn=False)
            row["geomloss (fixed)"] = r.iterations
            row["geomloss marginal err"] = r.marginal_error
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def plain_rows(a, device):
    """The whole torch solve, interleaved: library (blocked log-sum-exp, over-relaxed), library with
    relax=1 (plain Sinkhorn maps), and the plain torch.logsumexp solver above."""
    from got_reg.solvers.sinkhorn import sinkhorn_log_torch

    rows = []
    for B in [B for B in a.batch if 256 <= B <= a.accuracy_max_batch] or a.batch[-1:]:
        for masked in (False, True):
            z, za, lg, lga, y = adversarial_batch(B, a.dim, a.classes, device)
            C = joint_cost(z, za, lg, lga)
            mask = label_mask(y) if masked else None
            kw = dict(tol=a.tol, max_iter=a.max_iter)
            fns = {"lib": lambda: sinkhorn_log_torch(C, THETA, mask, **kw),
                   "lib relax=1": lambda: sinkhorn_log_torch(C, THETA, mask, relax=1.0, **kw),
                   "plain": lambda: sinkhorn_plain(C, THETA, mask, **kw)}
            lib, lib1 = fns["lib"](), fns["lib relax=1"]()
            val, plan, it, err = fns["plain"]()
            row = dict(B=B, mask=masked, iterations_lib=lib.iterations, iterations_relax1=lib1.iterations,
                       iterations_plain=it, value_diff_lib=abs(float(lib.value) - float(val)),
                       value_diff_relax1=abs(float(lib1.value) - float(val)),
                       plan_diff_L1_lib=float((lib.plan - plan).abs().sum()))
            ts = {n: [] for n in fns}
            for _ in range(max(1, a.repeats)):
                for n, fn in fns.items():
                    sync(device)
                    t = time.perf_counter()
                    fn()
                    sync(device)
                    ts[n].append(time.perf_counter() - t)
            for n in fns:
                row[f"{n} ms"] = 1e3 * statistics.median(ts[n])
            row["speed-up lse"] = row["plain ms"] / row["lib relax=1 ms"]
            row["speed-up total"] = row["plain ms"] / row["lib ms"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def reference_check(a, device):
    """Do the float64 references agree? Newton vs POT sinkhorn_log (tol 1e-12) vs torch (tol 1e-10)."""
    import ot

    B = 32 if a.quick else 128
    rows = []
    for near in (False, True):
        z, za, lg, lga, y = adversarial_batch(B, a.dim, a.classes, device, near=near)
        C = joint_cost(z, za, lg, lga).double()
        nv, nP, steps, nerr = newton_reference(C, THETA)
        max_iter = 300 if a.quick else 20000
        t = solve_sinkhorn(C, THETA, tol=1e-10, max_iter=max_iter, warn=False)
        pr = ot.solve(C, reg=THETA, method="sinkhorn_log", tol=1e-12, max_iter=max_iter)
        rows.append(dict(B=B, cloud="near-diagonal" if near else "random", newton_steps=steps, newton_err=nerr,
                         torch_iters=t.iterations, torch_err=t.marginal_error,
                         torch_value_diff=abs(float(t.value) - nv), torch_plan_diff=float((t.plan - nP).abs().sum()),
                         pot_err=marginal_error(pr.plan), pot_value_diff=abs(float(pr.value) - nv),
                         pot_plan_diff=float((pr.plan - nP).abs().sum())))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _fmt(x, spec=".1e"):
    if x is None:
        return ""
    return format(x, spec) if isinstance(x, float) else str(x)


def table(rows, cols):
    lines = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k), s) if s else str(r.get(k, "")) for (_, (k, s)) in
                                       ((c, ks) for c, ks in cols)) + " |")
    return lines


def write(a, env, rows, iters, bw, plain, agree, memory):
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(env=env, machine=env["machine"], rows=rows, iterations=iters,
                                                        bandwidth=bw, plain_vs_lib=plain, reference_check=agree,
                                                        memory_mb=memory), indent=1, default=str))
    L = [f"# OT solver benchmark\n",
         f"Machine: {env['machine']}; {env['load_before']} at the start, {env['load_after']} at the end "
         f"(shared machine), {env['minutes']:.0f} min. θ = {THETA}, tol = {a.tol} (got-reg: L1 row-marginal error; "
         f"POT: L2 column error, see pot-eq), max_iter = {a.max_iter}, fp32, adversarial-like (near-diagonal) "
         f"batches. Times: median of the repeats after one warm-up call, forward + backward, cost matrix included "
         f"(except matmul). Errors against a float64 Newton reference (L1 marginal error ≤ 1e-13), B ≤ "
         f"{a.accuracy_max_batch}.\n"]
    disp = []
    for r in rows:
        d = dict(r)
        d["ms"] = r.get("skipped") or f"{r['ms']:.2f}"
        disp.append(d)
    L += ["## Time per call and accuracy\n"]
    L += table(disp, [("method", ("method", None)), ("B", ("B", None)), ("D", ("D", None)), ("M", ("M", None)),
                      ("mask", ("mask", None)), ("ms / call", ("ms", None)), ("iterations", ("iterations", None)),
                      ("marginal err (L1)", ("marginal_err", ".1e")), ("abs value err", ("value_err", ".1e")),
                      ("L1 plan err", ("plan_err", ".1e"))])
    L += ["", "## Speed-up of the default solver (torch) over POT, same B, D, M, mask\n",
          "| B | D | M | mask | torch ms | pot ms | pot-eq ms | pot / torch | pot-eq / torch | torch plan err | "
          "pot plan err | pot-eq plan err |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    by = {(r["method"], r["B"], r["D"], r["M"], r["mask"]): r for r in rows}
    for (m, B, D, M, mk), r in by.items():
        if m != "torch" or "ms" not in r:
            continue
        pe = by.get(("pot", B, D, M, mk), {})
        pq = by.get(("pot-eq", B, D, M, mk), {})

        def ratio(x):
            return f"{x['ms'] / r['ms']:.2f}×" if "ms" in x else x.get("skipped", "")

        L.append(f"| {B} | {D} | {M} | {mk} | {r['ms']:.1f} | {_fmt(pe.get('ms'), '.1f') or pe.get('skipped', '')} | "
                 f"{_fmt(pq.get('ms'), '.1f') or pq.get('skipped', '')} | {ratio(pe)} | {ratio(pq)} | "
                 f"{_fmt(r.get('plan_err'))} | {_fmt(pe.get('plan_err'))} | {_fmt(pq.get('plan_err'))} |")
    L += ["", "## Dual step vs Sinkhorn solve (time ratio torch / dual-step)\n",
          "Both calls include the cost matrix (forward + backward), which they share; 'without cost' subtracts the "
          "`cost` row's median from each, i.e. compares the solvers alone.\n",
          "| B | D | M | mask | torch ms | dual-step ms | ratio | cost ms | ratio without cost |",
          "|---|---|---|---|---|---|---|---|---|"]
    for (m, B, D, M, mk), r in by.items():
        d = by.get(("dual-step", B, D, M, mk), {})
        c = by.get(("cost", B, D, M, mk), {})
        if m == "torch" and "ms" in r and "ms" in d:
            solo = ""
            if "ms" in c and d["ms"] > c["ms"]:
                solo = f"{(r['ms'] - c['ms']) / (d['ms'] - c['ms']):.1f}×"
            cost_ms = f"{c['ms']:.1f}" if "ms" in c else ""
            L.append(f"| {B} | {D} | {M} | {mk} | {r['ms']:.1f} | {d['ms']:.1f} | {r['ms'] / d['ms']:.1f}× | {cost_ms} | {solo} |")
    if iters:
        L += ["", "## Iterations to tolerance (fp32, no mask; POT counts its own L2 test)\n"]
        L += table(iters, [(k, (k, ".1e" if isinstance(iters[0][k], float) else None)) for k in iters[0]])
    if agree:
        L += ["", "## Do the float64 references agree? (Newton vs Sinkhorn run to tight tolerances)\n"]
        L += table(agree, [(k, (k, ".1e" if isinstance(agree[0][k], float) else None)) for k in agree[0]])
    if bw:
        L += ["", "## Per-iteration time against a streaming bound (fp32 B×B, no mask)\n",
              "An iteration reads the B×B matrix at least twice (one log-sum-exp per side): bound = 2 × time of "
              "`x.sum()`; exp bound = 2 × time of an in-place exp() of B² in-range fp32 arguments (the arithmetic every "
              "iteration must do). iter plain = the loop body with `torch.logsumexp(M + u[:, None], 0)` and "
              "`torch.logsumexp(M + v, 1)` on B×B temporaries; iter lib = got-reg's loop body (`_RowLogSumExp` on C "
              "and Cᵀ: 1 MB row blocks of one reused buffer, exponent floored at −87). x = the solver's own −C/θ plus "
              "potentials. Solve/iter = torch solve time (table above, cost + backward included) / iterations.\n"]
        solve = {r["B"]: r for r in rows if r["method"] == "torch" and not r["mask"] and r["D"] == a.dim
                 and r["M"] == a.classes and "ms" in r}
        for r in bw:
            s = solve.get(r["B"])
            r["solve_per_iter_ms"] = s["ms"] / s["iterations"] if s and s.get("iterations", 0) > 0 else None
            r["plain / bound"] = r["iter_plain_ms"] / r["bound_ms"]
            r["lib / bound"] = r["iter_lib_ms"] / r["bound_ms"]
            r["lib / exp bound"] = r["iter_lib_ms"] / r["exp_bound_ms"] if "exp_bound_ms" in r else None
        L += table(bw, [("B", ("B", None)), ("read ms", ("read_ms", ".3f")), ("read GB/s", ("read_GBps", ".1f")),
                        ("x.exp().sum() ms", ("exp_sum_ms", ".3f")), ("bound ms", ("bound_ms", ".3f")),
                        ("iter plain ms", ("iter_plain_ms", ".3f")), ("iter lib ms", ("iter_lib_ms", ".3f")),
                        ("solve/iter ms", ("solve_per_iter_ms", ".3f")), ("plain / bound", ("plain / bound", ".1f")),
                        ("lib / bound", ("lib / bound", ".1f")), ("exp bound ms", ("exp_bound_ms", ".3f")),
                        ("lib / exp bound", ("lib / exp bound", ".1f"))])
    if plain:
        L += ["", "## Whole torch solve (no cost, no backward, interleaved, median): library vs library with "
                  "relax=1 (plain Sinkhorn maps, same blocked log-sum-exp) vs the plain torch.logsumexp solver "
                  "(`sinkhorn_plain`, got-reg's solver before 0.1)\n"]
        L += table(plain, [(k, (k, ".1f" if k.endswith("ms") or k.startswith("speed") else
                                (".1e" if "diff" in k else None))) for k in plain[0]])
    if memory:
        L += ["", f"## Peak extra memory of one call (MB; fresh process, B = {a.memory_batch}, D = 640, M = 10, "
              f"max_iter = {a.memory_max_iter}, above the resident size before the call; warm-up at B = 64)\n", "| method | MB |", "|---|---|"]
        L += [f"| {m} | {v:.0f} |" if v is not None else f"| {m} | failed |" for m, v in memory.items()]
    out.with_suffix(".md").write_text("\n".join(L) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for ax, masked in zip(axes, (False, True)):
            for m in a.methods:
                pts = [(r["B"], r["ms"]) for r in rows if r["method"] == m and r["mask"] == masked
                       and r["D"] == a.dim and r["M"] == a.classes and "ms" in r]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=m)
            ax.set(xscale="log", yscale="log", xlabel="batch size B",
                   title=f"D={a.dim}, M={a.classes}, label mask={masked}")
            ax.grid(True, which="both", alpha=0.3)
        axes[0].set_ylabel("ms per call (fwd + bwd)")
        axes[0].legend(fontsize=8)
        fig.suptitle(env["machine"], fontsize=8)
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=120)
    except ImportError:
        pass
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
