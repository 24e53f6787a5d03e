"""Feature costs d_x (cosine, L2) against brute force: explicit loops over pairs and autograd through them."""

import numpy as np
import pytest
import torch
from ot_reference import brute_feature_cost as brute

from got_reg.costs import CosineCost, L2Cost, get_feature_cost


@pytest.mark.parametrize("cost", [CosineCost(), L2Cost()], ids=["cosine", "l2"])
def test_pairwise_matches_brute_force(cost):
    g = torch.Generator().manual_seed(0)
    z, za = torch.randn(7, 6, generator=g, dtype=torch.float64), 3 * torch.randn(5, 6, generator=g, dtype=torch.float64)
    ref = brute(cost.name, z.numpy(), za.numpy())
    np.testing.assert_allclose(cost.pairwise(z, za).numpy(), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cost", [CosineCost(), L2Cost()], ids=["cosine", "l2"])
def test_gradient_matches_autograd_through_the_brute_force_formula(cost):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    za = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(6, 6, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((cost.pairwise(z, za) * W).sum(), (z, za))
    if isinstance(cost, L2Cost):
        ref = (z[:, None, :] - za[None, :, :]).norm(dim=2)
    else:
        ref = 1 - torch.nn.functional.cosine_similarity(z[:, None, :], za[None, :, :], dim=2)
    expected = torch.autograd.grad((ref * W).sum(), (z, za))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_cosine_embedding_is_unit_vectors_and_the_factorized_form_is_the_cost():
    g = torch.Generator().manual_seed(2)
    z, za = 4 * torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    z[2] = 0.0
    cost = CosineCost()
    e = cost.embed(z)
    norms = e.norm(dim=1)
    torch.testing.assert_close(norms[[0, 1, 3, 4]], torch.ones(4, dtype=torch.float64))
    assert float(norms[2]) == 0.0  # a zero vector has no direction: embedded as 0
    torch.testing.assert_close(e[0], z[0] / z[0].norm())
    row, left, right = cost.factorized(z, za)
    torch.testing.assert_close(row + left @ right.T, cost.pairwise(z, za), rtol=0, atol=1e-15)
    # Scale invariance: the cost sees directions only (the reason the dual's φ acts on the embedding).
    torch.testing.assert_close(cost.pairwise(7.5 * z, 0.01 * za), cost.pairwise(z, za), rtol=0, atol=1e-14)


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
    # The nonzero row's gradient is the brute-force one: d/dz Σ_j (1 − cos(z, za_j)).
    z1 = z[1].detach().clone().requires_grad_(True)
    (ref,) = torch.autograd.grad((1 - torch.nn.functional.cosine_similarity(z1[None], za, dim=1)).sum(), z1)
    torch.testing.assert_close(g[1], ref)


def test_identical_vectors_give_zero_cost_and_a_finite_gradient():
    g = torch.Generator().manual_seed(3)
    z = (5 * torch.randn(5, 8, generator=g, dtype=torch.float64)).requires_grad_(True)
    for cost in (CosineCost(), L2Cost()):
        C = cost.pairwise(z, z)
        # L2 from |a|² + |b|² − 2<a, b>: sqrt(eps·|z|²) ≈ 2e-7 of rounding is left on the diagonal.
        assert float(C.detach().diagonal().abs().max()) < 1e-6
        assert bool((C >= 0).all())
        (gz,) = torch.autograd.grad(C.diagonal().sum(), z)
        assert bool(torch.isfinite(gz).all())


def test_l2_gradient_is_zero_where_the_distance_is_exactly_zero():
    """Integer features: the expansion is exact, the diagonal is exactly 0, and the subgradient 0 is used
    where torch.sqrt's derivative would be inf (and inf · 0 = NaN in the chain rule)."""
    z = torch.tensor([[1.0, 2.0, -3.0], [0.0, 4.0, 1.0], [2.0, 2.0, 2.0]], dtype=torch.float64, requires_grad=True)
    za = torch.tensor([[1.0, 2.0, -3.0], [5.0, 0.0, 1.0], [2.0, 2.0, 2.0]], dtype=torch.float64)
    C = L2Cost().pairwise(z, za)
    assert float(C[0, 0]) == 0.0 and float(C[2, 2]) == 0.0
    (gz,) = torch.autograd.grad(C[0, 0] + C[2, 2], z, retain_graph=True)
    assert torch.equal(gz, torch.zeros_like(gz))
    (gz,) = torch.autograd.grad(C[1, 1], z)  # and the ordinary (z − za)/|z − za| elsewhere
    torch.testing.assert_close(gz[1], (z[1] - za[1]).detach() / (z[1] - za[1]).detach().norm())


def test_l2_is_accurate_on_near_identical_pairs_in_float32():
    """Clean vs adversarial features: |a − b| ≪ |a|. The centring keeps the expansion's error small."""
    g = torch.Generator().manual_seed(4)
    z = 100 + torch.randn(16, 32, generator=g, dtype=torch.float64)  # a large common offset
    za = z + 1e-2 * torch.randn(16, 32, generator=g, dtype=torch.float64)
    ref = brute("l2", z.numpy(), za.numpy())
    got = L2Cost().pairwise(z.float(), za.float()).double().numpy()
    # Without the centring, |z|² ≈ 3e5 in fp32 would leave errors of ~sqrt(3e5·6e-8) ≈ 0.1 on the diagonal.
    np.testing.assert_allclose(np.diag(got), np.diag(ref), rtol=5e-2)
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3)


def test_factory():
    assert isinstance(get_feature_cost("cosine"), CosineCost) and isinstance(get_feature_cost("l2"), L2Cost)
    custom = L2Cost()
    assert get_feature_cost(custom) is custom
    with pytest.raises(ValueError, match="unknown feature_cost 'cosin'.*Did you mean 'cosine'"):
        get_feature_cost("cosin")
