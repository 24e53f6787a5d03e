"""The optional Triton kernels (:mod:`got_reg.solvers._triton`) against plain-torch references.

Without a CUDA device the kernels run on CPU tensors through Triton's interpreter (tests/interpreted.py). The
ahead-of-time compilation for sm_90 (the real compiler down to a cubin, no GPU needed) and the GPU
self-check script run in subprocesses with their own environments.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import fused_reference
import pytest
import torch
from fused_reference import (
    annealing_sweeps,
    block_cost,
    got_cost,
    judge_fused,
    label_mask,
    reference_solve,
    value_gap_bound,
)
from interpreted import CUDA, DEVICE, kernel_modules

(T,) = kernel_modules("got_reg.solvers._triton")
ROOT = Path(__file__).resolve().parents[2]
SELFCHECK = ROOT / "benchmarks" / "triton_selfcheck.py"


# ---------------------------------------------------------------------------------------- reference


def test_the_reference_follows_the_solver_schedule():
    """tests/fused_reference.py's loop takes the schedule as arguments whose defaults must be the kernel's
    and the torch solver's."""
    import inspect

    from got_reg.solvers import sinkhorn

    def defaults(fn, *names):
        params = inspect.signature(fn).parameters
        return tuple(params[k].default for k in names)

    ref = defaults(reference_solve, "scaling", "anderson")
    assert (
        ref
        == defaults(T.sinkhorn_fused, "scaling", "anderson")
        == defaults(sinkhorn.sinkhorn_log, "scaling", "anderson")
    )
    assert defaults(T.sinkhorn_fused, "reg") == (sinkhorn.ANDERSON_REG[torch.float32],)
    assert fused_reference.REG == sinkhorn.ANDERSON_REG
    assert defaults(reference_solve, "patience") == (T.PATIENCE,) == (sinkhorn.PATIENCE,)


def run_fused(C64, theta, **kw):
    u, v, it, err = T.sinkhorn_fused(C64.float().to(DEVICE), theta, **kw)
    assert u.shape == C64.shape[:1] and v.shape == C64.shape[1:]
    assert it.dtype == torch.int32 and it.dim() == 0 and err.dtype == torch.float32 and err.dim() == 0
    return u.cpu(), v.cpu(), int(it), float(err)


def check_against_references(C64, theta, *, max_iter=1000, tol=1e-3, same_path=False, **kw):
    """Kernel (float32) against tests/fused_reference.py (see judge_fused for what is compared)."""
    fused = run_fused(C64, theta, max_iter=max_iter, tol=tol, **kw)
    ok, detail = judge_fused(C64, theta, fused, max_iter=max_iter, tol=tol, same_path=same_path, **kw)
    assert ok, detail
    return fused[2], fused[3]


# ---------------------------------------------------------------------------------------- row_lse


@pytest.mark.parametrize(
    "n, m, block",
    [
        (1, 1, None),
        (1, 37, None),
        (7, 1000, None),
        (37, 129, None),
        (37, 129, (8, 32)),
        (100, 70, (16, 16)),
        (3, 5, (4, 1)),
    ],
)
@pytest.mark.parametrize("scale", [-7.5, 0.3])
def test_row_lse_matches_logsumexp(n, m, block, scale):
    """Tails in both directions (``block`` forces several row and column tiles per program)."""
    g = torch.Generator().manual_seed(n * 1000 + m)
    A = 3 * torch.rand(n, m, generator=g, dtype=torch.float64)
    A[torch.rand(n, m, generator=g) < 0.4] = math.inf  # masked pairs
    A[torch.arange(n), torch.randint(0, m, (n,), generator=g)] = 1.0  # at least one finite entry a row
    w = 4 * torch.randn(m, generator=g, dtype=torch.float64)
    out = T.row_lse(A.float().to(DEVICE), w.float().to(DEVICE), scale, block=block).cpu()
    X = torch.where(torch.isinf(A), -math.inf, w.float().double() + scale * A.float().double())
    ref = torch.logsumexp(X, 1)
    assert out.dtype == torch.float32 and out.shape == (n,)
    torch.testing.assert_close(out.double(), ref, atol=2e-6 * (1 + float(ref.abs().max())), rtol=0)


def test_row_lse_out_and_large_exponents():
    """Writes into ``out``; the online rescaling copes with exponents far beyond exp's range."""
    g = torch.Generator().manual_seed(1)
    A = torch.rand(5, 700, generator=g, dtype=torch.float64) * 100
    A[:, 300:] -= 50  # the running maximum moves in a later tile
    w = torch.zeros(700, dtype=torch.float64)
    out = torch.full((5,), math.nan, device=DEVICE)
    res = T.row_lse(A.float().to(DEVICE), w.float().to(DEVICE), -20.0, out=out)
    assert res.data_ptr() == out.data_ptr()
    ref = torch.logsumexp(-20.0 * A.float().double(), 1)
    torch.testing.assert_close(out.cpu().double(), ref, atol=1e-6 * float(ref.abs().max()), rtol=0)


def test_row_lse_rejects_bad_input():
    A = torch.zeros(3, 4, device=DEVICE)
    with pytest.raises(ValueError):
        T.row_lse(A.double(), torch.zeros(4, device=DEVICE, dtype=torch.float64), -1.0)
    with pytest.raises(ValueError):
        T.row_lse(A, torch.zeros(5, device=DEVICE), -1.0)
    with pytest.raises(ValueError):
        T.row_lse(A.T, torch.zeros(3, device=DEVICE), -1.0)  # columns not contiguous


# ---------------------------------------------------------------------------------------- fused solve


@pytest.mark.parametrize(
    "n, m, masked",
    [
        (1, 1, False),
        (1, 7, False),
        (7, 1, False),
        (7, 7, True),
        (7, 5, False),
        (32, 32, False),
        (32, 32, True),
        (96, 128, False),
        (128, 128, False),
        (128, 128, True),
        (96, 128, True),
    ],
)
def test_fused_matches_reference(n, m, masked):
    check_against_references(got_cost(n, m, seed=n + m, masked=masked), 0.1)


@pytest.mark.parametrize("n, m, masked", [(7, 5, False), (32, 32, True), (96, 128, False)])
def test_fused_plain_sinkhorn_takes_the_reference_path(n, m, masked):
    """anderson=0: the kernel's annealing, sweeps and stopping test are the reference's, sweep for sweep."""
    check_against_references(got_cost(n, m, seed=n + m, masked=masked), 0.1, anderson=0, same_path=True)


@pytest.mark.parametrize("n, m, masked", [(7, 5, False), (24, 24, True)])
def test_fused_streamed_path(monkeypatch, n, m, masked):
    """The path of sizes above 128 × 128 (C streamed from memory in row chunks, online log-sum-exp over
    chunks, scratch vector), forced at small sizes with 4 chunks; 256 × 256 itself is checked by the
    self-check script on a GPU (the interpreter takes minutes there)."""
    monkeypatch.setattr(T, "_RESIDENT_MAX", 0)
    bn, bm = T.fused_config(n, m)["BN"], T.fused_config(n, m)["BM"]
    monkeypatch.setattr(T, "_CHUNK", bn * bm // 4)
    cfg = T.fused_config(n, m)
    assert not cfg["RESIDENT"] and cfg["H"] * 4 == cfg["BN"]
    C = got_cost(n, m, seed=n * m, masked=masked)
    check_against_references(C, 0.1)
    check_against_references(C, 0.1, anderson=0, same_path=True)


@pytest.mark.parametrize("n, m, masked", [(300, 40, True), (20, 600, False)])
def test_fused_takes_sizes_above_the_dispatch_limit(n, m, masked):
    """Between FUSED_MAX (what the solvers send) and FUSED_LIMIT (what the kernel takes): padded to 512 × 64
    and 32 × 1024, streamed in 8 chunks of 64 × 64 and 4 × 1024, the same answer as the references.
    bench_acceleration times the kernel against the torch loop at such sizes."""
    assert T.FUSED_MAX < max(n, m) <= T.FUSED_LIMIT
    cfg = T.fused_config(n, m)
    assert not cfg["RESIDENT"] and cfg["BN"] // cfg["H"] == 8
    check_against_references(got_cost(n, m, seed=n + m, masked=masked), 0.1)


def test_fused_max_is_256_unless_the_environment_moves_it(monkeypatch):
    """GOT_REG_FUSED_MAX: the largest batch the solvers send to the fused kernel, read at every call; a value
    outside [1, FUSED_LIMIT] or not an integer is refused with the variable's name and range."""
    monkeypatch.delenv(T.FUSED_MAX_ENV, raising=False)
    assert T.fused_max() == T.FUSED_MAX == 256
    for raw, expected in (("512", 512), (" 1024 ", 1024), ("1", 1), ("", 256)):
        monkeypatch.setenv(T.FUSED_MAX_ENV, raw)
        assert T.fused_max() == expected
    for raw in ("0", "1025", "-5", "512.0", "big"):
        monkeypatch.setenv(T.FUSED_MAX_ENV, raw)
        with pytest.raises(ValueError, match=rf"GOT_REG_FUSED_MAX must be an integer in \[1, 1024\].*got '{raw}'"):
            T.fused_max()
    if CUDA and not T.INTERPRET:
        monkeypatch.setenv(T.FUSED_MAX_ENV, "512")
        assert T.fused_takes(512, 300, torch.float32, torch.device("cuda"))
        assert not T.fused_takes(513, 8, torch.float32, torch.device("cuda"))


def test_fused_accelerated_problem():
    """Class blocks coupled only through costs ≫ θ (GOT without label matching): plain Sinkhorn crawls,
    the accelerated kernel gets the same answer in a third of the sweeps."""
    C = block_cost(32, seed=2)
    it, _ = check_against_references(C, 0.1, tol=1e-4)
    _, _, it_plain, _ = reference_solve(C, 0.1, max_iter=10_000, tol=1e-4, anderson=0)
    assert 3 * it < it_plain, (it, it_plain)  # 100 against 368 (float64 loop)


@pytest.mark.parametrize("extra", [-3, 0, 1, 4, 9])
def test_fused_runs_out_of_iterations(extra):
    """max_iter ending inside the annealing, right after it, and after 1, 4 and 9 accelerated sweeps: the
    columns are made exact for the last u, err is measured for it, and up to there the kernel takes the
    reference's path sweep for sweep (the first Anderson steps included)."""
    C = got_cost(16, 24, seed=2, adversarial=False)
    max_iter = annealing_sweeps(C, 0.1) + extra
    it, err = check_against_references(C, 0.1, max_iter=max_iter, tol=1e-9, same_path=True)
    assert it == max_iter and err > 1e-9


def test_fused_restarts_where_float32_stalls():
    """A tolerance float32 cannot reach: on rounding noise the residual grows now and then, the history is
    dropped (restarts), and the kernel runs to max_iter still at the fixed point to float32 accuracy."""
    C = block_cost(32, seed=2)
    trace = []
    reference_solve(C.float(), 0.1, max_iter=300, tol=1e-12, dtype=torch.float32, trace=trace)
    assert trace, "the float32 reference should restart its history"
    u, v, it, err = run_fused(C, 0.1, max_iter=300, tol=1e-12)
    assert it == 300 and err < 1e-5
    value_star, f_star = fused_reference.exact_solution(C, 0.1)
    value = 0.1 * float(u.double().mean() + v.double().mean())
    assert abs(value - value_star) <= value_gap_bound(err, 0.1 * u.double(), f_star) + 1e-5


@pytest.mark.parametrize("streamed", [False, True])
def test_fused_batch_solves_each_problem_as_its_own_launch(monkeypatch, streamed):
    """(k, n, m): one program per problem, each exactly the single launch's solve (its own iteration
    count and error), whatever the others do: here an unmasked, a masked and a slow block problem."""
    if streamed:
        monkeypatch.setattr(T, "_RESIDENT_MAX", 0)
        monkeypatch.setattr(T, "_CHUNK", 32 * 32 // 4)
    mask = label_mask(32, 32)
    problems = [
        got_cost(32, 32, seed=1, masked=False),
        got_cost(32, 32, seed=2, adversarial=False).masked_fill(~mask, math.inf),
        block_cost(32, seed=2),
    ]
    kw = dict(max_iter=1000, tol=1e-4)
    u, v, it, err = T.sinkhorn_fused(torch.stack(problems).float().to(DEVICE), 0.1, **kw)
    assert u.shape == (3, 32) and v.shape == (3, 32) and it.shape == (3,) and err.shape == (3,)
    singles = [run_fused(C, 0.1, **kw) for C in problems]
    assert len({s[2] for s in singles}) > 1, "the problems should stop at different sweeps"
    for i, (u1, v1, it1, err1) in enumerate(singles):
        assert int(it[i]) == it1 and float(err[i]) == err1
        torch.testing.assert_close(u[i].cpu(), u1, atol=0, rtol=0)
        torch.testing.assert_close(v[i].cpu(), v1, atol=0, rtol=0)


@pytest.mark.parametrize("streamed, n, m, masked", [(False, 32, 32, True), (False, 7, 5, False), (True, 12, 8, True)])
def test_plan_value_and_error_written_by_the_launch(monkeypatch, streamed, n, m, masked):
    """with_plan=True: the plan, value and marginal error that the kernel writes after its solve equal those
    of the solver's torch epilogue (sinkhorn._result) on the same potentials; the error is measured on the
    plan as returned (got_reg.solvers.result.marginal_error); padded shapes, a stack, both tile paths."""
    from got_reg.solvers import sinkhorn
    from got_reg.solvers.result import marginal_error

    if streamed:
        monkeypatch.setattr(T, "_RESIDENT_MAX", 0)
        bn, bm = T.fused_config(n, m)["BN"], T.fused_config(n, m)["BM"]
        monkeypatch.setattr(T, "_CHUNK", bn * bm // 4)
        assert not T.fused_config(n, m)["RESIDENT"]
    problems = [got_cost(n, m, seed=s, masked=masked, adversarial=s != 1 and n == m) for s in range(3)]
    C = torch.stack(problems).float().to(DEVICE)
    kw = dict(max_iter=1000, tol=1e-4)
    u, v, it, err, P, value, merr = T.sinkhorn_fused(C, 0.1, with_plan=True, **kw)
    assert P.shape == (3, n, m) and value.shape == (3,) and merr.shape == (3,)
    u0, v0, it0, err0 = T.sinkhorn_fused(C, 0.1, **kw)  # the plan costs the solve nothing
    for a, b in ((u, u0), (v, v0), (it, it0), (err, err0)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    ref = sinkhorn._result(C, u, v, 0.1, it, 1e-4)
    torch.testing.assert_close(P, ref.plan, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(value, ref.value, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(merr, marginal_error(P), atol=1e-6, rtol=1e-4)
    if masked:
        assert bool((P[:, ~torch.isfinite(C[0])] == 0).all())
    single = T.sinkhorn_fused(C[2], 0.1, with_plan=True, **kw)
    for a, b in zip(single, (u[2], v[2], it[2], err[2], P[2], value[2], merr[2])):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_solve_many_glue_gives_each_problem_its_result():
    """TorchSinkhorn.solve_many's fused branch (one launch for the debiased loss' three problems): the
    kernel's stacked outputs become k results, each with the plan of its own potentials (the torch
    epilogue, sinkhorn._result), and a value within the gap its error allows of the torch solver's
    float64 answer."""
    from got_reg.solvers import sinkhorn

    mask = label_mask(32, 32)
    costs = torch.stack([got_cost(32, 32, seed=s, adversarial=s > 0) for s in range(3)])
    C = sinkhorn._masked(costs.float(), mask)
    many = sinkhorn._fused_many(T, C.to(DEVICE), 0.1, 1000, 1e-4)
    assert len(many) == 3
    for c, r in zip(C, many):
        assert bool(r.converged) and float(r.marginal_error) <= 1e-4
        f, g = (t.cpu() for t in r.potentials)
        own = sinkhorn._result(c, f / 0.1, g / 0.1, 0.1, r.iterations.cpu(), 1e-4)
        torch.testing.assert_close(r.plan.cpu(), own.plan, atol=1e-7, rtol=1e-5)
        # Masked, near-diagonal problems: plain Sinkhorn in float64 (its path does not hang on rounding) needs
        # about 4000 sweeps to 1e-5 for the second.
        ref = sinkhorn.sinkhorn_log(c.double(), 0.1, tol=1e-5, max_iter=20_000, anderson=0)
        assert bool(ref.converged)
        bound = value_gap_bound(float(r.marginal_error), f.double(), ref.potentials[0])
        bound += value_gap_bound(float(ref.marginal_error), ref.potentials[0], ref.potentials[0])
        assert abs(float(r.value) - float(ref.value)) <= bound + 1e-6


def test_fused_rejects_bad_input():
    C = torch.rand(4, 4, device=DEVICE)
    with pytest.raises(ValueError, match="anderson must be an int in"):
        T.sinkhorn_fused(C, 0.1, max_iter=10, tol=1e-3, anderson=17)
    with pytest.raises(ValueError):
        T.sinkhorn_fused(torch.rand(4, T.FUSED_LIMIT + 1, device=DEVICE), 0.1, max_iter=10, tol=1e-3)
    with pytest.raises(ValueError):
        T.sinkhorn_fused(C.double(), 0.1, max_iter=10, tol=1e-3)
    with pytest.raises(ValueError, match=r"\(n, m\) or \(k, n, m\)"):
        T.sinkhorn_fused(C[None, None], 0.1, max_iter=10, tol=1e-3)
    with pytest.raises(ValueError, match="at least one problem"):
        T.sinkhorn_fused(C[:0].reshape(0, 4, 4), 0.1, max_iter=10, tol=1e-3)


# ---------------------------------------------------------------------------------------- Anderson step


@pytest.mark.parametrize("n, memory", [(1, 1), (37, 3), (300, 8), (1300, 8), (1300, 16)])
def test_anderson_kernel_is_the_least_squares_extrapolation(n, memory):
    """T.Anderson (the torch loop's Anderson step in one launch, for B > 256) against the definition written
    out in float64 from the same float32 inputs (tests/fused_reference.py) and against the torch loop's own
    _Anderson in float32: the ring, the restart when the residual grows (step 5), empty slots (memory 3 in
    4 slots), several chunks per pass (n = 1300), mean 0."""
    from got_reg.solvers import sinkhorn

    reg = sinkhorn.ANDERSON_REG[torch.float32]
    kernel = T.Anderson(torch.zeros(n, device=DEVICE), memory, reg)
    torch_step = sinkhorn._Anderson(torch.zeros(n), memory, reg)
    steps = fused_reference.anderson_steps(n, memory, reg, seed=n + memory, dtype=torch.float32)
    for x, r, want in steps:
        got = kernel.step(x.to(DEVICE), r.to(DEVICE)).cpu()
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=2e-6)
        torch.testing.assert_close(got, torch_step.step(x, r), rtol=1e-5, atol=2e-6)
    assert kernel.k == len(steps)
    assert int(kernel.weights.sum()) == min(memory, len(steps) - 6)  # refilled since the restart at step 5


@pytest.mark.parametrize("masked", [False, True])
def test_the_torch_loop_with_the_anderson_kernel(monkeypatch, masked):
    """sinkhorn_log's loop as it runs on CUDA beyond the fused kernel, with T.Anderson's step in place of
    _Anderson's (here interpreted, on CPU float32): the same sweeps and the same answer, up to the rounding
    the two steps do differently."""
    from got_reg.solvers import sinkhorn

    C = got_cost(300, 300, seed=3, masked=masked, adversarial=True).float()
    mask = torch.isfinite(C) if masked else None
    eager = sinkhorn.sinkhorn_log(C, 0.1, mask)
    made = []

    def kernel_step(x, memory):
        made.append(sinkhorn._TritonAnderson(T, x, memory, sinkhorn.ANDERSON_REG[x.dtype]))
        return made[-1]

    monkeypatch.setattr(sinkhorn, "_anderson", kernel_step)
    fused = sinkhorn.sinkhorn_log(C, 0.1, mask)
    assert len(made) == 1 and isinstance(made[0].impl, T.Anderson) and made[0].impl.k > 0
    assert bool(eager.converged) and bool(fused.converged)
    assert abs(int(fused.iterations) - int(eager.iterations)) <= sinkhorn.CHECK_EVERY
    # Measured when written: the same 35 sweeps (plain Sinkhorn takes 220), plans 6e-6 apart in L1.
    assert abs(float(fused.value) - float(eager.value)) <= 1e-5 * abs(float(eager.value))
    assert float((fused.plan - eager.plan).abs().sum()) <= 1e-4


def test_anderson_kernel_rejects_bad_input():
    x = torch.zeros(10, device=DEVICE)
    with pytest.raises(ValueError, match="1-D float32"):
        T.Anderson(x.double(), 8, 1e-4)
    with pytest.raises(ValueError, match=r"memory must be an int in \[1, 16\], got 17"):
        T.Anderson(x, 17, 1e-4)
    with pytest.raises(ValueError, match=r"contiguous float32 \(10,\)"):
        T.Anderson(x, 8, 1e-4).step(x[:5], x[:5])
    assert not T.anderson_supported(torch.zeros(10))  # never CPU, even interpreted
    if CUDA and not T.INTERPRET:
        assert T.anderson_supported(x) and not T.anderson_supported(x.double())


def test_dispatch_helpers():
    assert T.available()
    C = torch.rand(8, 8)
    assert not T.fused_supported(C) and not T.row_lse_supported(C)  # never CPU, even interpreted
    assert not T.fused_takes(8, 8, torch.float32, C.device)
    if CUDA and not T.INTERPRET:
        Cc = C.cuda()
        assert T.fused_supported(Cc) and T.row_lse_supported(Cc)
        assert not T.fused_supported(torch.rand(8, 300, device="cuda"))
        assert not T.fused_supported(Cc.double())
        assert T.fused_takes(T.FUSED_MAX, T.FUSED_MAX, torch.float32, Cc.device)
        assert not T.fused_takes(T.FUSED_MAX + 1, 8, torch.float32, Cc.device)
        assert not T.fused_takes(8, 8, torch.float64, Cc.device) and not T.fused_takes(0, 8, torch.float32, Cc.device)


# ---------------------------------------------------------------------------------------- compiled / GPU


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(extra)
    return env


@pytest.mark.slow
def test_kernels_compile_ahead_of_time_for_sm90():
    """The real compiler pipeline (TTIR → TTGIR → LLVM → PTX → ptxas cubin) for an H100/H200, without a
    GPU: catches what the interpreter cannot (loop-carried types, layouts, register pressure)."""
    from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401  (skip below if no CUDA backend)

    proc = subprocess.run(
        [sys.executable, str(SELFCHECK), "--aot", "--quick", "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=_clean_env(),
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    if rows and all(r.get("skipped") for r in rows):
        pytest.skip(rows[0]["skipped"])
    failed = [r for r in rows if not r.get("ok")]
    assert not failed, failed
    for r in rows:
        print(r)
        assert r["regs"] <= 255


@pytest.mark.slow
def test_selfcheck_script_runs_quick_under_the_interpreter():
    env = _clean_env() if CUDA else _clean_env(TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, str(SELFCHECK), "--quick"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=900
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "FAIL" not in out and "ERROR" not in out, out
    assert out.count("PASS") >= 4, out


def test_module_imports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch\n"
        "from got_reg.solvers import _triton as T\n"
        "assert not T.available() and not T.fused_supported(torch.zeros(4, 4))\n"
        "assert not T.row_lse_supported(torch.zeros(4, 4))\n"
        "try:\n"
        "    T.sinkhorn_fused(torch.zeros(4, 4), 0.1, max_iter=10, tol=1e-3)\n"
        "except RuntimeError:\n"
        "    print('ok')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=_clean_env(), timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr
