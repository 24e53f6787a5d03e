"""Entropic Sinkhorn (three backends) against independent references: POT's ot.solve, a float64 damped
Newton solve of the semi-dual (tests/ot_reference.py), exact OT (POT's emd2) and closed forms."""

import functools
import math
import types
import warnings

import numpy as np
import ot
import pytest
import torch
from fused_reference import anderson_steps
from ot_reference import newton_ot, primal_value

from got_reg import GOTConvergenceWarning
from got_reg.functional import joint_cost, label_mask, ot_loss
from got_reg.solvers import BACKENDS, OTResult, SinkhornBackend, get_backend, sinkhorn, solve_sinkhorn


def random_cost(B, seed, adversarial=False, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, 16, generator=g, dtype=dtype)
    lg = 2 * torch.randn(B, 5, generator=g, dtype=dtype)
    if adversarial:
        za = z + 0.2 * torch.randn(B, 16, generator=g, dtype=dtype)
        lga = lg + 0.3 * torch.randn(B, 5, generator=g, dtype=dtype)
    else:
        za, lga = torch.randn(B, 16, generator=g, dtype=dtype), 2 * torch.randn(B, 5, generator=g, dtype=dtype)
    return joint_cost(z, za, lg, lga)


def plan_error(P):
    """max(‖P·1 − a‖₁, ‖Pᵀ·1 − b‖₁), recomputed in float64 (not with the library's function)."""
    P = P.double()
    B, Bp = P.shape
    return max(float((P.sum(1) - 1 / B).abs().sum()), float((P.sum(0) - 1 / Bp).abs().sum()))


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
    mask = label_mask(torch.arange(B) % 3) if masked else None
    ref_value, ref_grad = pot_reference(C, theta, mask)
    value = ot_loss(C, theta=theta, mask=mask, tol=1e-11, max_iter=100000)
    (grad,) = torch.autograd.grad(value, C)
    assert abs(float(value.detach()) - ref_value) < 1e-9
    torch.testing.assert_close(grad, ref_grad, atol=1e-9, rtol=1e-6)
    if masked:
        assert (grad[~mask] == 0).all()
    # The two independent references agree, so that either can stand for the exact entropic OT.
    newton = newton_ot(C, theta, mask)
    assert newton.marginal_error < 1e-13 and abs(newton.value - ref_value) < 1e-10
    torch.testing.assert_close(newton.plan, ref_grad, atol=1e-10, rtol=1e-6)
    assert abs(primal_value(C, newton.plan, theta) - newton.value) < 1e-12  # primal = dual at the optimum


def test_value_convention_is_primal_with_kl_term():
    """At convergence: value = <P, C> + θ·KL(P ‖ abᵀ), the convention of POT's ot.solve."""
    C = random_cost(16, seed=5)
    res = solve_sinkhorn(C, 0.3, tol=1e-12, max_iter=100000)
    assert abs(primal_value(C, res.plan, 0.3) - float(res.value)) < 1e-10


def test_closed_form_large_theta_and_single_point():
    # θ → ∞: the plan tends to abᵀ (up to a factor 1 + O(C/θ)), the value to mean(C).
    C = random_cost(10, seed=6)
    res = solve_sinkhorn(C, 1e5, tol=1e-12)
    assert abs(float(res.value) - float(C.mean())) < 1e-3
    torch.testing.assert_close(res.plan, torch.full((10, 10), 0.01, dtype=torch.float64), atol=0, rtol=1e-4)
    # One point on each side: the only plan is P = 1, value = C[0, 0].
    C1 = torch.tensor([[0.7]], dtype=torch.float64)
    assert float(ot_loss(C1)) == pytest.approx(0.7, abs=1e-12)


def test_small_theta_tends_to_exact_ot():
    C = random_cost(20, seed=7)
    exact = ot.emd2(np.full(20, 1 / 20), np.full(20, 1 / 20), C.numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("error", GOTConvergenceWarning)  # it converges: the bound below is W_θ's
        value = float(ot_loss(C, theta=1e-3, max_iter=20000))
    # exact ≤ W_θ ≤ exact + θ·log(B²) (the KL term of any plan is at most log B²).
    assert exact - 1e-3 <= value <= exact + 1e-3 * math.log(400) + 1e-6


@pytest.mark.parametrize("theta", [1e-2, 1e-3])
def test_small_theta_and_large_costs_in_fp32(theta):
    """Costs up to 1e3 at θ = 1e-3: exponents of 1e6 in fp32 stay finite, the warning is given exactly when
    the returned plan misses tol, and the value lies within the entropic bound of exact OT.

    At θ = 1e-3 float32 resolves exponents of 1e6 only to 0.06 (its spacing there), so the marginal error
    floors near 6% and the solve stops unconverged, with a warning. Its value is then a dual objective away
    from the optimum, below W_θ by an amount that depends on the path the rounding takes (measured 0.05% to
    0.2% below exact OT for different Anderson steps and log-sum-exp operators): only a 1% bound is claimed."""
    g = torch.Generator().manual_seed(0)
    C = (torch.rand(32, 32, generator=g) * 1e3).requires_grad_(True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        v = ot_loss(C, theta=theta, max_iter=3000)
    (grad,) = torch.autograd.grad(v, C)
    warned = any(issubclass(w.category, GOTConvergenceWarning) for w in caught)
    assert warned == (plan_error(grad) > 1e-3)
    exact = ot.emd2(np.full(32, 1 / 32), np.full(32, 1 / 32), C.detach().double().numpy())
    # The value is the dual objective with exact columns: ≤ W_θ ≤ exact + θ log B² by weak duality.
    assert float(v.detach()) <= exact + theta * math.log(32**2) + 1e-4 * exact
    assert float(v.detach()) >= exact - (1e-2 if warned else 1e-3) * exact
    assert warned or theta == 1e-2  # converged at θ = 1e-2 (894 sweeps when written); not at 1e-3
    assert float(grad.min()) >= 0  # the gradient is the returned plan


def test_fp32_costs_of_a_thousand_do_not_overflow_and_warn_when_unconverged():
    C = random_cost(32, seed=10, dtype=torch.float32) * 200  # costs up to ~1e3 at θ = 0.1
    # 412 sweeps reach tol here, so 300 cannot (rounding in the cost decides the exact count).
    with pytest.warns(GOTConvergenceWarning, match=r"Sinkhorn \(torch\) stopped with marginal error"):
        res = solve_sinkhorn(C, 0.1, max_iter=300)
    exact = ot.emd2(np.full(32, 1 / 32), np.full(32, 1 / 32), C.double().numpy())
    # exact ≤ W_θ ≤ exact + θ log B²; the value of an unconverged solve (exact columns, row error err) is
    # below W_θ by at most err · (osc f + osc f*) / 2 (tests/fused_reference.value_gap_bound), and
    # osc f* ≤ max C − min C, f* being a soft c-transform of the optimal column potential.
    f = res.potentials[0].double()
    gap = float(res.marginal_error) * (float(f.max() - f.min()) + float(C.max() - C.min())) / 2
    assert exact - gap <= float(res.value) <= exact + 0.1 * math.log(32**2)
    assert plan_error(res.plan) == pytest.approx(float(res.marginal_error), rel=1e-3)
    assert torch.isfinite(res.plan).all() and torch.isfinite(res.potentials[0]).all()  # no overflow


def test_anderson_gives_the_reference_answer_in_fewer_sweeps():
    """Near-diagonal (adversarial-like) plans: plain Sinkhorn's error decays like 1/k there."""
    C = random_cost(32, seed=5, adversarial=True)
    ref = newton_ot(C, 0.1)
    plain = sinkhorn.sinkhorn_log(C, 0.1, tol=1e-5, max_iter=100000, anderson=0)
    fast = sinkhorn.sinkhorn_log(C, 0.1, tol=1e-5, max_iter=100000)
    for res in (plain, fast):  # the stopping claim, checked on the returned plan itself
        assert bool(res.converged) and plan_error(res.plan) <= 1e-5 * (1 + 1e-6)
        torch.testing.assert_close(res.plan.sum(0), torch.full((32,), 1 / 32, dtype=torch.float64))
        assert abs(float(res.value) - ref.value) < 1e-5 * abs(ref.value)
        assert float((res.plan - ref.plan).abs().sum()) < 1e-4
    assert int(fast.iterations) * 3 < int(plain.iterations), (fast.iterations, plain.iterations)


@pytest.mark.parametrize("kind", ["_Anderson", "_HostAnderson"])
def test_anderson_step_is_the_least_squares_extrapolation(kind):
    """_Anderson.step (on the device) and _HostAnderson.step (CPU, numpy) against the definition (Walker & Ni
    2011, type II) written out with a dense least-squares solve (tests/fused_reference.py): the ring keeps
    the last `memory` differences, a growing residual drops them all, the step with no history is the
    plain x + r, and the result has mean 0."""
    n, memory, reg = 12, 3, 1e-10
    acc = getattr(sinkhorn, kind)(torch.zeros(n, dtype=torch.float64), memory, reg)
    for x, r, want in anderson_steps(n, memory, reg, seed=0):
        got = acc.step(x, r)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_host_anderson_step_in_float32_and_on_non_finite_residuals():
    """In float32 the host step agrees with the device step to float32 rounding (its small system is solved
    in float64) and returns float32; a non-finite residual is a restart: the plain step, then a fresh history."""
    n, memory, reg = 300, 8, sinkhorn.ANDERSON_REG[torch.float32]
    host = sinkhorn._HostAnderson(torch.zeros(n), memory, reg)
    device = sinkhorn._Anderson(torch.zeros(n), memory, reg)
    for x, r, _ in anderson_steps(n, memory, reg, seed=2, dtype=torch.float32):
        got = host.step(x, r)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, device.step(x, r), rtol=1e-5, atol=2e-6)
    x, r = torch.linspace(-1.0, 1.0, n), torch.full((n,), math.nan)
    r[0] = 1.0
    out = host.step(x, r)
    assert int(host.w.sum()) == 0 and bool(torch.isnan(out[1:]).all())
    r = torch.ones(n) * 1e-3
    torch.testing.assert_close(host.step(x, r), x + r - (x + r).mean())  # no history after the restart
    assert isinstance(sinkhorn._anderson(torch.zeros(3), 8), sinkhorn._HostAnderson)


def test_a_failing_triton_anderson_step_restarts_in_torch(monkeypatch):
    """If the Triton step raises, the solve is told once and goes on with a fresh torch history: the step
    is then the plain x + r (shifted to mean 0), as after a restart."""
    from got_reg.solvers import lse

    monkeypatch.setattr(lse, "_TRITON_FAILED", False)  # restored afterwards: other tests keep their kernels

    class Broken:
        def __init__(self, x, memory, reg):
            pass

        def step(self, x, r):
            raise RuntimeError("no kernel")

    acc = sinkhorn._TritonAnderson(types.SimpleNamespace(Anderson=Broken), torch.zeros(5), 4, 1e-4)
    x, r = torch.arange(5.0), torch.ones(5)
    with pytest.warns(RuntimeWarning, match="Triton kernel failed .*no kernel"):
        out = acc.step(x, r)
    torch.testing.assert_close(out, x + r - (x + r).mean())
    assert isinstance(acc.impl, sinkhorn._Anderson)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        acc.step(x + 1, r / 2)  # torch from now on, no second warning

    class Unbuildable:
        def __init__(self, x, memory, reg):
            raise RuntimeError("no memory")

    monkeypatch.setattr(lse, "_TRITON_FAILED", False)
    with pytest.warns(RuntimeWarning, match="no memory"):
        acc = sinkhorn._TritonAnderson(types.SimpleNamespace(Anderson=Unbuildable), torch.zeros(5), 4, 1e-4)
    torch.testing.assert_close(acc.step(x, r), x + r - (x + r).mean())


def test_anderson_argument_and_check_interval():
    C = random_cost(24, seed=3)
    with pytest.raises(ValueError, match=r"anderson must be an int in \[0, 16\]"):
        sinkhorn.sinkhorn_log(C, 0.1, anderson=-1)
    with pytest.raises(ValueError, match=r"scaling must be in \(0, 1\)"):
        sinkhorn.sinkhorn_log(C, 0.1, scaling=1.0)
    # The stopping test every sweep (the fused kernel's schedule) or every CHECK_EVERY sweeps (the torch
    # loop's): the same iterates, so the sparse test stops on the first check at or after the other.
    rows, cols = sinkhorn.row_lse(C), sinkhorn.row_lse(C.T.contiguous())
    g, n_anneal = sinkhorn._anneal(rows, cols, C, 0.1, 0.7, 1000)
    counts = {
        k: sinkhorn._accelerated_sweeps(rows, cols, g / 0.1, 0.1, n_anneal, 1000, 1e-6, 8, k)[2]
        for k in (1, sinkhorn.CHECK_EVERY)
    }
    every, sparse = counts[1], counts[sinkhorn.CHECK_EVERY]
    assert (sparse - n_anneal - 1) % sinkhorn.CHECK_EVERY == 0
    assert every <= sparse < every + sinkhorn.CHECK_EVERY
    assert int(sinkhorn.sinkhorn_log(C, 0.1, tol=1e-6).iterations) == sparse


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("anderson", [0, 8])
def test_cuda_torch_loop_reads_the_device_only_for_its_checks(anderson):
    """Beyond the fused kernel (B > 256) the torch loop synchronises for the annealing's cost spread and its
    stopping test every CHECK_EVERY sweeps, nothing else: the Anderson step stays on the device. (Regression:
    writing a host scalar into its slot weights synchronised on every sweep, 3× the time per sweep on an H100.)"""
    C = adversarial_clouds(300)[0].cuda()
    sinkhorn.sinkhorn_log(C, 0.1, anderson=anderson)  # compiles the Triton LSE outside the count
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            res = sinkhorn.sinkhorn_log(C, 0.1, anderson=anderson)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchronizing CUDA operation" in str(w.message)]
    sweeps = int(res.iterations)
    assert sweeps > 2 * sinkhorn.CHECK_EVERY  # enough sweeps that one read per sweep would show
    assert 2 <= len(syncs) <= 1 + math.ceil(sweeps / sinkhorn.CHECK_EVERY), [str(w.message) for w in syncs]


@pytest.mark.parametrize("max_iter", [3, 8, 30, 57])  # inside the ε-annealing, after it, accelerated sweeps
@pytest.mark.parametrize("anderson", [0, 8])
def test_an_unconverged_solve_has_exact_columns_and_its_value_is_a_lower_bound(max_iter, anderson):
    """Stopped by max_iter, the result is still the semi-dual at its own row potential f: columns of the
    plan exact, value = S_θ(f) ≤ W_θ (weak duality). (Regression: the last u-update used to leave the
    columns off by up to 0.4 in L1 and the value unrelated to S_θ(f).)"""
    from ot_reference import semidual_formula

    C = random_cost(32, seed=5, adversarial=True)
    ref = newton_ot(C, 0.1)
    res = sinkhorn.sinkhorn_log(C, 0.1, max_iter=max_iter, tol=1e-12, anderson=anderson)
    assert not bool(res.converged) and int(res.iterations) == max_iter
    torch.testing.assert_close(res.plan.sum(0), torch.full((32,), 1 / 32, dtype=torch.float64), atol=1e-14, rtol=0)
    f = res.potentials[0]
    assert float(res.value) == pytest.approx(float(semidual_formula(C, f, 0.1)), abs=1e-12)
    assert float(res.value) <= ref.value + 1e-12


def test_init_g_from_the_optimum_needs_no_annealing():
    C = random_cost(16, seed=2)
    res = sinkhorn.sinkhorn_log(C, 0.1, tol=1e-12, max_iter=10**5)
    warm = sinkhorn.sinkhorn_log(C, 0.1, tol=1e-10, init_g=res.potentials[1])
    assert int(warm.iterations) == 1  # one exact v-map, then the check passes
    assert abs(float(warm.value) - float(res.value)) < 1e-12


# -- issue 15: every backend meets the same tolerance ------------------------------------------------


def adversarial_clouds(B, seed=0, D=64, K=10):
    """Clean features in K class clusters, logits from a linear head, adversarial = clean + noise (fp32)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(B) % K
    z = torch.randn(K, D, generator=g)[y] + 0.7 * torch.randn(B, D, generator=g)
    head = torch.randn(D, K, generator=g) / math.sqrt(D)
    za = z + 0.3 * torch.randn(B, D, generator=g)
    lg, lga = 3 * z @ head, 3 * za @ head + 0.5 * torch.randn(B, K, generator=g)
    return joint_cost(z, za, lg, lga), y


@functools.cache
def clouds_reference(B, masked):
    C, y = adversarial_clouds(B)
    mask = label_mask(y) if masked else None
    return C, mask, newton_ot(C, 0.1, mask)


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))


@pytest.mark.parametrize("device", ["cpu", CUDA])  # CUDA: the fused Triton solve (B ≤ 256) and the streaming LSE
@pytest.mark.parametrize("B", [32, 96, pytest.param(512, marks=pytest.mark.slow)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_meets_tol_against_a_float64_reference(B, masked, backend, device):
    """cosine + KL on adversarial-like clouds (D = 64, 10 classes), θ = 0.1, the default tol = 1e-3.

    tol bounds the L1 marginal error of the returned plan; the value and the plan are then close to the
    exact optimum. Measured when written: value relative error ≤ 2.8e-4, plan L1 distance ≤ 5.2·tol
    (at B = 512: ill-conditioned near-diagonal plans, where the marginal error understates the plan's)."""
    C, mask, ref = clouds_reference(B, masked)
    assert ref.marginal_error < 1e-12
    C, mask = C.to(device), None if mask is None else mask.to(device)
    tol = 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("error", GOTConvergenceWarning)  # each backend meets tol: no warning
        res = solve_sinkhorn(C, 0.1, mask, backend=backend, tol=tol)
    assert isinstance(res, OTResult) and res.value.ndim == 0 and res.plan.shape == (B, B)
    assert res.plan.device == C.device and bool(res.converged)
    plan = res.plan.cpu()
    err = plan_error(plan)
    assert err <= tol * (1 + 1e-4)
    assert float(res.marginal_error) == pytest.approx(err, rel=1e-3, abs=1e-7)  # measured on the plan returned
    assert abs(float(res.value) - ref.value) <= tol * abs(ref.value)
    assert float((plan.double() - ref.plan).abs().sum()) <= 10 * tol
    if masked:
        assert float(plan[~mask.cpu()].abs().max()) == 0.0


@pytest.mark.filterwarnings("ignore:Sinkhorn did not converge")  # POT's own warning, besides ours
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_iter", [5, 60])  # 5 stops inside the ε-annealing for "torch" (~28 stages), 60 at θ
def test_every_backend_warns_with_the_knob_when_it_misses_tol(backend, max_iter):
    C = random_cost(32, seed=9, dtype=torch.float32)
    with pytest.warns(GOTConvergenceWarning, match=rf"Sinkhorn \({backend}\) .*raise max_iter") as rec:
        res = solve_sinkhorn(C, 0.01, tol=1e-9, max_iter=max_iter, backend=backend)
    assert not bool(res.converged)
    err = plan_error(res.plan)
    assert err > 1e-9 and float(res.marginal_error) == pytest.approx(err, rel=1e-3)
    message = next(str(w.message) for w in rec if issubclass(w.category, GOTConvergenceWarning))
    assert f"marginal error {float(res.marginal_error):.2e} > tol=1e-09" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error", GOTConvergenceWarning)
        warnings.filterwarnings("ignore", message="Sinkhorn did not converge")
        solve_sinkhorn(C, 0.01, tol=1e-9, max_iter=max_iter, backend=backend, warn=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_entries_never_matter_even_when_huge(backend):
    """Forbidden pairs with C = 1e30: the value and gradient are those of the masked problem, exactly 0 there."""
    C = random_cost(12, seed=8, dtype=torch.float32)
    mask = label_mask(torch.tensor([0] * 6 + [1] * 6))
    ref = newton_ot(C, 0.1, mask)
    Cbig = C.masked_fill(~mask, 1e30).requires_grad_(True)
    v = ot_loss(Cbig, mask=mask, backend=backend)
    (g,) = torch.autograd.grad(v, Cbig)
    assert abs(float(v.detach()) - ref.value) <= 1e-3 * abs(ref.value)
    assert float(g[~mask].abs().max()) == 0.0
    assert float((g.double() - ref.plan).abs().sum()) <= 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_solve_many_is_one_solve_per_problem(backend):
    """A (k, B, B) stack with one shared mask: each result is that problem's own solve."""
    mask = label_mask(torch.arange(12) % 3)
    costs = torch.stack([random_cost(12, seed=s, adversarial=s == 0) for s in range(3)])
    b = get_backend(backend)
    many = b.solve_many(costs, 0.5, mask, max_iter=5000, tol=1e-8)
    assert len(many) == 3
    for C, r in zip(costs, many):
        one = b.solve(C, 0.5, mask, max_iter=5000, tol=1e-8)
        torch.testing.assert_close(r.plan, one.plan, atol=1e-12, rtol=0)
        assert float(r.value) == pytest.approx(float(one.value), abs=1e-12)
        assert bool(r.converged) and plan_error(r.plan) <= 1e-8
        assert float(r.value) == pytest.approx(newton_ot(C.masked_fill(~mask, math.inf), 0.5).value, abs=1e-7)


def test_result_of_a_stack_is_the_stack_of_results():
    """_result on (k, B, B') costs with (k, B) and (k, B') potentials (the fused batched solve's path)."""
    costs = torch.stack([random_cost(7, seed=s) for s in range(3)])
    singles = [sinkhorn.sinkhorn_log(C, 0.3, tol=1e-9) for C in costs]
    u = torch.stack([r.potentials[0] for r in singles]) / 0.3
    v = torch.stack([r.potentials[1] for r in singles]) / 0.3
    its = torch.stack([r.iterations for r in singles])
    stacked = sinkhorn._result(costs, u, v, 0.3, its, 1e-9)
    assert stacked.plan.shape == (3, 7, 7) and stacked.value.shape == stacked.marginal_error.shape == (3,)
    for r, one in zip(stacked.unbind(), singles):
        torch.testing.assert_close(r.plan, one.plan, atol=1e-15, rtol=0)
        torch.testing.assert_close(r.value, one.value, atol=1e-15, rtol=0)
        torch.testing.assert_close(r.marginal_error, one.marginal_error, atol=1e-15, rtol=0)
        assert int(r.iterations) == int(one.iterations) and bool(r.converged) == bool(one.converged)


def test_backend_registry_and_custom_backends():
    assert BACKENDS == ("torch", "pot", "geomloss")
    assert [get_backend(b).name for b in BACKENDS] == list(BACKENDS)

    class Halved(SinkhornBackend):
        """A user's backend: our solver on C/2 (so the value is visibly its own)."""

        name = "halved"

        def solve(self, cost, theta, mask, *, max_iter, tol):
            return sinkhorn.sinkhorn_log(cost / 2, theta, mask, max_iter=max_iter, tol=tol)

    mine = Halved()
    assert get_backend(mine) is mine
    C = random_cost(8, seed=1)
    assert float(ot_loss(C, backend=mine, theta=0.2, tol=1e-10)) == pytest.approx(newton_ot(C / 2, 0.2).value, abs=1e-9)
    with pytest.raises(ValueError, match="unknown backend 'keops'"):
        get_backend("keops")


def test_geomloss_restores_grad_mode():
    C = random_cost(8, seed=2)
    with torch.no_grad():
        get_backend("geomloss").solve(C, 0.1, None, max_iter=100, tol=1e-3)
        assert not torch.is_grad_enabled()  # GeomLoss switches it on globally
    assert torch.is_grad_enabled()
