"""The learned semi-dual: S_θ(φ) and its gradients against autograd through the formula, weak duality
against the exact entropic OT, the closed-form ascent step against torch.optim.Adam on −S by autograd,
and convergence to the exact value when the feature dimension is at least the batch size."""

import pytest
import torch
from ot_reference import newton_ot, semidual_formula

from got_reg.functional import got_loss, joint_cost, label_mask
from got_reg.solvers import KantorovichPotential, lse, semidual, solve_sinkhorn

F64 = dict(dtype=torch.float64)


def batch(B, D, seed):
    g = torch.Generator().manual_seed(seed)
    z, za = torch.randn(B, D, generator=g, **F64), torch.randn(B, D, generator=g, **F64)
    lg, lga = 2 * torch.randn(B, 5, generator=g, **F64), 2 * torch.randn(B, 5, generator=g, **F64)
    return z, joint_cost(z, za, lg, lga)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("block", [None, 7])
def test_semidual_value_and_gradients_match_the_formula(dtype, masked, block, monkeypatch):
    """The one-pass kernel (value, ∂/∂C = P, ∂/∂φ = 1/B − P·1) against autograd through the formula,
    on a rectangular cost with a large spread (floored exponents), in one block and in 7-element blocks."""
    if block is not None:
        monkeypatch.setattr(lse, "_BLOCK_ELEMENTS", block)  # the one block-size knob
    g = torch.Generator().manual_seed(3)
    B, Bp, theta = 12, 9, 0.05
    C = (40 * torch.rand(B, Bp, generator=g, dtype=torch.float64)).to(dtype)
    phi = (5 * torch.randn(B, generator=g, dtype=torch.float64)).to(dtype)
    mask = (torch.arange(B)[:, None] % 3) == (torch.arange(Bp)[None, :] % 3) if masked else None
    C1, phi1 = C.clone().requires_grad_(True), phi.clone().requires_grad_(True)
    value, res = semidual(C1, phi1, theta, mask)
    gC, gphi = torch.autograd.grad(3.0 * value, (C1, phi1))
    C2, phi2 = C.double().requires_grad_(True), phi.double().requires_grad_(True)
    ref = semidual_formula(C2, phi2, theta, mask)
    rC, rphi = torch.autograd.grad(3.0 * ref, (C2, phi2))
    tol = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=1e-6, rtol=1e-5)
    assert value.dtype == dtype
    torch.testing.assert_close(value.detach().double(), ref.detach(), **tol)
    torch.testing.assert_close(gC.double(), rC, **tol)
    torch.testing.assert_close(gphi.double(), rphi, **tol)
    plan = res.plan
    torch.testing.assert_close(plan, gC / 3.0)
    torch.testing.assert_close(plan.sum(0).double(), torch.full((Bp,), 1 / Bp, dtype=torch.float64), **tol)
    # The result: columns exact, so the marginal error is the rows' (the semi-dual has no tol).
    row_err = float((rC.sum(1) / 3.0 - 1 / B).abs().sum())
    assert float(res.marginal_error) == pytest.approx(row_err, rel=1e-4, abs=1e-6)
    assert not bool(res.converged) and float(res.value) == float(value.detach())
    if masked:
        assert bool((plan[~mask] == 0).all())  # exact zeros: no mass between forbidden pairs


def test_semidual_leaves_its_inputs_alone():
    """The kernel works in place on a copy of Cᵀ, which must never be the caller's tensor (Cᵀ of a view is)."""
    g = torch.Generator().manual_seed(4)
    base = torch.rand(6, 6, generator=g)
    for C in (base, base.T):  # base.T.T is contiguous: a careless .contiguous() would alias it
        before = C.clone()
        mask = torch.eye(6, dtype=torch.bool) | (torch.rand(6, 6, generator=g) > 0.5)
        semidual(C, torch.randn(6, generator=g), 0.1, mask)
        assert torch.equal(C, before)


@pytest.mark.parametrize("masked", [False, True])
def test_weak_duality_for_any_potential(masked):
    _, C = batch(24, 8, seed=0)
    mask = label_mask(torch.arange(24) % 3) if masked else None
    ref = newton_ot(C, 0.1, mask).value
    g = torch.Generator().manual_seed(1)
    values = [float(semidual(C, 3 * torch.randn(24, generator=g, **F64), 0.1, mask)[0]) for _ in range(20)]
    assert max(values) <= ref + 1e-12
    assert min(values) < ref - 1e-2  # random potentials are far from optimal: the bound is not vacuous


def test_semidual_at_the_optimal_potential_closes_the_gap():
    """S_θ(f*) = W_θ, and the plan it implies is the optimal plan."""
    _, C = batch(16, 4, seed=2)
    ref = newton_ot(C, 0.1)
    res = solve_sinkhorn(C, 0.1, tol=1e-13, max_iter=100000)
    value, sd = semidual(C, res.potentials[0], 0.1)
    assert float(value) == pytest.approx(ref.value, abs=1e-12)
    torch.testing.assert_close(sd.plan, ref.plan, atol=1e-12, rtol=1e-9)


def test_step_is_one_adam_step_on_minus_the_semidual():
    """step(e, P) = torch.optim.Adam on −S_θ(e·w) with the gradient by autograd through the formula (float64),
    over several steps (Adam's moments included)."""
    g = torch.Generator().manual_seed(5)
    B, D, theta = 10, 6, 0.1
    e = torch.randn(B, D, generator=g, dtype=torch.float64)
    C = joint_cost(
        e,
        torch.randn(B, D, generator=g, **F64),
        torch.randn(B, 4, generator=g, **F64),
        torch.randn(B, 4, generator=g, **F64),
    )
    mask = label_mask(torch.arange(B) % 2)
    pot = KantorovichPotential(lr=0.05)
    pot.build(D, e.device, torch.float64)
    with torch.no_grad():
        pot.weight.copy_(torch.randn(D, generator=g, dtype=torch.float64))
    w = pot.weight.detach().clone().requires_grad_(True)
    adam = torch.optim.Adam([w], lr=0.05)
    for _ in range(4):
        _, res = semidual(C, pot(e), theta, mask)
        pot.step(e, res.plan)
        adam.zero_grad()
        (-semidual_formula(C, e @ w, theta, mask)).backward()
        adam.step()
        torch.testing.assert_close(pot.weight.detach(), w.detach(), rtol=1e-12, atol=1e-14)
    assert pot.num_updates == 4 and pot.weight.grad is None


def test_ascend_takes_n_steps_each_from_its_own_pass():
    _, C = batch(8, 8, seed=6)
    e = torch.randn(8, 8, dtype=torch.float64)
    a, b = KantorovichPotential(lr=0.1), KantorovichPotential(lr=0.1)
    for p in (a, b):
        p.build(8, e.device, torch.float64)
    a.ascend(e, C, 0.1, None, 3)
    for _ in range(3):
        b.step(e, semidual(C, b(e), 0.1)[1].plan)
    torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=0)


def test_potential_misuse_and_divergence_reset():
    pot = KantorovichPotential()
    assert not pot.built
    with pytest.raises(RuntimeError, match="before build"):
        pot(torch.zeros(2, 3))
    pot.build(3, torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="built for features of dim 3, got dim 4"):
        pot(torch.zeros(2, 4))
    assert not pot.reset_if_diverged()
    with torch.no_grad():
        pot.weight[1] = float("nan")
    assert pot.reset_if_diverged() and torch.equal(pot.weight.detach(), torch.zeros(3))


@pytest.mark.parametrize("masked", [False, True])
def test_learned_potential_approaches_the_exact_value_from_below_when_dim_ge_batch(masked):
    B, D = 16, 32
    z, C = batch(B, D, seed=3)
    mask = label_mask(torch.arange(B) % 2) if masked else None
    ref = newton_ot(C, 0.1, mask).value
    pot = KantorovichPotential(lr=0.05)
    pot.build(D, z.device, z.dtype)
    values = []
    for _ in range(1500):
        value, res = semidual(C, pot(z), 0.1, mask)
        values.append(float(value))
        pot.step(z, res.plan)
    assert max(values) <= ref + 1e-12  # a lower bound all along
    # It closes the gap: by 20x, to within 0.5% (Adam at a constant step hovers near the optimum).
    assert ref - values[-1] < 0.05 * (ref - values[0])
    assert ref - values[-1] < 5e-3 * abs(ref)


def test_linear_potential_is_a_strict_lower_bound_when_dim_lt_batch():
    B, D = 32, 2
    z, C = batch(B, D, seed=4)
    ref = newton_ot(C, 0.1).value
    pot = KantorovichPotential(lr=0.05)
    pot.build(D, z.device, z.dtype)
    pot.ascend(z, C, 0.1, None, 1500)
    best = float(semidual(C, pot(z), 0.1)[0])
    assert best < ref - 1e-3


def scaled_batch():
    g = torch.Generator().manual_seed(7)
    B, D = 12, 16
    z = torch.randn(B, D, generator=g, dtype=torch.float64)
    za = z + 0.3 * torch.randn(B, D, generator=g, dtype=torch.float64)
    lg, lga = torch.randn(B, 4, generator=g, dtype=torch.float64), torch.randn(B, 4, generator=g, dtype=torch.float64)
    return z, za, lg, lga


def scaled_loss(dual_input, scale):
    """got_loss with the dual on a fixed, nonzero potential, for features scaled by ``scale``."""
    z, za, lg, lga = scaled_batch()
    pot = KantorovichPotential()
    pot.build(z.shape[1], z.device, torch.float64)
    with torch.no_grad():
        pot.weight.copy_(torch.randn(z.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    return float(
        got_loss(
            scale * z,
            scale * za,
            lg,
            lga,
            solver="dual",
            potential=pot,
            dual_input=dual_input,
            feature_cost="cosine",
            beta=1.0,
            anchor="none",
            debias=False,
        )
    )


def test_embedded_dual_input_is_blind_to_the_feature_scale_like_the_cosine_cost():
    """The exploit of the paper's raw form: with a scale-invariant cost, scaling z scales φ(z) = wᵀz and
    moves (2) at no cost to the model. On the cost's embedding (unit vectors) it cannot."""
    base = scaled_loss("embedded", 1.0)
    for s in (1e-3, 0.5, 10.0, 1e4):
        assert scaled_loss("embedded", s) == pytest.approx(base, rel=1e-12, abs=1e-14)
    raw = [scaled_loss("raw", s) for s in (0.5, 1.0, 10.0)]
    assert abs(raw[0] - raw[1]) > 1e-3 and abs(raw[2] - raw[1]) > 1e-3
    # Raw, z → 0 takes φ to 0: the semi-dual at φ = 0 (the soft-min value), from the formula.
    z, za, lg, lga = scaled_batch()
    at_zero = float(semidual_formula(joint_cost(z, za, lg, lga), torch.zeros(12, dtype=torch.float64), 0.1))
    assert scaled_loss("raw", 1e-12) == pytest.approx(at_zero, rel=1e-9)
