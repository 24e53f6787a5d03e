"""JointCost: λ·d_x + d_y against brute force, the single-addmm path against the separate terms, and
the precision/shape rules (fp32 at least, outside autocast, flattened features)."""

import numpy as np
import pytest
import torch
from ot_reference import brute_feature_cost as brute_feature
from ot_reference import brute_prob_cost as brute_prob

from got_reg.costs import CosineCost, JointCost, KLCost, L1Cost, L2Cost, PairwiseCost
from got_reg.functional import joint_cost

F64 = dict(dtype=torch.float64)


def inputs(Bz=7, Ba=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z, za = torch.randn(Bz, 2, 3, generator=g, dtype=dtype), torch.randn(Ba, 2, 3, generator=g, dtype=dtype)
    lg, lga = 3 * torch.randn(Bz, 4, generator=g, dtype=dtype), 3 * torch.randn(Ba, 4, generator=g, dtype=dtype)
    return z, za, lg, lga


@pytest.mark.parametrize("fc", ["cosine", "l2"])
@pytest.mark.parametrize("pc", ["kl", "l1"])
@pytest.mark.parametrize("lam", [0.0, 1.0, 2.5])
def test_joint_cost_matches_brute_force(fc, pc, lam):
    z, za, lg, lga = inputs()
    C = joint_cost(z, za, lg, lga, lam=lam, feature_cost=fc, prob_cost=pc)
    ref = lam * brute_feature(fc, z.reshape(7, -1).numpy(), za.reshape(5, -1).numpy())
    ref += brute_prob(pc, lg.numpy(), lga.numpy())
    np.testing.assert_allclose(C.numpy(), ref, rtol=1e-10, atol=1e-10)
    assert C.shape == (7, 5)


@pytest.mark.parametrize("lam", [0.0, 0.7])
def test_single_product_has_the_gradients_of_the_separate_terms(lam):
    """cosine + KL go through one addmm of the side-by-side factors; gradients must equal those of
    λ·cosine.pairwise + kl.pairwise computed separately."""
    g = torch.Generator().manual_seed(5)
    z, za = torch.randn(6, 5, generator=g, **F64), torch.randn(5, 5, generator=g, **F64)
    lg, lga = 3 * torch.randn(6, 4, generator=g, **F64), 3 * torch.randn(5, 4, generator=g, **F64)
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


class Squared(PairwiseCost):
    """A user's cost with no factorised form: |a − b|², by broadcasting (small inputs only)."""

    name = "squared"

    def pairwise(self, a, b):
        return ((a[:, None] - b[None]) ** 2).sum(2)


def test_custom_cost_without_factorized_form_takes_the_separate_path():
    z, za, lg, lga = inputs(seed=1)
    C = JointCost(Squared(), "kl", lam=0.3)(z, za, lg, lga)
    ref = 0.3 * ((z.reshape(7, 1, -1) - za.reshape(1, 5, -1)) ** 2).sum(2).numpy()
    ref += brute_prob("kl", lg.numpy(), lga.numpy())
    np.testing.assert_allclose(C.numpy(), ref, rtol=1e-10, atol=1e-12)
    # A factorised probability cost with an unfactorised feature cost: the same value either way.
    C2 = JointCost(L2Cost(), L1Cost(), lam=2.0)(z, za, lg, lga)
    ref2 = 2.0 * brute_feature("l2", z.reshape(7, -1).numpy(), za.reshape(5, -1).numpy())
    ref2 += brute_prob("l1", lg.numpy(), lga.numpy())
    np.testing.assert_allclose(C2.numpy(), ref2, rtol=1e-10, atol=1e-10)


def test_half_precision_and_autocast_inputs_give_a_float32_cost():
    z, za, lg, lga = inputs(dtype=torch.float32)
    ref = joint_cost(z.double(), za.double(), lg.double(), lga.double())
    for dt in (torch.float16, torch.bfloat16):
        C = joint_cost(z.to(dt), za.to(dt), lg.to(dt), lga.to(dt))
        assert C.dtype == torch.float32
        # Only the rounding of the inputs to half precision differs from the float64 cost.
        C_ref = joint_cost(*(t.to(dt).double() for t in (z, za, lg, lga)))
        torch.testing.assert_close(C.double(), C_ref, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        C = joint_cost(z, za, lg, lga)  # the matrix products would be bf16 under autocast
        assert torch.is_autocast_enabled("cpu")
    assert C.dtype == torch.float32
    torch.testing.assert_close(C.double(), ref, rtol=1e-5, atol=1e-5)


def test_identical_inputs_have_a_zero_diagonal():
    g = torch.Generator().manual_seed(3)
    z = 5 * torch.randn(5, 8, generator=g, dtype=torch.float64)
    lg = torch.randn(5, 3, generator=g, dtype=torch.float64)
    for fc in ("cosine", "l2"):
        for pc in ("kl", "l1"):
            C = joint_cost(z, z, lg, lg, feature_cost=fc, prob_cost=pc)
            assert float(C.diagonal().abs().max()) < 1e-6 and bool((C >= 0).all())


def test_repr_and_lam_check():
    assert repr(JointCost("l2", "l1", 2.0)) == "JointCost(feature_cost=L2Cost(), prob_cost=L1Cost(), lam=2)"
    with pytest.raises(ValueError, match="lam must be finite and >= 0"):
        JointCost(lam=-1.0)


def test_shape_errors():
    z, lg = torch.randn(4, 5), torch.randn(4, 3)
    with pytest.raises(ValueError, match="same feature size"):
        joint_cost(z, torch.randn(4, 6), lg, lg)
    with pytest.raises(ValueError, match="number of classes"):
        joint_cost(z, z, lg, torch.randn(4, 2))
    with pytest.raises(ValueError, match="batch size"):
        joint_cost(z, z, torch.randn(3, 3), lg)
    with pytest.raises(ValueError, match=r"z must be batched as \(B, ...\)"):
        joint_cost(torch.randn(5), z, lg, lg)
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        joint_cost(z, z, lg.tolist(), lg)
