"""Pairwise costs against brute force (explicit double loops over pairs)."""
import itertools

import numpy as np
import pytest
import torch

from got_reg.costs import CosineCost, KLCost, L1Cost, L2Cost, get_feature_cost, get_prob_cost
from got_reg.functional import joint_cost


def brute_feature(name, z, za):
    out = np.zeros((len(z), len(za)))
    for i, j in itertools.product(range(len(z)), range(len(za))):
        a, b = z[i], za[j]
        if name == "cosine":
            out[i, j] = 1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
        else:
            out[i, j] = np.linalg.norm(a - b)
    return out


def softmax(x):
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def brute_prob(name, lg, lga):
    p, q = softmax(lg), softmax(lga)
    out = np.zeros((len(p), len(q)))
    for i, j in itertools.product(range(len(p)), range(len(q))):
        if name == "kl":
            out[i, j] = np.sum(p[i] * (np.log(p[i]) - np.log(q[j])))
        else:
            out[i, j] = np.abs(p[i] - q[j]).sum()
    return out


@pytest.mark.parametrize("fc", ["cosine", "l2"])
@pytest.mark.parametrize("pc", ["kl", "l1"])
@pytest.mark.parametrize("lam", [0.0, 1.0, 2.5])
def test_joint_cost_matches_brute_force(fc, pc, lam):
    g = torch.Generator().manual_seed(0)
    z, za = torch.randn(7, 2, 3, generator=g, dtype=torch.float64), torch.randn(5, 2, 3, generator=g, dtype=torch.float64)
    lg, lga = 3 * torch.randn(7, 4, generator=g, dtype=torch.float64), 3 * torch.randn(5, 4, generator=g, dtype=torch.float64)
    C = joint_cost(z, za, lg, lga, lam=lam, feature_cost=fc, prob_cost=pc)
    ref = lam * brute_feature(fc, z.reshape(7, -1).numpy(), za.reshape(5, -1).numpy()) + brute_prob(pc, lg.numpy(), lga.numpy())
    np.testing.assert_allclose(C.numpy(), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("lam", [0.0, 0.7])
def test_joint_cost_single_product_has_the_gradients_of_the_separate_terms(lam):
    """cosine + KL go through one addmm of the side-by-side factors; gradients must equal those of
    λ·cosine.pairwise + kl.pairwise computed separately."""
    g = torch.Generator().manual_seed(5)
    z, za = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(5, 5, generator=g, dtype=torch.float64)
    lg, lga = 3 * torch.randn(6, 4, generator=g, dtype=torch.float64), 3 * torch.randn(5, 4, generator=g, dtype=torch.float64)
    leaves = [t.requires_grad_(True) for t in (z, za, lg, lga)]
    W = torch.rand(6, 5, generator=g, dtype=torch.float64)
    fused = joint_cost(z, za, lg, lga, lam=lam)
    separate = KLCost().pairwise(lg, lga) + lam * CosineCost().pairwise(z, za)
    torch.testing.assert_close(fused, separate, rtol=1e-12, atol=1e-12)
    grads = [torch.autograd.grad((W * c).sum(), leaves, allow_unused=True) for c in (fused, separate)]
    for leaf, a, b in zip(leaves, *grads):
        # At λ = 0 the fused cost does not touch the features (None); 0·cosine gives zeros.
        a = torch.zeros_like(leaf) if a is None else a
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cost", [CosineCost(), L2Cost()])
def test_feature_cost_gradient_matches_brute_force_autograd(cost):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    za = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(6, 6, generator=g, dtype=torch.float64)
    (cost.pairwise(z, za) * W).sum().backward()
    gz, gza = z.grad.clone(), za.grad.clone()
    z.grad = za.grad = None
    diff = z[:, None, :] - za[None, :, :]
    if isinstance(cost, L2Cost):
        brute = diff.norm(dim=2)
    else:
        brute = 1 - torch.nn.functional.cosine_similarity(z[:, None, :], za[None, :, :], dim=2)
    (brute * W).sum().backward()
    torch.testing.assert_close(gz, z.grad)
    torch.testing.assert_close(gza, za.grad)


def test_l1_custom_backward_matches_autograd():
    g = torch.Generator().manual_seed(2)
    lg = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    lga = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(5, 4, generator=g, dtype=torch.float64)
    (L1Cost().pairwise(lg, lga) * W).sum().backward()
    g1, g2 = lg.grad.clone(), lga.grad.clone()
    lg.grad = lga.grad = None
    p, q = lg.softmax(1), lga.softmax(1)
    ((p[:, None] - q[None]).abs().sum(2) * W).sum().backward()
    torch.testing.assert_close(g1, lg.grad)
    torch.testing.assert_close(g2, lga.grad)


def test_identical_inputs_have_zero_diagonal_and_finite_gradient():
    g = torch.Generator().manual_seed(3)
    z = (5 * torch.randn(5, 8, generator=g, dtype=torch.float64)).requires_grad_(True)
    lg = torch.randn(5, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    for fc in ("cosine", "l2"):
        for pc in ("kl", "l1"):
            C = joint_cost(z, z, lg, lg, feature_cost=fc, prob_cost=pc)
            assert float(C.diagonal().abs().max()) < 1e-6
            assert (C >= 0).all()
            (gz,) = torch.autograd.grad(C.sum(), z)
            assert torch.isfinite(gz).all()


def test_kl_is_stable_for_saturated_logits():
    lg = torch.tensor([[1000.0, -1000.0, 0.0], [0.0, 0.0, 0.0]])
    C = KLCost().pairwise(lg, lg.flip(0))
    assert torch.isfinite(C).all()


def test_factories_and_unknown_names():
    assert isinstance(get_feature_cost("cosine"), CosineCost)
    assert isinstance(get_prob_cost("l1"), L1Cost)
    custom = L2Cost()
    assert get_feature_cost(custom) is custom
    with pytest.raises(ValueError, match="unknown feature_cost 'cosin'.*Did you mean 'cosine'"):
        get_feature_cost("cosin")
    with pytest.raises(ValueError, match="unknown prob_cost 'js'"):
        get_prob_cost("js")


def test_joint_cost_shape_errors():
    z, lg = torch.randn(4, 5), torch.randn(4, 3)
    with pytest.raises(ValueError, match="same feature size"):
        joint_cost(z, torch.randn(4, 6), lg, lg)
    with pytest.raises(ValueError, match="number of classes"):
        joint_cost(z, z, lg, torch.randn(4, 2))
    with pytest.raises(ValueError, match="batch size"):
        joint_cost(z, z, torch.randn(3, 3), lg)


def test_zero_feature_vector_has_cost_one_and_zero_gradient():
    """Dead-ReLU features: no 1/eps gradient spike (it blew up SmallCNN training in benchmarks)."""
    z = torch.zeros(2, 4, dtype=torch.float64)
    z[1] = torch.tensor([1.0, 2.0, 0.0, 0.0])
    z.requires_grad_(True)
    za = torch.randn(3, 4, dtype=torch.float64)
    C = CosineCost().pairwise(z, za)
    assert torch.equal(C[0], torch.ones(3, dtype=torch.float64))
    (g,) = torch.autograd.grad(C.sum(), z)
    assert torch.equal(g[0], torch.zeros(4, dtype=torch.float64))
    assert torch.isfinite(g).all() and g.abs().max() < 10
