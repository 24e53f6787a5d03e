"""Invariants of the entropic OT value, checked on random inputs with hypothesis."""

import math
import warnings

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from got_reg import GOTConvergenceWarning
from got_reg.functional import got_loss, joint_cost, ot_loss

SETTINGS = settings(max_examples=25, deadline=None)
floats = st.floats(-3, 3, allow_nan=False, width=64)


def solve(C, theta=0.5):
    with warnings.catch_warnings():
        warnings.simplefilter("error", GOTConvergenceWarning)  # every example converges: the bounds are W_θ's
        return float(ot_loss(C, theta=theta, tol=1e-10, max_iter=20000))


@st.composite
def cost_matrices(draw):
    B = draw(st.integers(1, 8))
    return torch.from_numpy(draw(arrays(np.float64, (B, B), elements=st.floats(0, 5, width=64))))


@SETTINGS
@given(cost_matrices(), st.floats(-10, 10, width=64))
def test_adding_a_constant_shifts_the_value(C, c):
    assert abs(solve(C + c) - (solve(C) + c)) < 1e-7


@SETTINGS
@given(cost_matrices(), st.floats(0.1, 10, width=64))
def test_value_is_homogeneous_in_cost_and_theta(C, s):
    assert abs(solve(s * C, theta=0.5 * s) - s * solve(C)) < 1e-6 * max(1, s)


@SETTINGS
@given(cost_matrices())
def test_value_lies_between_its_bounds(C):
    """min over plans ≥ min_ij C; ≤ the independent plan's mean(C) and ≤ diagonal plan's mean(diag) + θ log B."""
    B = C.shape[0]
    v = solve(C)
    assert v >= float(C.min()) - 1e-8
    assert v <= float(C.mean()) + 1e-8
    assert v <= float(C.diagonal().mean()) + 0.5 * math.log(B) + 1e-8


@SETTINGS
@given(st.integers(2, 8), st.integers(0, 10_000), st.sampled_from(["cosine", "l2"]), st.sampled_from(["kl", "l1"]))
def test_non_negative_and_identical_inputs_give_the_entropic_minimum(B, seed, fc, pc):
    g = torch.Generator().manual_seed(seed)
    z, za = torch.randn(B, 5, generator=g, dtype=torch.float64), torch.randn(B, 5, generator=g, dtype=torch.float64)
    lg, lga = torch.randn(B, 3, generator=g, dtype=torch.float64), torch.randn(B, 3, generator=g, dtype=torch.float64)
    # θ of the order of the largest cost: identical batches have near-diagonal plans, on which Sinkhorn
    # crawls when θ is small against the off-diagonal costs (B = 3, l2 + KL costs up to 6.7 at θ = 0.5 still
    # missed tol = 1e-7 after 20 000 sweeps); the properties hold for every θ.
    c_max = max(
        float(joint_cost(a, b, c, d, feature_cost=fc, prob_cost=pc).max())
        for a, b, c, d in ((z, za, lg, lga), (z, z, lg, lg))
    )
    theta = max(0.5, 0.5 * c_max)
    opts = dict(
        feature_cost=fc, prob_cost=pc, theta=theta, beta=1.0, anchor="none", debias=False, tol=1e-7, max_iter=20000
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", GOTConvergenceWarning)
        v = float(got_loss(z, za, lg, lga, **opts))
        same = float(got_loss(z, z, lg, lg, **opts))
    diag = joint_cost(z, z, lg, lg, feature_cost=fc, prob_cost=pc).diagonal()
    # Costs are ≥ 0 and so is the KL term. Identical batches have a (numerically) zero diagonal, so the
    # value is at most θ log B, the entropic floor (0 for θ → 0, the minimum of any distance).
    assert float(diag.abs().max()) < 1e-7
    assert v >= -1e-9 and same >= -1e-9
    assert same <= float(diag.mean()) + theta * math.log(B) + 1e-9


@SETTINGS
@given(st.integers(2, 7), st.integers(0, 10_000))
def test_permuting_the_adversarial_batch_leaves_the_value(B, seed):
    g = torch.Generator().manual_seed(seed)
    z, za = torch.randn(B, 4, generator=g, dtype=torch.float64), torch.randn(B, 4, generator=g, dtype=torch.float64)
    lg, lga = torch.randn(B, 3, generator=g, dtype=torch.float64), torch.randn(B, 3, generator=g, dtype=torch.float64)
    perm = torch.randperm(B, generator=g)
    C, Cp = joint_cost(z, za, lg, lga), joint_cost(z, za[perm], lg, lga[perm])
    assert abs(solve(C) - solve(Cp)) < 1e-8
