"""The row log-sum-exp operators, the in-place row softmax and exp_plan against torch in float64.

A has +∞ entries (forbidden pairs): with the solvers' negative scale they are −∞ exponents that must
contribute nothing. The blocked CPU operator works in row blocks; ``lse._BLOCK_ELEMENTS`` is patched small
so that several blocks (the last one short) run on a small matrix. The kernel operator caches exp(s·A + w̄)
and is checked on the calls between its builds as well.
"""

import math

import pytest
import torch

from got_reg.solvers import lse


def problem(dtype, n_rows=64, n_cols=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = (torch.randn(n_rows, n_cols, generator=g, dtype=torch.float64) * 40).abs()  # many terms far below e^−87
    A[5, :40] = math.inf  # forbidden entries
    A[17, 1:] = math.inf  # a row with one allowed entry
    w = torch.randn(n_cols, generator=g, dtype=torch.float64) * 30
    return A.to(dtype), w.to(dtype)


def reference_lse(A, w, scale):
    """float64 torch.logsumexp of scale·A + w, from the same (possibly fp32-rounded) inputs."""
    return torch.logsumexp(scale * A.double() + w.double(), dim=1)


def tolerance(A, w, scale):
    # Two roundings of scale·A + w (fused or not) differ by ~eps·|x|; the sum adds a few eps more.
    x = scale * A.double() + w.double()
    return 8 * torch.finfo(A.dtype).eps * max(1.0, float(x[torch.isfinite(x)].abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "op, block_rows",
    [(lse.BlockedLSE, None), (lse.BlockedLSE, 5), (lse.BlockedLSE, 1), (lse.PlainLSE, None), (lse.KernelLSE, None)],
)
def test_row_lse_matches_torch_logsumexp(dtype, block_rows, op, monkeypatch):
    A, w = problem(dtype)
    if block_rows is not None:
        monkeypatch.setattr(lse, "_BLOCK_ELEMENTS", block_rows * A.shape[1])  # 13 blocks of 5, the last short
    f = op(A)
    if op is lse.BlockedLSE:
        assert f.buf.shape == (block_rows or A.shape[0], A.shape[1])
    for scale in (-10.0, -0.5, -1e-3):
        got = f(w, scale)
        ref = reference_lse(A, w, scale)
        assert got.dtype == dtype and got.shape == (A.shape[0],)
        torch.testing.assert_close(got.double(), ref, rtol=0, atol=tolerance(A, w, scale))
    torch.testing.assert_close(A, problem(dtype)[0])  # A is read, never written


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_lse_between_builds(dtype):
    """KernelLSE against float64 logsumexp along a sequence of w like a solve's: moves of spread ≤ τ reuse
    the kernel (a matrix-vector product; the build count stays), a constant shift of any size too, a
    larger move or a new scale rebuilds it. Exact answers every time (the problem spans far more than
    e^−87 in each row, with forbidden entries and a row with one allowed entry)."""
    A, w0 = problem(dtype)
    g = torch.Generator().manual_seed(1)
    f = lse.KernelLSE(A)
    tau = lse._KERNEL_SPREAD
    steps = [  # (w, scale, builds after the call)
        (w0, -10.0, 1),
        (w0 + 0.3 * tau * torch.rand(48, generator=g, dtype=dtype), -10.0, 1),
        (w0 - 0.9 * tau * torch.rand(48, generator=g, dtype=dtype), -10.0, 1),
        (w0 + 1e3, -10.0, 1),  # a constant: spread 0
        (w0 + 2.0 * tau * torch.rand(48, generator=g, dtype=dtype), -10.0, 2),
        (w0, -0.5, 3),
        (w0 + 0.5 * tau * torch.linspace(0, 1, 48, dtype=dtype), -0.5, 3),
    ]
    for k, (w, scale, builds) in enumerate(steps):
        got = f(w, scale)
        assert f.builds == builds, k
        assert got.dtype == dtype and got.shape == (A.shape[0],)
        torch.testing.assert_close(got.double(), reference_lse(A, w, scale), rtol=0, atol=tolerance(A, w, scale))
    torch.testing.assert_close(A, problem(dtype)[0])  # A is read, never written


def test_blocked_lse_floors_only_terms_that_cannot_matter():
    """A row whose terms span far more than e^−708: the floored sum equals the exact one."""
    A = torch.tensor([[0.0, 800.0, 2000.0, math.inf], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    w = torch.zeros(4, dtype=torch.float64)
    got = lse.BlockedLSE(A)(w, -1.0)
    torch.testing.assert_close(got, torch.tensor([0.0, math.log(4) - 1.0], dtype=torch.float64), rtol=0, atol=1e-15)


def test_row_lse_picks_the_operator_for_the_device():
    assert lse._KERNEL_MAX_ELEMENTS == 2**24
    assert isinstance(lse.row_lse(torch.zeros(3, 4)), lse.KernelLSE)
    assert isinstance(lse.row_lse(torch.zeros(3, 4, dtype=torch.float64)), lse.KernelLSE)
    # Beyond _KERNEL_MAX_ELEMENTS no kernel is kept: the blocked operator.
    assert isinstance(lse.row_lse(torch.zeros(2**12, 2**12 + 1)), lse.BlockedLSE)
    # No exponent floor for half precision on CPU: the plain reduction.
    assert isinstance(lse.row_lse(torch.zeros(3, 4, dtype=torch.bfloat16)), lse.PlainLSE)
    assert lse.exp_floor(torch.zeros(1)) == -87.0 and lse.exp_floor(torch.zeros(1, dtype=torch.float64)) == -708.0
    assert lse.block_rows(10, 3) == 10 and lse.block_rows(10**6, 2**20) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("block_rows", [None, 5])
def test_softmax_rows_in_place(dtype, block_rows, monkeypatch):
    if block_rows is not None:
        monkeypatch.setattr(lse, "_BLOCK_ELEMENTS", block_rows * 48)
    A, w = problem(dtype)
    scale, divide = -0.5, 48.0
    ref_lse = reference_lse(A, w, scale)
    ref = torch.softmax(scale * A.double() + w.double(), dim=1) / divide
    X = A.clone()
    out_lse = lse.softmax_rows_(X, w, scale, divide)
    torch.testing.assert_close(out_lse.double(), ref_lse, rtol=0, atol=tolerance(A, w, scale))
    tiny = torch.finfo(dtype).tiny
    # No subnormals: every entry is 0 or a normal number; forbidden pairs are exactly 0.
    assert bool(((X == 0) | (X >= tiny)).all())
    assert bool((X[torch.isinf(A)] == 0).all())
    # Entries well above the flush threshold are the softmax; the flushed ones are tiny in the reference too.
    big = ref > 1e3 * tiny * 48 * divide
    eps = torch.finfo(dtype).eps
    rtol = 64 * eps * float((scale * A[torch.isfinite(A)]).abs().max())
    torch.testing.assert_close(X.double()[big], ref[big], rtol=rtol, atol=0)
    assert float(ref[X == 0].max()) < 1e3 * tiny * 48 * divide
    torch.testing.assert_close(X.double().sum(1), torch.full((64,), 1 / divide, dtype=torch.float64), rtol=1e-5, atol=0)


def test_exp_plan_flushes_subnormals_and_minus_infinity_to_zero():
    for dtype in (torch.float32, torch.float64):
        x = torch.tensor(
            [0.0, -1.0, -80.0, -86.9, -87.5, -100.0, -700.0, -707.0, -709.0, -745.0, -math.inf], dtype=dtype
        )
        ref = torch.exp(x.double())
        out = x.clone()
        res = lse.exp_plan(out)
        assert res.data_ptr() == out.data_ptr()  # in place
        normal = ref >= torch.finfo(dtype).tiny
        torch.testing.assert_close(res.double()[normal], ref[normal], rtol=2 * torch.finfo(dtype).eps, atol=0)
        assert bool((res[~normal] == 0).all())  # subnormal results and exp(−∞): exactly 0
        assert bool(((res == 0) | (res >= torch.finfo(dtype).tiny)).all())
