"""Probability costs d_y (KL, L1) on logits against brute force over pairs and autograd through it."""

import numpy as np
import pytest
import torch
from ot_reference import brute_prob_cost as brute
from ot_reference import np_softmax as softmax

from got_reg.costs import KLCost, L1Cost, get_prob_cost


@pytest.mark.parametrize("cost", [KLCost(), L1Cost()], ids=["kl", "l1"])
def test_pairwise_matches_brute_force(cost):
    g = torch.Generator().manual_seed(0)
    lg = 3 * torch.randn(7, 4, generator=g, dtype=torch.float64)
    lga = 3 * torch.randn(5, 4, generator=g, dtype=torch.float64)
    np.testing.assert_allclose(
        cost.pairwise(lg, lga).numpy(), brute(cost.name, lg.numpy(), lga.numpy()), rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("cost", [KLCost(), L1Cost()], ids=["kl", "l1"])
def test_gradient_matches_autograd_through_the_formula(cost):
    """L1's custom backward (one class at a time) and KL's factorised form against plain autograd."""
    g = torch.Generator().manual_seed(2)
    lg = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    lga = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(5, 4, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((cost.pairwise(lg, lga) * W).sum(), (lg, lga))
    p, q = lg.softmax(1), lga.softmax(1)
    if isinstance(cost, L1Cost):
        ref = (p[:, None] - q[None]).abs().sum(2)
    else:
        ref = (p[:, None] * (p[:, None].log() - q[None].log())).sum(2)
    expected = torch.autograd.grad((ref * W).sum(), (lg, lga))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_kl_factorized_form_and_embedding():
    g = torch.Generator().manual_seed(1)
    lg, lga = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g, dtype=torch.float64)
    row, left, right = KLCost().factorized(lg, lga)
    torch.testing.assert_close(row[:, None] + left @ right.T, torch.from_numpy(brute("kl", lg.numpy(), lga.numpy())))
    for cost in (KLCost(), L1Cost()):
        torch.testing.assert_close(cost.embed(lg), torch.from_numpy(softmax(lg.numpy())))


def test_kl_is_finite_and_exact_for_saturated_logits():
    lg = torch.tensor([[1000.0, -1000.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    C = KLCost().pairwise(lg, lg.flip(0))
    # p = (1, 0, 0) vs q = uniform: KL = log 3; uniform vs (1, 0, 0): KL = mean_k (log(1/3) − log q_k) = 2000/3 + …
    assert float(C[0, 0]) == pytest.approx(np.log(3), rel=1e-12)
    log_q = torch.log_softmax(lg[0], 0)
    assert float(C[1, 1]) == pytest.approx(float((np.log(1 / 3) - log_q).mean()), rel=1e-12)
    assert float(C[1, 0]) == 0.0 and float(C[0, 1]) == 0.0  # KL(p‖p) clamped at 0, not −1e-16


def test_l1_is_bounded_by_two_and_zero_on_identical_rows():
    g = torch.Generator().manual_seed(3)
    lg = 20 * torch.randn(8, 5, generator=g, dtype=torch.float64)
    C = L1Cost().pairwise(lg, lg)
    assert float(C.max()) <= 2.0 and float(C.diagonal().abs().max()) == 0.0


def test_factory():
    assert isinstance(get_prob_cost("kl"), KLCost) and isinstance(get_prob_cost("l1"), L1Cost)
    custom = L1Cost()
    assert get_prob_cost(custom) is custom
    with pytest.raises(ValueError, match="unknown prob_cost 'js'"):
        get_prob_cost("js")
