"""The learned semi-dual: weak duality, convergence to the Sinkhorn value when D ≥ B, lower bound otherwise."""
import math
import warnings

import pytest
import torch

from got_reg import GOTConvergenceWarning
from got_reg.functional import joint_cost, label_mask, ot_loss
from got_reg.solvers import (
    KantorovichPotential, semidual_plan, semidual_value, semidual_value_and_plan, solve_sinkhorn,
)
from got_reg.solvers import sinkhorn as sinkhorn_module


def batch(B, D, seed):
    g = torch.Generator().manual_seed(seed)
    z, za = torch.randn(B, D, generator=g, dtype=torch.float64), torch.randn(B, D, generator=g, dtype=torch.float64)
    lg, lga = 2 * torch.randn(B, 5, generator=g, dtype=torch.float64), 2 * torch.randn(B, 5, generator=g, dtype=torch.float64)
    return z, joint_cost(z, za, lg, lga)


def sinkhorn_value(C, mask):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GOTConvergenceWarning)
        return float(solve_sinkhorn(C, 0.1, mask, tol=1e-10, max_iter=50000).value)


def reference_semidual(C, phi, theta, mask):
    """Eq. (2) straight from the formula, through torch.logsumexp and its autograd."""
    X = (phi[:, None] - C) / theta
    if mask is not None:
        X = X.masked_fill(~mask, -math.inf)
    return phi.mean() - theta * (torch.logsumexp(X, dim=0) - math.log(C.shape[0])).mean()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("block", [None, 7])
def test_semidual_value_and_gradients_match_the_formula(dtype, masked, block, monkeypatch):
    """The one-pass kernel (value, ∂/∂C = P, ∂/∂φ = 1/B − P·1) against autograd through the formula,
    on a rectangular cost with a large spread (floored exponents), in one block and in 7-element blocks."""
    if block is not None:
        monkeypatch.setattr(sinkhorn_module, "_BLOCK_ELEMENTS", block)  # the one block-size knob
    g = torch.Generator().manual_seed(3)
    B, Bp, theta = 12, 9, 0.05
    C = (40 * torch.rand(B, Bp, generator=g, dtype=torch.float64)).to(dtype)
    phi = (5 * torch.randn(B, generator=g, dtype=torch.float64)).to(dtype)
    mask = (torch.arange(B)[:, None] % 3) == (torch.arange(Bp)[None, :] % 3) if masked else None
    C1, phi1 = C.clone().requires_grad_(True), phi.clone().requires_grad_(True)
    value, plan = semidual_value_and_plan(C1, phi1, theta, mask)
    gC, gphi = torch.autograd.grad(3.0 * value, (C1, phi1))
    C2, phi2 = C.double().requires_grad_(True), phi.double().requires_grad_(True)
    ref = reference_semidual(C2, phi2, theta, mask)
    rC, rphi = torch.autograd.grad(3.0 * ref, (C2, phi2))
    tol = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=1e-6, rtol=1e-5)
    assert value.dtype == dtype
    torch.testing.assert_close(value.double(), ref.detach(), **tol)
    torch.testing.assert_close(gC.double(), rC, **tol)
    torch.testing.assert_close(gphi.double(), rphi, **tol)
    torch.testing.assert_close(plan, gC / 3.0)
    torch.testing.assert_close(plan.sum(0).double(), torch.full((Bp,), 1 / Bp, dtype=torch.float64), **tol)
    if masked:
        assert bool((plan[~mask] == 0).all())  # exact zeros: no mass between forbidden pairs
    torch.testing.assert_close(semidual_plan(C, phi, theta, mask), plan)


def test_semidual_leaves_its_inputs_alone():
    """The kernel works in place on a copy of Cᵀ, which must never be the caller's tensor (Cᵀ of a view is)."""
    g = torch.Generator().manual_seed(4)
    base = torch.rand(6, 6, generator=g)
    for C in (base, base.T):  # base.T.T is contiguous: a careless .contiguous() would alias it
        before = C.clone()
        mask = torch.eye(6, dtype=torch.bool) | (torch.rand(6, 6, generator=g) > 0.5)
        semidual_value_and_plan(C, torch.randn(6, generator=g), 0.1, mask)
        assert torch.equal(C, before)


def test_semidual_refuses_a_column_with_no_allowed_pair():
    C = torch.rand(4, 4)
    mask = torch.eye(4, dtype=torch.bool)
    mask[:, 2] = False
    with pytest.raises(ValueError, match="every column of the cost needs a finite"):
        semidual_value(C, torch.zeros(4), 0.1, mask)


@pytest.mark.parametrize("masked", [False, True])
def test_weak_duality_for_any_potential(masked):
    z, C = batch(24, 8, seed=0)
    mask = label_mask(torch.arange(24) % 3) if masked else None
    ref = sinkhorn_value(C, mask)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        phi = 3 * torch.randn(24, generator=g, dtype=torch.float64)
        assert float(semidual_value(C, phi, 0.1, mask)) <= ref + 1e-9


def test_semidual_at_sinkhorn_potential_equals_value():
    """S_θ(f*) = W_θ: the optimal Sinkhorn potential closes the duality gap."""
    _, C = batch(16, 4, seed=2)
    res = solve_sinkhorn(C, 0.1, tol=1e-12, max_iter=100000)
    # Recover f from the plan: P_ij = a b exp((f_i + g_j - C_ij)/θ) ⇒ f_i − f_0 = θ log(P_i0/P_00) + C_i0 − C_00.
    f = 0.1 * torch.log(res.plan[:, 0] / res.plan[0, 0]) + C[:, 0] - C[0, 0]
    assert float(semidual_value(C, f, 0.1)) == pytest.approx(float(res.value), abs=1e-9)
    plan = semidual_plan(C, f, 0.1)
    torch.testing.assert_close(plan, res.plan, atol=1e-10, rtol=1e-7)


@pytest.mark.parametrize("masked", [False, True])
def test_learned_potential_approaches_sinkhorn_from_below_when_dim_ge_batch(masked):
    B, D = 16, 32
    z, C = batch(B, D, seed=3)
    mask = label_mask(torch.arange(B) % 2) if masked else None
    ref = sinkhorn_value(C, mask)
    pot = KantorovichPotential(lr=0.05)
    pot.build(D, z.device, z.dtype)
    values = []
    for _ in range(1500):
        pot.ascend(z, C, 0.1, mask)
        values.append(float(semidual_value(C, pot(z).detach(), 0.1, mask)))
    assert max(values) <= ref + 1e-8                     # a lower bound all along
    # It closes the gap: by 20x, to within 0.5% (Adam at a constant step hovers near the optimum).
    assert ref - values[-1] < 0.05 * (ref - values[0])
    assert ref - values[-1] < 5e-3 * abs(ref)


def test_linear_potential_is_a_strict_lower_bound_when_dim_lt_batch():
    B, D = 32, 2
    z, C = batch(B, D, seed=4)
    ref = sinkhorn_value(C, None)
    pot = KantorovichPotential(lr=0.05)
    pot.build(D, z.device, z.dtype)
    for _ in range(1500):
        pot.ascend(z, C, 0.1, None)
    best = float(semidual_value(C, pot(z).detach(), 0.1))
    assert best < ref - 1e-3


def test_ot_loss_dual_solver_matches_semidual():
    _, C = batch(8, 4, seed=5)
    phi = torch.randn(8, dtype=torch.float64)
    assert float(ot_loss(C, solver="dual", potential=phi)) == pytest.approx(float(semidual_value(C, phi, 0.1)))
    with pytest.raises(ValueError, match=r"shape \(8,\)"):
        ot_loss(C, solver="dual", potential=torch.randn(7))
