"""Self-check of the optional Triton kernels (``got_reg/solvers/_triton.py``): correctness against plain
torch, then timings. Made for a single run on a GPU machine: every case is caught and reported, the
script always exits 0, and it prints its results as it goes (a killed run still shows what it reached).

    python benchmarks/triton_selfcheck.py            # CUDA: checks at several sizes + timings
    python benchmarks/triton_selfcheck.py --quick    # tiny checks, no timings (also on CPU: see below)
    python benchmarks/triton_selfcheck.py --aot      # no GPU needed: compile for sm_90, print registers

Without a CUDA device the kernels run through Triton's interpreter (TRITON_INTERPRET=1 is set here
before triton is imported), slowly: use ``--quick``. ``--aot`` compiles the kernels ahead of time for
an H100/H200 (sm_90) with the real compiler down to a cubin and prints registers, spills (local memory)
and shared memory per kernel, size and num_warps; it needs only triton's CUDA backend (ptxas ships in
the wheel). The kernels module is loaded from its file, so a half-finished package elsewhere cannot
stop this script.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "got_reg" / "solvers" / "_triton.py"


def load_kernels():
    spec = importlib.util.spec_from_file_location("got_reg_triton_kernels", KERNELS)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def say(*a):
    print(*a, flush=True)


# ------------------------------------------------------------------------------------ torch reference

# The eager reference loop and the problems, shared with tests/solvers/test_triton.py (independent of got_reg).
sys.path.insert(0, str(ROOT / "tests"))
from fused_reference import (  # noqa: E402
    REG,
    anderson_steps,
    annealing_sweeps,
    block_cost,
    got_cost,
    judge_fused,
    plan,
)

# ------------------------------------------------------------------------------------ checks


def check_row_lse(T, device, n, m, scale=-10.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = (3 * torch.rand(n, m, generator=g)).to(device)
    A[(torch.rand(n, m, generator=g) < 0.3).to(device)] = math.inf
    A[torch.arange(n, device=device), torch.randint(0, m, (n,), generator=g).to(device)] = 1.0
    w = (4 * torch.randn(m, generator=g)).to(device)
    out = T.row_lse(A, w, scale)
    ref = torch.logsumexp(torch.where(torch.isinf(A), -math.inf, w.double() + scale * A.double()), 1)
    dev = float((out.double() - ref).abs().max() / (1 + ref.abs().max()))
    return dev <= 2e-6, f"max |out - ref| / (1 + max |ref|) = {dev:.1e} (limit 2e-6)"


def check_fused(T, device, C64, theta, tol=1e-3, max_iter=1000, num_warps=None, same_path=False, **kw):
    """The fused kernel held to tests/fused_reference.py by its judge_fused (the same checks as the unit tests:
    an honest error, exact columns, the value within the gap its error allows of the exact one, or with
    ``same_path`` the reference's sweeps one for one), plus the with_plan epilogue against the plan, value
    and marginal error recomputed here from the launch's own potentials."""
    C = C64.to(device).float()
    u, v, it, err = T.sinkhorn_fused(C, theta, max_iter=max_iter, tol=tol, num_warps=num_warps, **kw)
    ok, detail = judge_fused(C64, theta, (u, v, it, err), max_iter=max_iter, tol=tol, same_path=same_path, **kw)
    n, m = C64.shape
    P = plan(u.cpu(), v.cpu(), C64.double().cpu(), theta)
    value = theta * float(u.double().mean() + v.double().mean())
    *_, Pk, value_k, merr_k = T.sinkhorn_fused(
        C, theta, max_iter=max_iter, tol=tol, num_warps=num_warps, with_plan=True, **kw
    )
    Pk = Pk.double().cpu()
    merr_ref = max(float((Pk.sum(1) - 1 / n).abs().sum()), float((Pk.sum(0) - 1 / m).abs().sum()))
    epilogue = max(
        float((Pk - P).abs().sum()),
        abs(float(value_k) - value) / max(abs(value), 1e-12),
        abs(float(merr_k) - merr_ref),
    )
    ok = ok and epilogue <= 1e-5
    return ok, f"iters {int(it)}, err {float(err):.2e}; {detail}; with_plan epilogue {epilogue:.1e} (limit 1e-5)"


def check_anderson(T, device, n, memory):
    """The torch loop's Anderson step in one launch (T.Anderson) against its definition written out in
    float64 (fused_reference.anderson_steps: ring, restart, mean 0), the unit test's tolerance."""
    acc = T.Anderson(torch.zeros(n, device=device), memory, REG[torch.float32])
    worst = 0.0
    for x, r, want in anderson_steps(n, memory, REG[torch.float32], seed=n + memory, dtype=torch.float32):
        got = acc.step(x.to(device), r.to(device)).double().cpu()
        worst = max(worst, float(((got - want).abs() / (2e-6 + 1e-5 * want.abs())).max()))
    return worst <= 1.0, f"max |out - ref| / (2e-6 + 1e-5 |ref|) = {worst:.2f} (limit 1)"


def run_case(results, name, fn):
    t0 = time.time()
    try:
        ok, detail = fn()
        status = "PASS" if ok else "FAIL"
    except Exception as e:  # report and go on: one broken case must not hide the others
        status, detail = "ERROR", f"{type(e).__name__}: {e}"
        traceback.print_exc(limit=4)
    results.append((name, status))
    say(f"  {status:5s} {name:42s} {detail}  [{time.time() - t0:.1f}s]")


# ------------------------------------------------------------------------------------ timings


def bench(fn, device, reps=50):
    """(GPU median ms by triton.testing.do_bench, host wall ms per call over `reps` back-to-back calls)."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    gpu = triton.testing.do_bench(fn, warmup=10, rep=200, return_mode="median")
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return gpu, (time.perf_counter() - t) * 1e3 / reps


def timings(T, device):
    say("\nTimings (GPU: do_bench median; wall: host ms per call, back-to-back, one sync at the end)")
    for n in (1024, 4096, 8192):
        try:
            g = torch.Generator(device=device).manual_seed(0)
            A = torch.rand(n, n, device=device, generator=g) * 5
            w = torch.randn(n, device=device, generator=g)
            out = torch.empty(n, device=device)
            s = -10.0
            gpu, wall = bench(lambda A=A, w=w, s=s, out=out: T.row_lse(A, w, s, out=out), device)
            tgpu, twall = bench(lambda A=A, w=w, s=s: torch.logsumexp(torch.add(w, A, alpha=s), 1), device)
            gbps = n * n * 4 / (gpu * 1e-3) / 1e9
            say(
                f"  row_lse     n = m = {n:5d}: {gpu * 1e3:8.1f} us ({gbps:6.0f} GB/s of A)  wall {wall * 1e3:8.1f} us"
                f" | torch logsumexp {tgpu * 1e3:8.1f} us"
            )
            # A whole plain sweep at this size: both halves (rows on C, columns on a contiguous Cᵀ).
            At = A.T.contiguous()
            u = torch.zeros(n, device=device)
            v = torch.zeros(n, device=device)

            def sweep(A=A, At=At, u=u, v=v, s=s):
                T.row_lse(At, u, s, out=v).neg_()
                T.row_lse(A, v, s, out=u).neg_()

            sgpu, _ = bench(sweep, device, reps=10)
            say(
                f"              one Sinkhorn sweep (2 x row_lse + 2 negs): {sgpu:.3f} ms"
                f" -> 200 sweeps {200 * sgpu:.1f} ms"
            )
            del A, At
        except Exception as e:
            say(f"  ERROR timing row_lse at {n}: {type(e).__name__}: {e}")
    for n, warps in ((64, None), (128, None), (128, 8), (256, None), (256, 16)):
        try:
            C = block_cost(n, seed=0, device=device).float()
            cfg = T.fused_config(n, n)
            # At most 200 sweeps: float32 cannot resolve the block problem's slow mode at n = 256 (neither
            # plain nor accelerated Sinkhorn reaches tol there), and its time per sweep is what is timed.
            u, v, it, err = T.sinkhorn_fused(C, 0.1, max_iter=200, tol=1e-3, num_warps=warps)
            it = int(it)
            gpu, wall = bench(
                lambda C=C, warps=warps: T.sinkhorn_fused(C, 0.1, max_iter=200, tol=1e-3, num_warps=warps), device
            )
            say(
                f"  fused solve n = m = {n:4d} (warps {warps or cfg['num_warps']:2d}, "
                f"{'registers' if cfg['RESIDENT'] else 'streamed'}): {gpu * 1e3:8.1f} us, wall {wall * 1e3:8.1f} us, "
                f"{it} sweeps = {gpu * 1e3 / max(it, 1):.2f} us/sweep, err {float(err):.1e}"
                f"{'' if float(err) <= 1e-3 else ' (max_iter: not converged)'}"
            )
        except Exception as e:
            say(f"  ERROR timing fused at {n} (warps {warps}): {type(e).__name__}: {e}")
    try:
        from got_reg.solvers.sinkhorn import _Anderson  # the eager step it replaces (B > 256)

        for n in (512, 8192):
            g = torch.Generator(device=device).manual_seed(0)
            x, r = torch.randn(n, device=device, generator=g), torch.randn(n, device=device, generator=g)
            fast, eager = T.Anderson(x, 8, 1e-4), _Anderson(x, 8, 1e-4)
            # A step's work does not depend on which slots are valid (both mask, neither branches); these
            # steps only compile, warm and fill the ring.
            for acc in (fast, eager):
                for _ in range(9):
                    acc.step(x, r * 0.999)
            kgpu, kwall = bench(lambda acc=fast, x=x, r=r: acc.step(x, r), device)
            egpu, ewall = bench(lambda acc=eager, x=x, r=r: acc.step(x, r), device)
            say(
                f"  anderson step n = {n:5d}: one launch {kgpu * 1e3:6.1f} us (wall {kwall * 1e3:6.1f} us) | "
                f"eager torch {egpu * 1e3:6.1f} us (wall {ewall * 1e3:6.1f} us)"
            )
    except Exception as e:
        say(f"  ERROR timing the Anderson step: {type(e).__name__}: {e}")


# ------------------------------------------------------------------------------------ ahead of time


AOT_FUSED = [
    (16, 16, None),
    (64, 64, None),
    (128, 128, None),
    (128, 128, 8),
    (96, 200, None),
    (256, 256, None),
    (256, 256, 16),
    (512, 512, None),
    (1024, 1024, None),  # FUSED_LIMIT: the largest the kernel takes
]
AOT_ROW_LSE = [(1024, 1024), (8192, 8192), (1000, 1000), (37, 129)]
AOT_QUICK_FUSED = [(16, 16, None), (128, 128, None), (256, 256, None), (1024, 1024, None)]
AOT_QUICK_ROW_LSE = [(8192, 8192), (37, 129)]
AOT_ANDERSON = [(512, 8), (8192, 8), (8192, 16)]


def _specialise(fn, args):
    """Signature, constexprs and attributes as Triton's launcher would derive them from these arguments."""
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import native_specialize_impl

    sig, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        a = args[p.name]
        if p.is_constexpr:
            sig[p.name], constexprs[p.name] = "constexpr", a
            continue
        ty, attr = native_specialize_impl(
            CUDABackend, a, False, not p.do_not_specialize, not p.do_not_specialize_on_alignment
        )
        if ty == "constexpr":  # an int equal to 1
            sig[p.name], constexprs[p.name] = "constexpr", a
            continue
        sig[p.name] = ty
        if attr:
            attrs[(i,)] = CUDABackend.parse_attr(attr)
    return sig, constexprs, attrs


def _resources(cubin: bytes):
    import subprocess
    import tempfile

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    line = next(ln for ln in out.splitlines() if "REG:" in ln)
    fields = dict(x.split(":", 1) for x in line.split() if ":" in x)
    return {
        "regs": int(fields["REG"]),
        "stack": int(fields["STACK"]),
        "local": int(fields["LOCAL"]),
        "shared_static": int(fields["SHARED"]),
    }


def aot(T, arch=90, quick=False):
    """Compile each kernel configuration for sm_`arch` (no GPU) and report its resources."""
    import triton
    from triton.backends.compiler import GPUTarget

    rows = []
    target = GPUTarget("cuda", arch, 32)

    def compile_one(kind, fn, args, num_warps, label):
        t0 = time.time()
        row = {"kernel": kind, "case": label, "num_warps": num_warps}
        try:
            sig, constexprs, attrs = _specialise(fn, args)
            src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
            cc = triton.compile(src, target=target, options={"num_warps": num_warps})
            row.update(_resources(cc.asm["cubin"]), shared=cc.metadata.shared, ok=True)
        except Exception as e:
            row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:2000]}")
        row["compile_s"] = round(time.time() - t0, 1)
        rows.append(row)
        if row["ok"]:
            say(
                f"  {kind:9s} {label:28s} warps {num_warps:2d}: {row['regs']:3d} regs, "
                f"spill stack {row['stack']:4d} B, "
                f"local {row['local']:4d} B, shared {row['shared']:6d} B  [{row['compile_s']}s]"
            )
        else:
            say(f"  {kind:9s} {label:28s} warps {num_warps:2d}: COMPILE ERROR {row['error']}")

    for n, m in AOT_QUICK_ROW_LSE if quick else AOT_ROW_LSE:
        bm, bn, warps = T._row_lse_config(n, m)
        A = torch.empty(n, m)
        args = dict(
            A=A, W=torch.empty(m), OUT=torch.empty(n), n=n, m=m, stride=A.stride(0), scale=-1.0, BLOCK_M=bm, BLOCK_N=bn
        )
        compile_one("row_lse", T._row_lse_kernel, args, warps, f"{n}x{m} block {bm}x{bn}")
    for n, m, warps in AOT_QUICK_FUSED if quick else AOT_FUSED:
        cfg = T.fused_config(n, m)
        bn, bm = cfg["BN"], cfg["BM"]
        args = dict(
            C=torch.empty(3, bn, bm),  # the debiased loss' stack of three problems
            n=n,
            m=m,
            WORK=torch.empty(3, 2 * bn + bm),
            IT=torch.empty(3, dtype=torch.int32),
            ERR=torch.empty(3),
            PLAN=torch.empty(3, bn, bm),
            STATS=torch.empty(3, 2),
            theta=0.1,
            s=-10.0,
            max_iter=1000,
            tol=1e-3,
            scaling=0.7,
            reg=1e-4,
            memory=8,
            log_a=-1.0,
            log_b=-1.0,
            BN=bn,
            BM=bm,
            H=cfg["H"],
            RESIDENT=cfg["RESIDENT"],
            MP=8,
            PATIENCE=T.PATIENCE,
            WRITE_PLAN=True,  # the library's variant (with_plan=True)
        )
        label = f"{n}x{m} ({bn}x{bm}, {'registers' if cfg['RESIDENT'] else 'streamed'})"
        compile_one("fused", T._sinkhorn_kernel, args, warps or cfg["num_warps"], label)
    for n, memory in AOT_ANDERSON[:1] if quick else AOT_ANDERSON:
        mp, block = T.anderson_config(n, memory)
        args = dict(
            X=torch.empty(n),
            R=torch.empty(n),
            OUT=torch.empty(n),
            DXF=torch.empty(memory, n),
            DF=torch.empty(memory, n),
            PREV=torch.empty(2, 2, n),
            GF=torch.empty(2, mp, mp),
            W=torch.empty(2, mp),
            RN=torch.empty(2),
            n=n,
            k=3,
            memory=memory,
            reg=1e-4,
            MP=mp,
            BLOCK=block,
        )
        compile_one("anderson", T._anderson_kernel, args, 4, f"n={n} memory={memory} block {block}")

    # The fused cosine + KL cost's two kernels (got_reg/costs/_triton_cosine_kl.py): GOT's batch sizes, a
    # small and a wide feature layer, 10 to 1000 classes.
    try:
        from got_reg.costs import _triton_cosine_kl as KC
    except Exception as e:
        rows.append(dict(kernel="cost", case="import", num_warps=0, ok=False, error=f"{type(e).__name__}: {e}"))
        return rows
    cost_cases = [(128, 512, 10)] if quick else [(128, 512, 10), (128, 16384, 1000), (1024, 2048, 100)]
    for B, D, M in cost_cases:
        cfg = KC.cost_config(D, M, B)
        blocks = f"blocks {cfg['BLOCK_D']}/{cfg['BLOCK_M']}"
        z, lg, za, lga = torch.empty(B, D), torch.empty(B, M), torch.empty(B, D), torch.empty(B, M)
        left, right, log_p, unit_adv = torch.empty(B, D + M), torch.empty(B, D + M), torch.empty(B, M), za
        vec = torch.empty(B)
        for same in (True, False):
            lp = right[:, D:] if same else log_p
            args = dict(
                Z=z,
                LG=lg,
                ZA=za,
                LGA=lga,
                LEFT=left,
                RIGHT=right,
                LOGP=lp,
                UNIT_ADV=unit_adv,
                ROW=vec,
                INV=vec,
                INV_ADV=vec,
                B=B,
                D=D,
                M=M,
                s_z=z.stride(0),
                s_lg=lg.stride(0),
                s_za=za.stride(0),
                s_lga=lga.stride(0),
                s_left=left.stride(0),
                s_right=right.stride(0),
                s_logp=lp.stride(0),
                s_ua=unit_adv.stride(0),
                lam=0.5,
                eps=1e-12,
                SAME=same,
                STORE_UNIT_ADV=not same,
                BLOCK_D=cfg["BLOCK_D"],
                BLOCK_M=cfg["BLOCK_M"],
            )
            label = f"{B}x{D}+{M} {'self' if same else 'cross'} {blocks}"
            compile_one("cost_prep", KC._prep_kernel, args, cfg["num_warps"], label)
        G = torch.empty(B, B)
        R, S = torch.empty(B, D + M), torch.empty(B, D + M)
        gz, gl = torch.empty(B, D), torch.empty(B, M)
        # Self-cost; cross with all four gradients; anchor="clean" (only the adversarial side's).
        for same, needs in ((True, (1, 1, 0, 0)), (False, (1, 1, 1, 1)), (False, (0, 0, 1, 1))):
            lp = right[:, D:] if same else log_p
            args = dict(
                G=G,
                R=R,
                S=S,
                LEFT=left,
                LOGP=lp,
                INV=vec,
                UNIT_ADV=unit_adv,
                INV_ADV=vec,
                LOGQ=right[:, D:],
                GZ=gz,
                GL=gl,
                GZA=gz,
                GLA=gl,
                n_clean=B,
                Bp=B,
                D=D,
                M=M,
                s_g0=G.stride(0),
                s_g1=G.stride(1),
                s_r=R.stride(0),
                s_s=S.stride(0),
                s_left=left.stride(0),
                s_logp=lp.stride(0),
                s_ua=unit_adv.stride(0),
                s_logq=right.stride(0),
                s_gz=gz.stride(0),
                s_gl=gl.stride(0),
                s_gza=gz.stride(0),
                s_gla=gl.stride(0),
                lam=0.5,
                SAME=same,
                NEED_Z=bool(needs[0]),
                NEED_L=bool(needs[1]),
                NEED_ZA=bool(needs[2]),
                NEED_LA=bool(needs[3]),
                BLOCK_D=cfg["BLOCK_D"],
                BLOCK_M=cfg["BLOCK_M"],
                BLOCK_G=cfg["BLOCK_G"],
            )
            kind = "self" if same else ("cross" if needs[0] else "cross adv-only")
            compile_one("cost_post", KC._post_kernel, args, cfg["num_warps"], f"{B}x{D}+{M} {kind} {blocks}")
    return rows


# ------------------------------------------------------------------------------------ main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick", action="store_true", help="tiny checks only, no timings (with --aot: fewer configurations)"
    )
    ap.add_argument("--aot", action="store_true", help="compile for sm_90 without a GPU and report resources")
    ap.add_argument("--arch", type=int, default=90, help="compute capability for --aot (90: H100/H200)")
    ap.add_argument("--json", action="store_true", help="with --aot: print the rows as JSON on the last line")
    ap.add_argument("--no-timings", action="store_true")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    if not cuda and not args.aot:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    try:
        T = load_kernels()
    except Exception as e:
        say(f"ERROR: could not load {KERNELS}: {type(e).__name__}: {e}")
        return 0
    import importlib.metadata as md

    def version(p):
        try:
            return md.version(p)
        except Exception:
            return "absent"

    if cuda:
        major, minor = torch.cuda.get_device_capability()
        device_name = f"{torch.cuda.get_device_name()} (sm_{major}{minor})"
    else:
        device_name = "cpu"
    say(
        f"torch {torch.__version__}, triton {version('triton')}, python {sys.version.split()[0]}, "
        f"device {device_name}, "
        f"interpreter {T.INTERPRET}"
    )
    if not T.available():
        say("triton is not importable: nothing to check (pip install triton)")
        if args.json:
            say(json.dumps([{"skipped": "triton not importable"}]))
        return 0

    if args.aot:
        if T.INTERPRET:
            say("ERROR: --aot needs TRITON_INTERPRET unset (compiled kernels)")
            return 0
        try:
            from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
        except Exception as e:
            say(f"triton's CUDA backend is unavailable ({e}): nothing to compile")
            if args.json:
                say(json.dumps([{"skipped": f"no CUDA backend: {e}"}]))
            return 0
        say(f"Ahead-of-time compilation for sm_{args.arch}")
        rows = aot(T, args.arch, quick=args.quick)
        if args.json:
            say(json.dumps(rows))
        return 0

    device = "cuda" if cuda else "cpu"
    if not cuda and not T.INTERPRET:
        say("no CUDA device and the kernels are compiled (TRITON_INTERPRET was set to 0): nothing to run")
        return 0
    quick = args.quick
    results = []
    say("\nrow_lse vs torch.logsumexp (float64), +inf entries")
    row_sizes = (
        [(1, 1), (7, 1000), (37, 129)]
        if quick
        else [
            (1, 1),
            (1, 5000),
            (7, 1000),
            (37, 129),
            (1000, 1000),
            (1024, 1024),
            (4096, 4096),
            (8192, 8192),
            (8191, 8193),
        ]
    )
    for n, m in row_sizes:
        run_case(results, f"row_lse {n}x{m}", lambda n=n, m=m: check_row_lse(T, device, n, m))

    say("\nsinkhorn_fused vs the torch loop (float32 path, float64 values)")
    fused = (
        [((7, 5), False), ((1, 7), False), ((32, 32), True)]
        if quick
        else [
            ((1, 1), False),
            ((1, 7), False),
            ((7, 1), False),
            ((7, 5), False),
            ((7, 7), True),
            ((32, 32), False),
            ((32, 32), True),
            ((64, 64), False),
            ((96, 128), True),
            ((128, 128), False),
            ((128, 128), True),
            ((200, 256), True),
            ((256, 256), False),
        ]
    )
    for (n, m), masked in fused:
        run_case(
            results,
            f"fused {n}x{m}{' masked' if masked else ''}",
            lambda n=n, m=m, masked=masked: check_fused(T, device, got_cost(n, m, seed=n + m, masked=masked), 0.1),
        )
    run_case(
        results,
        "fused 32x32 class blocks (accelerated)",
        lambda: check_fused(T, device, block_cost(32, seed=2), 0.1, tol=1e-4),
    )
    run_case(
        results,
        "fused 32x32 plain Sinkhorn, sweep for sweep",
        lambda: check_fused(T, device, got_cost(32, 32, seed=64, masked=True), 0.1, anderson=0, same_path=True),
    )
    if not quick:
        run_case(
            results,
            # Costs to 30 at theta = 0.1 and |u| in the hundreds: near float32's floor.
            "fused 128x128 class blocks (accelerated)",
            lambda: check_fused(T, device, block_cost(128, seed=0), 0.1),
        )
        run_case(
            results,
            "fused 128x128 warps 8",
            lambda: check_fused(T, device, got_cost(128, 128, seed=1), 0.1, num_warps=8),
        )
        run_case(
            results,
            "fused 256x256 warps 16",
            lambda: check_fused(T, device, got_cost(256, 256, seed=1), 0.1, num_warps=16),
        )
        C = got_cost(16, 24, seed=2)
        anneal = annealing_sweeps(C, 0.1)
        run_case(
            results,
            "fused max_iter inside annealing",
            lambda: check_fused(T, device, C, 0.1, max_iter=anneal - 3, tol=1e-9, same_path=True),
        )
        run_case(
            results,
            "fused max_iter after 9 accelerated sweeps",
            lambda: check_fused(T, device, C, 0.1, max_iter=anneal + 9, tol=1e-9, same_path=True),
        )

    say("\nAnderson step of the torch loop (one launch) vs its definition (float64)")
    for n, memory in [(37, 3), (300, 8)] if quick else [(1, 1), (37, 3), (300, 8), (1300, 16), (8192, 8)]:
        run_case(
            results, f"anderson n={n} memory={memory}", lambda n=n, memory=memory: check_anderson(T, device, n, memory)
        )

    n_pass = sum(s == "PASS" for _, s in results)
    say(f"\nSummary: {n_pass} passed, {len(results) - n_pass} failed or errored")
    for name, status in results:
        if status != "PASS":
            say(f"  {status}: {name}")
    if cuda and not quick and not args.no_timings:
        try:
            timings(T, device)
        except Exception as e:
            say(f"ERROR in timings: {type(e).__name__}: {e}")
    return 0


if __name__ == "__main__":
    try:
        main()
    except BaseException:  # never fail the caller (KeyboardInterrupt and SystemExit from argparse aside)
        traceback.print_exc()
        if sys.exc_info()[0] in (KeyboardInterrupt,):
            raise
    sys.exit(0)
