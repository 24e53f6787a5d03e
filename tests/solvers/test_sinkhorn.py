"""The entropic OT value and its gradient against POT's solver, and against closed forms."""
import functools
import math
import warnings

import numpy as np
import ot
import pytest
import torch

from got_reg import GOTConvergenceWarning
from got_reg.functional import joint_cost, label_mask, ot_loss
from got_reg.solvers import solve_sinkhorn


def random_cost(B, seed, adversarial=False, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, 16, generator=g, dtype=dtype)
    lg = 2 * torch.randn(B, 5, generator=g, dtype=dtype)
    if adversarial:
        za, lga = z + 0.2 * torch.randn(B, 16, generator=g, dtype=dtype), lg + 0.3 * torch.randn(B, 5, generator=g, dtype=dtype)
    else:
        za, lga = torch.randn(B, 16, generator=g, dtype=dtype), 2 * torch.randn(B, 5, generator=g, dtype=dtype)
    return joint_cost(z, za, lg, lga)


def pot_reference(C, theta, mask=None):
    """POT's ot.solve (log-domain, float64, tight tol) with its envelope gradient."""
    C = C.detach().double().clone()
    if mask is not None:
        C = C.masked_fill(~mask, float(C[mask].max()) + 1000 * theta)
    C.requires_grad_(True)
    res = ot.solve(C, reg=theta, method="sinkhorn_log", max_iter=200000, tol=1e-13, grad="envelope")
    (grad,) = torch.autograd.grad(res.value, C)
    return float(res.value.detach()), grad


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("theta", [0.1, 0.5])
def test_value_and_gradient_match_pot(masked, theta):
    B = 24
    C = random_cost(B, seed=3).requires_grad_(True)
    y = torch.arange(B) % 3
    mask = label_mask(y) if masked else None
    ref_value, ref_grad = pot_reference(C, theta, mask)
    value = ot_loss(C, theta=theta, mask=mask, tol=1e-11, max_iter=100000)
    (grad,) = torch.autograd.grad(value, C)
    assert abs(float(value) - ref_value) < 1e-9
    torch.testing.assert_close(grad, ref_grad, atol=1e-9, rtol=1e-6)
    if masked:
        assert (grad[~mask] == 0).all()


def test_over_relaxation_gives_the_plain_answer_in_fewer_sweeps():
    """Near-diagonal (adversarial-like) plans: plain Sinkhorn's error decays like 1/k there."""
    from got_reg.solvers.sinkhorn import marginal_error, sinkhorn_log_torch

    C = random_cost(32, seed=5, adversarial=True)
    plain = sinkhorn_log_torch(C, 0.1, tol=1e-5, max_iter=100000, relax=1.0)
    fast = sinkhorn_log_torch(C, 0.1, tol=1e-5, max_iter=100000, relax=1.8)
    for res in (plain, fast):  # the stopping claim, checked on the returned plan itself
        assert res.converged and marginal_error(res.plan) <= 1e-5 * (1 + 1e-6)
        torch.testing.assert_close(res.plan.sum(0), torch.full((32,), 1 / 32, dtype=torch.float64))
    assert abs(float(fast.value) - float(plain.value)) < 1e-5
    assert float((fast.plan - plain.plan).abs().sum()) < 1e-4
    assert fast.iterations * 3 < plain.iterations, (fast.iterations, plain.iterations)  # measured: 1607 vs 8568


def test_over_relaxation_falls_back_to_plain_sinkhorn_when_the_error_stalls(monkeypatch):
    from got_reg.solvers import sinkhorn

    C = random_cost(24, seed=3)
    plain = sinkhorn.sinkhorn_log_torch(C, 0.1, tol=1e-6, max_iter=200000, relax=1.0)
    # No patience, relaxation from the first sweep: the first non-improving sweep ends the relaxation.
    monkeypatch.setattr(sinkhorn, "_PATIENCE", 0)
    monkeypatch.setattr(sinkhorn, "_RELAX_AFTER", 0)
    res = sinkhorn.sinkhorn_log_torch(C, 0.1, tol=1e-6, max_iter=200000, relax=1.99)
    assert res.converged and abs(float(res.value) - float(plain.value)) < 1e-6
    with pytest.raises(ValueError, match=r"relax must be in \(0, 2\)"):
        sinkhorn.sinkhorn_log_torch(C, 0.1, relax=2.0)


@functools.lru_cache(maxsize=None)
def adversarial_reference(masked):
    """A float64 solve of an adversarial-like (near-diagonal) problem. Sinkhorn's marginal error decays
    only like 1/k on such plans, so 20000 iterations leave ~1e-5: far below what the checks resolve."""
    B = 32
    C = random_cost(B, seed=4, adversarial=True, dtype=torch.float32)
    mask = label_mask(torch.arange(B) % 4) if masked else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GOTConvergenceWarning)
        ref = solve_sinkhorn(C.double(), 0.1, mask, tol=1e-7, max_iter=20000)
    assert ref.marginal_error < 2e-5
    return C, mask, ref


@pytest.mark.parametrize("backend", ["pot", "geomloss"])
@pytest.mark.parametrize("masked", [False, True])
def test_backends_agree_with_torch_solver(backend, masked):
    C, mask, ref = adversarial_reference(masked)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GOTConvergenceWarning)
        res = solve_sinkhorn(C, 0.1, mask, backend=backend, tol=1e-4)
    assert abs(float(res.value) - float(ref.value)) < 1e-4 * max(1.0, abs(float(ref.value)))
    assert float((res.plan.double() - ref.plan).abs().sum()) < 2e-3
    if masked:
        assert float(res.plan[~mask].abs().max()) == 0.0


def test_value_convention_is_primal_with_kl_term():
    """At convergence: value = <P, C> + θ·KL(P ‖ abᵀ), the convention of POT's ot.solve."""
    C = random_cost(16, seed=5)
    theta = 0.3
    res = solve_sinkhorn(C, theta, tol=1e-12, max_iter=100000)
    P = res.plan
    ab = torch.full_like(P, 1 / 16**2)
    primal = (P * C).sum() + theta * (P * (P / ab).log()).sum()
    assert abs(float(primal - res.value)) < 1e-10


def test_closed_form_large_theta_and_single_point():
    # θ → ∞: the plan tends to abᵀ, the value to mean(C).
    C = random_cost(10, seed=6)
    res = solve_sinkhorn(C, 1e5, tol=1e-12)
    assert abs(float(res.value) - float(C.mean())) < 1e-3
    # One point on each side: the only plan is P = 1, value = C[0, 0].
    C1 = torch.tensor([[0.7]], dtype=torch.float64)
    assert float(ot_loss(C1)) == pytest.approx(0.7, abs=1e-12)


def test_small_theta_tends_to_exact_ot():
    C = random_cost(20, seed=7)
    exact = ot.emd2(np.full(20, 1 / 20), np.full(20, 1 / 20), C.numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GOTConvergenceWarning)
        value = float(ot_loss(C, theta=1e-3, max_iter=20000))
    # W_θ ≤ exact + θ·log(B²) (entropy bound) and ≥ exact − the slack of an unconverged dual.
    assert exact - 1e-3 <= value <= exact + 1e-3 * math.log(400) + 1e-6


def test_masked_entries_never_produce_nan_even_when_huge():
    C = random_cost(12, seed=8, dtype=torch.float32)
    y = torch.tensor([0] * 6 + [1] * 6)
    C = C.masked_fill(~label_mask(y), 1e30).requires_grad_(True)
    for backend in ("torch", "pot", "geomloss"):
        v = ot_loss(C, mask=label_mask(y), backend=backend)
        (g,) = torch.autograd.grad(v, C)
        assert torch.isfinite(v) and torch.isfinite(g).all()


@pytest.mark.parametrize("max_iter", [5, 400])  # 5 stops inside the ε-annealing, 400 at θ
def test_non_convergence_warns_with_knob(max_iter):
    C = random_cost(64, seed=9, dtype=torch.float32)
    with pytest.warns(GOTConvergenceWarning, match="raise max_iter") as rec:
        res = solve_sinkhorn(C, 0.01, tol=1e-9, max_iter=max_iter)
    assert math.isfinite(res.marginal_error) and res.marginal_error > 1e-9
    assert "inf" not in str(rec[0].message).split("marginal error")[1].split("after")[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blocked_floored_logsumexp_and_exp_match_torch(dtype, monkeypatch):
    """The solver's CPU log-sum-exp (row blocks, exponents floored where exp is subnormal) = torch's."""
    from got_reg.solvers import sinkhorn

    monkeypatch.setattr(sinkhorn, "_BLOCK_ELEMENTS", 5 * 48)  # 5-row blocks: 13 blocks, the last one short
    g = torch.Generator().manual_seed(0)
    A = (torch.randn(64, 48, generator=g, dtype=dtype) * 40).abs()  # most terms far below e^−87 at scale −10
    A[5, :40] = math.inf  # forbidden entries
    w = torch.randn(48, generator=g, dtype=dtype) * 30
    lse = sinkhorn._RowLogSumExp(A)
    assert lse.buf.shape == (5, 48)
    for scale in (-10.0, -0.5):
        ref, got = torch.logsumexp(scale * A + w, 1), lse(w, scale)
        assert torch.isfinite(ref).all()
        fin = torch.isfinite(ref)
        x = scale * A + w  # the two roundings of scale·A + w (fused or not) differ by ~eps·|x|
        atol = 8 * torch.finfo(dtype).eps * float(x[torch.isfinite(x)].abs().max())
        torch.testing.assert_close(got[fin], ref[fin], rtol=0, atol=atol)
    A[3] = math.inf
    with pytest.raises(ValueError, match="needs a finite"):  # an all-forbidden row: infeasible, not NaN
        sinkhorn._RowLogSumExp(A)
    x = -10.0 * A + w
    e = sinkhorn._exp(x)
    normal = torch.exp(x) >= torch.finfo(dtype).tiny
    assert torch.equal(e[normal], torch.exp(x)[normal])
    assert (e[~normal] == 0).all() and (e[torch.isinf(x)] == 0).all()


def test_fp32_large_costs_do_not_overflow():
    C = random_cost(32, seed=10, dtype=torch.float32) * 200  # costs up to ~1e3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GOTConvergenceWarning)
        res = solve_sinkhorn(C, 0.1)
    assert torch.isfinite(res.value) and torch.isfinite(res.plan).all()


def test_ot_loss_input_errors():
    C = torch.rand(4, 4)
    with pytest.raises(ValueError, match="square"):
        ot_loss(torch.rand(4, 5))
    with pytest.raises(ValueError, match="unknown solver 'sinkorn'"):
        ot_loss(C, solver="sinkorn")
    with pytest.raises(ValueError, match="unknown backend 'keops'"):
        ot_loss(C, backend="keops")
    with pytest.raises(TypeError, match="bool"):
        ot_loss(C, mask=torch.ones(4, 4))
    with pytest.raises(ValueError, match="no allowed entry"):
        ot_loss(C, mask=torch.eye(4, dtype=torch.bool) & (torch.arange(4) < 3)[:, None])
    with pytest.raises(FloatingPointError, match="NaN"):
        ot_loss(C.masked_fill(torch.eye(4, dtype=torch.bool), float("nan")))
    with pytest.raises(ValueError, match="theta"):
        ot_loss(C, theta=0.0)
    with pytest.raises(ValueError, match="needs potential"):
        ot_loss(C, solver="dual")
