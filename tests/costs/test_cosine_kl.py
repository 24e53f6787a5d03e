"""The fused cosine + KL node (got_reg.costs._cosine_kl) against autograd through the separate public costs,
torch.autograd.gradcheck, and brute force; the self-cost path; what it must not do (double backward)."""

import numpy as np
import pytest
import torch
from ot_reference import brute_feature_cost as brute_feature
from ot_reference import brute_prob_cost as brute_prob

from got_reg.costs import CosineCost, JointCost, KLCost
from got_reg.costs._cosine_kl import CosineKL

F64 = dict(dtype=torch.float64)


def separate(z, za, lg, lga, lam):
    """λ·cosine + KL through the public pairwise methods: plain autograd, no shared code with the node."""
    return lam * CosineCost().pairwise(z, za) + KLCost().pairwise(lg, lga)


def batch(B=6, Bp=5, D=7, K=4, seed=0, zero_rows=(), saturated=False):
    g = torch.Generator().manual_seed(seed)
    z, za = torch.randn(B, D, generator=g, **F64), torch.randn(Bp, D, generator=g, **F64)
    lg, lga = 3 * torch.randn(B, K, generator=g, **F64), 3 * torch.randn(Bp, K, generator=g, **F64)
    for i in zero_rows:  # dead ReLU units: no direction
        z[i] = 0.0
    if saturated:
        lg[0] = torch.tensor([60.0, -60.0, 0.0, 1.0], **F64)[:K]
    return z, za, lg, lga


@pytest.mark.parametrize("lam", [1.0, 0.3, 2.5])
@pytest.mark.parametrize("zero_rows", [(), (1, 4)])
def test_value_and_gradients_equal_autograd_through_the_separate_costs(lam, zero_rows):
    z, za, lg, lga = (t.requires_grad_(True) for t in batch(zero_rows=zero_rows, saturated=True))
    W = torch.rand(6, 5, generator=torch.Generator().manual_seed(9), **F64)
    fused = CosineKL.apply(z, lg, za, lga, lam, 1e-12)
    ref = separate(z, za, lg, lga, lam)
    torch.testing.assert_close(fused, ref, rtol=1e-12, atol=1e-12)
    ga = torch.autograd.grad((W * fused).sum(), (z, lg, za, lga))
    gb = torch.autograd.grad((W * ref).sum(), (z, lg, za, lga))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for i in zero_rows:
        assert torch.all(ga[0][i] == 0), "a zero feature row has no direction: zero gradient"


def test_self_cost_equals_the_two_sided_node_on_one_tensor():
    """C(x, x) from one tensor: the same value as passing it on both sides, and the sum of both sides' gradients."""
    z, _, lg, _ = batch(B=7, seed=3, zero_rows=(2,))
    z, lg = z.requires_grad_(True), lg.requires_grad_(True)
    W = torch.rand(7, 7, generator=torch.Generator().manual_seed(4), **F64)
    one = CosineKL.apply(z, lg, None, None, 0.7, 1e-12)
    ref = separate(z, z, lg, lg, 0.7)
    torch.testing.assert_close(one, ref, rtol=1e-12, atol=1e-12)
    ga = torch.autograd.grad((W * one).sum(), (z, lg))
    gb = torch.autograd.grad((W * ref).sum(), (z, lg))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("same", [False, True])
def test_gradcheck(same):
    """Finite differences of the node itself (float64), both paths; inputs away from the clamp at 0."""
    z, za, lg, lga = (t.requires_grad_(True) for t in batch(B=4, Bp=3, D=5, K=3, seed=5))
    if same:
        fn = lambda a, b: CosineKL.apply(a, b, None, None, 1.3, 1e-12)  # noqa: E731
        args = (z, lg)
    else:
        fn = lambda a, b, c, d: CosineKL.apply(a, b, c, d, 1.3, 1e-12)  # noqa: E731
        args = (z, lg, za, lga)
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_matches_brute_force_and_is_what_joint_cost_builds():
    z, za, lg, lga = batch(seed=7)
    C = JointCost("cosine", "kl", lam=1.7)(z, za, lg, lga)
    assert C.grad_fn is None  # no input needs grad
    z.requires_grad_(True)
    C = JointCost("cosine", "kl", lam=1.7)(z, za, lg, lga)
    assert type(C.grad_fn).__name__ == "CosineKLBackward"
    ref = 1.7 * brute_feature("cosine", z.detach().numpy(), za.numpy()) + brute_prob("kl", lg.numpy(), lga.numpy())
    np.testing.assert_allclose(C.detach().numpy(), ref, rtol=1e-10, atol=1e-12)
    assert (C >= 0).all()


def test_only_the_inputs_that_need_it_get_a_gradient():
    """Anchored (detached) clean side: no gradient is computed or returned for it."""
    z, za, lg, lga = batch(seed=8)
    za.requires_grad_(True)
    C = CosineKL.apply(z, lg, za, lga, 1.0, 1e-12)
    C.sum().backward()
    assert z.grad is None and lg.grad is None and lga.grad is None
    za_ref = za.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(separate(z, za_ref, lg, lga, 1.0).sum(), za_ref)
    torch.testing.assert_close(za.grad, g, rtol=1e-10, atol=1e-12)


def test_identical_batches_give_a_zero_diagonal_and_no_negative_cost():
    z, _, lg, _ = batch(B=5, seed=2)
    C = CosineKL.apply(z.float(), lg.float(), None, None, 1.0, 1e-12)
    assert C.dtype == torch.float32
    assert (C >= 0).all()
    assert C.diagonal().abs().max() < 1e-5


def test_double_backward_raises_instead_of_a_wrong_second_derivative():
    z, za, lg, lga = (t.requires_grad_(True) for t in batch(seed=1))
    C = CosineKL.apply(z, lg, za, lga, 1.0, 1e-12)
    (gz,) = torch.autograd.grad(C.sum(), z, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|twice|does not require grad"):
        gz.sum().backward()


def test_subclasses_and_lam_zero_take_the_general_path():
    """Only exactly CosineCost + KLCost with λ ≠ 0 is fused; a subclass may change the maths."""

    class Cos2(CosineCost):
        pass

    z, za, lg, lga = (t.requires_grad_(True) for t in batch(seed=6))
    for cost in (JointCost(Cos2(), "kl"), JointCost("cosine", "kl", lam=0.0)):
        assert type(cost(z, za, lg, lga).grad_fn).__name__ != "CosineKLBackward"
