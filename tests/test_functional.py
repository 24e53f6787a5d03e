"""The functional API: got_loss (the module's twin), ot_loss, joint_cost, label_mask, and the new options
anchor and debias, against independent references (POT, the float64 Newton solve, closed forms, autograd
through the formula with the plans held fixed)."""

import dataclasses
import inspect
import math
import warnings

import pytest
import torch
from ot_reference import newton_ot, pot_solve, semidual_formula

from got_reg import GOTConvergenceWarning, GOTRegularizer
from got_reg.functional import GOTConfig, got_forward, got_loss, joint_cost, label_mask, ot_loss
from got_reg.solvers import KantorovichPotential, SinkhornBackend, get_backend

F64 = dict(dtype=torch.float64)


# Batches whose entropic plans at θ = 0.5 are diffuse enough for Sinkhorn to reach tol = 1e-10 in ~100
# sweeps, self-terms included (at θ = 0.1 near-permutation plans make it crawl like 1/k: not a bug).
THETA, TIGHT = 0.5, dict(tol=1e-10, max_iter=20000)


def batch(B=10, D=6, K=3, seed=0, eps=1.0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, D, generator=g, **F64)
    lg = 0.5 * torch.randn(B, K, generator=g, **F64)
    za = z + eps * torch.randn(B, D, generator=g, **F64)
    lga = lg + eps * torch.randn(B, K, generator=g, **F64)
    return z, za, lg, lga, torch.arange(B) % K


# -- twins -------------------------------------------------------------------------------------------


def test_the_module_and_the_function_have_the_same_options_and_defaults():
    """Twins: every option of got_loss that the module has too takes the same default in both, and in
    GOTConfig (the one set of checks). The values of the provisional defaults are not asserted here."""
    fn = inspect.signature(got_loss).parameters
    mod = inspect.signature(GOTRegularizer.__init__).parameters
    cfg = {f.name: f.default for f in dataclasses.fields(GOTConfig) if f.init}
    shared = set(cfg)
    assert shared <= set(fn) and shared <= set(mod)
    for name in shared:
        assert fn[name].default == mod[name].default == cfg[name], name
    # The function's other keywords are its inputs and the dual's state; the module's its hooks and state.
    assert set(fn) - shared == {"z", "z_adv", "logits", "logits_adv", "y", "potential", "update_potential"}
    assert {"model", "layer", "dual_lr", "dual_steps", "distributed_gather", "nan_policy"} <= set(mod) - shared


def test_config_checks_each_option_once():
    with pytest.raises(ValueError, match="unknown anchor 'clena'.*Did you mean 'clean'"):
        GOTConfig(anchor="clena")
    with pytest.raises(ValueError, match="unknown dual_input 'unit'"):
        GOTConfig(dual_input="unit")
    with pytest.raises(TypeError, match="debias must be a bool"):
        GOTConfig(debias=1)
    with pytest.raises(ValueError, match="beta must be finite and >= 0"):
        GOTConfig(beta=float("nan"))
    with pytest.raises(TypeError, match="max_iter must be an int"):
        GOTConfig(max_iter=10.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        GOTConfig().beta = 2.0


# -- got_loss against the exact entropic OT --------------------------------------------------------


@pytest.mark.parametrize("lm", [False, True])
def test_got_loss_is_beta_times_the_exact_entropic_ot(lm):
    z, za, lg, lga, y = batch()
    ref = newton_ot(joint_cost(z, za, lg, lga, lam=0.5), THETA, label_mask(y) if lm else None).value
    v = got_loss(
        z, za, lg, lga, y, beta=3.0, lam=0.5, theta=THETA, label_matching=lm, anchor="none", debias=False, **TIGHT
    )
    assert float(v) == pytest.approx(3.0 * ref, rel=1e-9)


def test_got_loss_flattens_features_and_raises_on_non_finite_inputs():
    z, za, lg, lga, y = batch(D=12)
    v = got_loss(z.reshape(10, 3, 4), za.reshape(10, 3, 4), lg, lga, debias=False, theta=THETA, **TIGHT)
    assert float(v) == pytest.approx(float(got_loss(z, za, lg, lga, debias=False, theta=THETA, **TIGHT)), rel=1e-12)
    bad = za.clone()
    bad[2, 3] = float("inf")
    with pytest.raises(FloatingPointError, match=r"z_adv holds 0 NaN and 1 inf"):
        got_loss(z, bad, lg, lga)
    with pytest.raises(ValueError, match="label_matching=True needs the labels y"):
        got_loss(z, za, lg, lga, label_matching=True)
    with pytest.raises(ValueError, match="solver='dual' needs potential"):
        got_loss(z, za, lg, lga, solver="dual")


def test_got_loss_warns_when_sinkhorn_misses_tol():
    z, za, lg, lga, _ = batch()
    with pytest.warns(GOTConvergenceWarning, match="raise max_iter"):
        got_loss(z, za, lg, lga, debias=False, tol=1e-12, max_iter=3)


# -- anchor ------------------------------------------------------------------------------------------


def fixed_plan_objective(z, za, lg, lga, P, lam=1.0):
    """<P, C> with P held fixed: the envelope theorem says its gradient is W's."""
    return (P * joint_cost(z, za, lg, lga, lam=lam)).sum()


@pytest.mark.parametrize("lm", [False, True])
@pytest.mark.parametrize("anchor", ["none", "clean", "features"])
def test_anchor_decides_which_side_gets_the_envelope_gradient(anchor, lm):
    """ "none": both batches get the gradient of <P*, C>; "clean": the clean features and logits get exactly
    none and the adversarial side the gradient through its own arguments only; "features": z gets none,
    the clean logits do."""
    z, za, lg, lga, y = batch(seed=1)
    mask = label_mask(y) if lm else None
    P = newton_ot(joint_cost(z, za, lg, lga), THETA, mask).plan
    leaves = [t.clone().requires_grad_(True) for t in (z, za, lg, lga)]
    v = got_loss(*leaves, y, beta=2.0, theta=THETA, label_matching=lm, anchor=anchor, debias=False, **TIGHT)
    got = torch.autograd.grad(v, leaves, allow_unused=True)
    refs = [t.clone().requires_grad_(True) for t in (z, za, lg, lga)]
    expected = torch.autograd.grad(2.0 * fixed_plan_objective(*refs, P), refs)
    clean_fixed = {"none": (), "clean": (0, 2), "features": (0,)}[anchor]
    for k, (g, e) in enumerate(zip(got, expected)):
        if k in clean_fixed:
            assert g is None or float(g.abs().max()) == 0.0  # exactly no gradient
        else:
            # The adversarial side's gradient through its own arguments only: the same partial derivative.
            torch.testing.assert_close(g, e, rtol=1e-7, atol=1e-10)
    # The anchor changes where the gradient goes, not the value.
    v_none = got_loss(z, za, lg, lga, y, beta=2.0, theta=THETA, label_matching=lm, anchor="none", debias=False, **TIGHT)
    assert float(v.detach()) == pytest.approx(float(v_none), rel=1e-12)


def test_clean_anchor_also_cuts_the_dual_potentials_path_to_the_clean_features():
    z, za, lg, lga, y = batch(seed=2)
    pot = KantorovichPotential()
    pot.build(z.shape[1], z.device, torch.float64)
    with torch.no_grad():
        pot.weight.copy_(torch.randn(z.shape[1], generator=torch.Generator().manual_seed(0), **F64))
    for anchor, clean_grad in (("clean", False), ("none", True)):
        zc, zac = z.clone().requires_grad_(True), za.clone().requires_grad_(True)
        v = got_loss(zc, zac, lg, lga, solver="dual", potential=pot, anchor=anchor, debias=False)
        g, ga = torch.autograd.grad(v, (zc, zac), allow_unused=True)
        assert (g is not None and float(g.abs().max()) > 0) == clean_grad
        assert float(ga.abs().max()) > 0


# -- debias --------------------------------------------------------------------------------------------


def divergence(z, za, lg, lga, theta, mask, solve):
    W = lambda a, b, c, d: solve(joint_cost(a, b, c, d), theta, mask).value  # noqa: E731
    return W(z, za, lg, lga) - 0.5 * W(z, z, lg, lg) - 0.5 * W(za, za, lga, lga)


@pytest.mark.parametrize("lm, reference", [(False, "pot"), (False, "newton"), (True, "newton")])
def test_debias_is_the_sinkhorn_divergence(lm, reference):
    """W(x, y) − ½W(x, x) − ½W(y, y), each term solved by POT's ot.solve or the Newton reference in float64.
    (POT takes minutes on the masked self-terms, whose plans are near-diagonal: Newton stands in there.)"""
    z, za, lg, lga, y = batch()
    mask = label_mask(y) if lm else None
    solve = pot_solve if reference == "pot" else newton_ot
    ref = divergence(z, za, lg, lga, THETA, mask, solve)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GOTConvergenceWarning)
        v = got_loss(z, za, lg, lga, y, beta=1.0, theta=THETA, label_matching=lm, anchor="none", debias=True, **TIGHT)
    assert float(v) == pytest.approx(ref, abs=1e-9)


def test_debias_is_zero_on_identical_batches_where_w_has_the_entropic_floor():
    """Collapsed, identical batches with label matching: n copies of one point per class (K classes). Each
    class block has cost 0, so P is uniform on the blocks and W = θ·KL(P ‖ 1/B²) = θ log K exactly, the
    floor that makes W reward collapse; the Sinkhorn divergence is 0."""
    K, n, theta = 4, 3, 0.1
    g = torch.Generator().manual_seed(3)
    y = torch.arange(K).repeat(n)
    z, lg = torch.randn(K, 5, generator=g, **F64)[y], 3 * torch.randn(K, K, generator=g, **F64)[y]
    opts = dict(beta=1.0, theta=theta, label_matching=True, anchor="none", tol=1e-12)
    w = got_loss(z, z, lg, lg, y, debias=False, **opts)
    assert float(w) == pytest.approx(theta * math.log(K), abs=1e-12)
    assert abs(float(got_loss(z, z, lg, lg, y, debias=True, **opts))) < 1e-12
    # Any batch under label matching: W ≥ θ log K (costs ≥ 0, P on blocks of mass 1/K each).
    z2, za2, lg2, lga2, _ = batch(B=12, K=K, seed=4)
    w2 = got_loss(z2, za2, lg2, lga2, y, beta=1.0, theta=THETA, label_matching=True, debias=False, tol=1e-8)
    assert float(w2) >= THETA * math.log(K) - 1e-8


@pytest.mark.parametrize("seed", range(5))
def test_debias_is_non_negative_for_a_positive_definite_kernel(seed):
    """With cosine + L1 the Gibbs kernel exp(−C/θ) is positive definite (a product of exp(cos/θ) and a
    Laplace kernel), and then the Sinkhorn divergence is ≥ 0 (Feydy et al., 2019), up to the solver's tol."""
    for eps in (0.01, 0.3, 2.0):
        z, za, lg, lga, _ = batch(B=8, seed=seed, eps=eps)
        with warnings.catch_warnings():
            warnings.simplefilter("error", GOTConvergenceWarning)
            v = got_loss(z, za, lg, lga, prob_cost="l1", beta=1.0, theta=THETA, anchor="none", debias=True, tol=1e-8)
        assert float(v) >= -1e-8


@pytest.mark.parametrize("anchor", ["none", "clean", "features"])
def test_debias_gradient_is_that_of_the_three_envelope_terms(anchor):
    """d/d(inputs) of W(x, y) − ½W(x, x) − ½W(y, y): autograd through
    <P_xy, C_xy> − ½<P_xx, C_xx> − ½<P_yy, C_yy> with the three plans from the Newton reference held
    fixed (the clean side detached for anchor="clean", its features for anchor="features")."""
    z, za, lg, lga, y = batch(seed=5)
    mask = label_mask(y)
    plans = [
        newton_ot(joint_cost(a, b, c, d), THETA, mask).plan
        for a, b, c, d in ((z, za, lg, lga), (z, z, lg, lg), (za, za, lga, lga))
    ]
    leaves = [t.clone().requires_grad_(True) for t in (z, za, lg, lga)]
    v = got_loss(*leaves, y, beta=1.5, theta=THETA, label_matching=True, anchor=anchor, debias=True, **TIGHT)
    got = torch.autograd.grad(v, leaves, allow_unused=True)
    refs = [t.clone().requires_grad_(True) for t in (z, za, lg, lga)]
    rz, rza, rlg, rlga = refs
    rz_ = rz.detach() if anchor in ("clean", "features") else rz
    rlg_ = rlg.detach() if anchor == "clean" else rlg
    obj = (
        fixed_plan_objective(rz_, rza, rlg_, rlga, plans[0])
        - 0.5 * fixed_plan_objective(rz_, rz_, rlg_, rlg_, plans[1])
        - 0.5 * fixed_plan_objective(rza, rza, rlga, rlga, plans[2])
    )
    expected = torch.autograd.grad(1.5 * obj, refs, allow_unused=True)
    for g, e in zip(got, expected):
        if e is None:
            assert g is None or float(g.abs().max()) == 0.0
        else:
            torch.testing.assert_close(g, e, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("solver", ["sinkhorn", "dual"])
def test_debias_hands_the_backend_one_stack_of_the_three_costs(solver):
    """The debiased loss asks its backend once, with C(x, y), C(x, x), C(y, y) stacked (C(x, y) only for
    Sinkhorn: the dual has its own), so that a GPU backend can solve them in one launch; each block is the
    joint cost of that pair, computed here independently."""
    z, za, lg, lga, y = batch(seed=6)
    calls = []

    class Recording(SinkhornBackend):
        name = "recording"

        def solve(self, cost, theta, mask, *, max_iter, tol):
            raise AssertionError("the debiased loss should call solve_many")

        def solve_many(self, costs, theta, mask, *, max_iter, tol):
            calls.append(costs.clone())
            return [get_backend("torch").solve(c, theta, mask, max_iter=max_iter, tol=tol) for c in costs]

    potential = KantorovichPotential() if solver == "dual" else None
    cfg = GOTConfig(solver=solver, theta=THETA, debias=True, backend=Recording())
    got_forward(cfg, z, za, lg, lga, y, potential=potential)
    expected = [joint_cost(z, z, lg, lg), joint_cost(za, za, lga, lga)]
    if solver == "sinkhorn":
        expected.insert(0, joint_cost(z, za, lg, lga))
    assert len(calls) == 1 and calls[0].shape == (len(expected), 10, 10)
    torch.testing.assert_close(calls[0], torch.stack(expected), rtol=0, atol=1e-14)


def test_debias_warns_when_a_self_term_misses_tol():
    """The self-terms are Sinkhorn solves too: missing tol there warns like the cross term (regression:
    only the cross term's convergence was read, so these went unreported)."""
    g = torch.Generator().manual_seed(0)
    z, lg = torch.randn(16, 8, generator=g, **F64), 2 * torch.randn(16, 4, generator=g, **F64)
    za, lga = torch.randn(16, 8, generator=g, **F64), 0.01 * torch.randn(16, 4, generator=g, **F64)
    opts = dict(theta=0.1, tol=1e-6, max_iter=50)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GOTConvergenceWarning)
        got_loss(z, za, lg, lga, debias=False, **opts)  # the cross term alone meets tol
    with pytest.warns(GOTConvergenceWarning, match=r"marginal error [0-9.]+e-04 > tol=1e-06"):
        got_loss(z, za, lg, lga, debias=True, **opts)  # W(x, x) stops at 9.0e-4


# -- ot_loss -----------------------------------------------------------------------------------------


def test_ot_loss_detach_and_envelope():
    C = joint_cost(*batch()[:4]).requires_grad_(True)
    ref = newton_ot(C, THETA)
    v = ot_loss(C, theta=THETA, **TIGHT)
    (g,) = torch.autograd.grad(v, C)
    assert float(v.detach()) == pytest.approx(ref.value, abs=1e-10)
    torch.testing.assert_close(g, ref.plan, atol=1e-10, rtol=1e-7)
    d = ot_loss(C, theta=THETA, grad="detach", **TIGHT)
    assert not d.requires_grad and float(d) == float(v.detach())


@pytest.mark.parametrize("masked", [False, True])
def test_ot_loss_dual_is_the_semidual_formula_with_its_gradients(masked):
    z, za, lg, lga, y = batch(seed=6)
    mask = label_mask(y) if masked else None
    C = joint_cost(z, za, lg, lga).requires_grad_(True)
    phi = torch.randn(10, generator=torch.Generator().manual_seed(1), **F64).requires_grad_(True)
    v = ot_loss(C, solver="dual", potential=phi, mask=mask)
    got = torch.autograd.grad(v, (C, phi))
    ref = semidual_formula(C, phi, 0.1, mask)
    expected = torch.autograd.grad(ref, (C, phi))
    assert float(v.detach()) == pytest.approx(float(ref.detach()), abs=1e-13)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    assert not ot_loss(C, solver="dual", potential=phi, grad="detach").requires_grad


def test_ot_loss_input_errors():
    C = torch.rand(4, 4)
    with pytest.raises(ValueError, match="square"):
        ot_loss(torch.rand(4, 5))
    with pytest.raises(ValueError, match="unknown solver 'sinkorn'"):
        ot_loss(C, solver="sinkorn")
    with pytest.raises(ValueError, match="unknown backend 'keops'"):
        ot_loss(C, backend="keops")
    with pytest.raises(ValueError, match="unknown grad 'unrolled'"):
        ot_loss(C, grad="unrolled")
    with pytest.raises(TypeError, match="bool"):
        ot_loss(C, mask=torch.ones(4, 4))
    with pytest.raises(ValueError, match=r"mask must have the cost's shape \(4, 4\)"):
        ot_loss(C, mask=torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"no allowed entry in rows \[3\]"):
        ot_loss(C, mask=torch.eye(4, dtype=torch.bool) & (torch.arange(4) < 3)[:, None])
    with pytest.raises(FloatingPointError, match="NaN"):
        ot_loss(C.masked_fill(torch.eye(4, dtype=torch.bool), float("nan")))
    with pytest.raises(ValueError, match="theta"):
        ot_loss(C, theta=0.0)
    with pytest.raises(TypeError, match="floating-point"):
        ot_loss(torch.ones(4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="needs potential"):
        ot_loss(C, solver="dual")
    with pytest.raises(ValueError, match="potential is used by solver='dual' only"):
        ot_loss(C, potential=torch.zeros(4))
    with pytest.raises(ValueError, match=r"potential must have shape \(4,\)"):
        ot_loss(C, solver="dual", potential=torch.randn(3))


def test_a_column_with_no_allowed_pair_is_refused_for_either_solver():
    C = torch.rand(4, 4)
    mask = torch.eye(4, dtype=torch.bool)
    mask[:, 2] = False
    for kw in ({}, {"solver": "dual", "potential": torch.zeros(4)}):
        with pytest.raises(ValueError, match=r"no allowed entry in rows \[2\] / columns \[2\]"):
            ot_loss(C, mask=mask, **kw)


def test_issue13_6_a_label_mask_of_batches_with_different_class_counts_is_refused():
    """Issue 13 (6): no plan with uniform marginals exists; say so, instead of a convergence warning."""
    C = torch.rand(3, 3, generator=torch.Generator().manual_seed(0))
    mask = label_mask(torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", GOTConvergenceWarning)
        with pytest.raises(ValueError, match="mask admits no plan with uniform marginals.*same number of examples"):
            ot_loss(C, mask=mask)
        with pytest.raises(ValueError, match="mask admits no plan with uniform marginals"):
            ot_loss(C, mask=mask, solver="dual", potential=torch.zeros(3))
    # Same class counts in another order: feasible, and the value is the exact one.
    mask = label_mask(torch.tensor([0, 1, 0, 1]), torch.tensor([1, 1, 0, 0]))
    C = torch.rand(4, 4, generator=torch.Generator().manual_seed(1), **F64)
    assert float(ot_loss(C, mask=mask, tol=1e-12)) == pytest.approx(newton_ot(C, 0.1, mask).value, abs=1e-11)


def test_an_infeasible_mask_that_is_not_a_block_mask_is_left_to_the_solver_and_warns():
    """Rows 0 and 1 may only use column 0 (2/3 of the mass into a column of 1/3): no feasible plan, but not a
    block pattern, so the check passes it on; the solver then misses tol and says so (no NaN)."""
    mask = torch.tensor([[1, 0, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    C = torch.rand(3, 3, generator=torch.Generator().manual_seed(2))
    with pytest.warns(GOTConvergenceWarning):
        v = ot_loss(C, mask=mask, max_iter=200)
    assert math.isfinite(float(v))


# -- joint_cost / label_mask ---------------------------------------------------------------------------


def test_label_mask_against_brute_force():
    y, ya = torch.tensor([0, 2, 1, 2]), torch.tensor([2, 2, 0, 1, 1])
    m = label_mask(y, ya)
    assert m.dtype == torch.bool and m.shape == (4, 5)
    assert m.tolist() == [[int(a) == int(b) for b in ya] for a in y]
    assert torch.equal(label_mask(y), label_mask(y, y))


def test_issue13_10_labels_on_another_device_get_the_librarys_message():
    """Issue 13 (10): a label tensor on another device is named in our message, not torch's (the "meta"
    device stands in for a second device on a CPU-only machine)."""
    y = torch.arange(4)
    with pytest.raises(ValueError, match="y and y_adv must be on one device, got cpu and meta"):
        label_mask(y, y.to("meta"))
    z, za, lg, lga, _ = batch(B=4)
    with pytest.raises(ValueError, match="y must be on the logits' device cpu, got meta"):
        got_loss(z, za, lg, lga, y.to("meta"), label_matching=True)
    with pytest.raises(TypeError, match="integer class indices"):
        label_mask(y.float())


def test_joint_cost_is_the_jointcost():
    z, za, lg, lga, _ = batch()
    from got_reg.costs import JointCost

    torch.testing.assert_close(
        joint_cost(z, za, lg, lga, lam=0.3, feature_cost="l2", prob_cost="l1"),
        JointCost("l2", "l1", 0.3)(z, za, lg, lga),
        rtol=0,
        atol=0,
    )
