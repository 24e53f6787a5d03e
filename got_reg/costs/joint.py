r"""The joint ground cost of GOT: C[i, j] = λ · d_x(z_i, z_adv_j) + d_y(softmax(logits_i), softmax(logits_adv_j)).

Bui et al., "Improving robustness with optimal transport based adversarial generalization": the cost
between two samples of the joint distribution of (z, h(z)) on the clean and adversarial batches.
"""

from __future__ import annotations

import torch

from .._checks import check_choice, check_positive, check_tensor, ot_dtype
from ._cosine_kl import CosineKL
from .base import PairwiseCost
from .feature import CosineCost, L2Cost
from .prob import KLCost, L1Cost

_FEATURE_COSTS: dict[str, type[PairwiseCost]] = {"cosine": CosineCost, "l2": L2Cost}
_PROB_COSTS: dict[str, type[PairwiseCost]] = {"kl": KLCost, "l1": L1Cost}


def get_feature_cost(cost: str | PairwiseCost = "cosine") -> PairwiseCost:
    """A name (``"cosine"``, ``"l2"``) or a :class:`PairwiseCost` instance, returned as an instance."""
    if isinstance(cost, PairwiseCost):
        return cost
    return _FEATURE_COSTS[check_choice("feature_cost", cost, _FEATURE_COSTS)]()


def get_prob_cost(cost: str | PairwiseCost = "kl") -> PairwiseCost:
    """A name (``"kl"``, ``"l1"``) or a :class:`PairwiseCost` instance acting on logits."""
    if isinstance(cost, PairwiseCost):
        return cost
    return _PROB_COSTS[check_choice("prob_cost", cost, _PROB_COSTS)]()


def _flat(name: str, t: object) -> torch.Tensor:
    t = check_tensor(name, t)
    if t.ndim < 2:
        raise ValueError(f"{name} must be batched as (B, ...), got shape {tuple(t.shape)}")
    return t.reshape(t.shape[0], -1)


class JointCost:
    r"""C[i, j] = lam · d_x(z_i, z_adv_j) + d_y(p_i, q_j), a (B, B') matrix, p = softmax(logits).

    Features are flattened to (B, D). The cost is built in at least float32 and outside autocast, from
    matrix products only (never a (B, B', D) tensor). When both terms have a :class:`Factorized` form
    the whole cost is one ``addmm`` of the factors side by side: one B×B output instead of a temporary per
    term and operation, forward and backward. The paper's choice (exactly :class:`CosineCost` with
    :class:`KLCost`, λ ≠ 0) is one autograd node with a closed-form backward
    (:mod:`got_reg.costs._cosine_kl`); its backward is not differentiable again (no double backward).
    """

    def __init__(
        self,
        feature_cost: str | PairwiseCost = "cosine",
        prob_cost: str | PairwiseCost = "kl",
        lam: float = 1.0,
    ) -> None:
        self.feature_cost = get_feature_cost(feature_cost)
        self.prob_cost = get_prob_cost(prob_cost)
        self.lam = check_positive("lam", lam, allow_zero=True)

    def __call__(
        self, z: torch.Tensor, z_adv: torch.Tensor, logits: torch.Tensor, logits_adv: torch.Tensor
    ) -> torch.Tensor:
        # The self-cost C(x, x) of one batch (the Sinkhorn divergence's stacked cost): factors built once.
        same = z is z_adv and logits is logits_adv
        z, z_adv = _flat("z", z), _flat("z_adv", z_adv)
        logits = check_tensor("logits", logits, ndim=2)
        logits_adv = check_tensor("logits_adv", logits_adv, ndim=2)
        if z.shape[1] != z_adv.shape[1]:
            raise ValueError(
                f"z and z_adv must have the same feature size, got {tuple(z.shape)} and {tuple(z_adv.shape)}"
            )
        if logits.shape[1] != logits_adv.shape[1]:
            raise ValueError(
                "logits and logits_adv must have the same number of classes, got "
                f"{tuple(logits.shape)} and {tuple(logits_adv.shape)}"
            )
        if z.shape[0] != logits.shape[0] or z_adv.shape[0] != logits_adv.shape[0]:
            raise ValueError(
                f"features and logits disagree on the batch size: z {tuple(z.shape)} vs logits "
                f"{tuple(logits.shape)}, z_adv {tuple(z_adv.shape)} vs logits_adv {tuple(logits_adv.shape)}"
            )
        dtype = ot_dtype(torch.promote_types(z.dtype, logits.dtype))
        with torch.autocast(device_type=z.device.type, enabled=False):
            logits, logits_adv = logits.to(dtype), logits_adv.to(dtype)
            z, z_adv = z.to(dtype), z_adv.to(dtype)
            if self.lam != 0.0 and type(self.feature_cost) is CosineCost and type(self.prob_cost) is KLCost:
                # The paper's cost: one autograd node with a closed-form backward (about a third of the
                # operators, each a kernel launch on a GPU).
                if same:
                    return CosineKL.apply(z, logits, None, None, self.lam, self.feature_cost.eps)
                return CosineKL.apply(z, logits, z_adv, logits_adv, self.lam, self.feature_cost.eps)
            pf = self.prob_cost.factorized(logits, logits_adv)
            ff = self.feature_cost.factorized(z, z_adv) if self.lam != 0.0 else None
            if pf is not None and (self.lam == 0.0 or ff is not None):
                row, left, right = pf
                if ff is not None:
                    row = row + self.lam * ff.row
                    left = torch.cat([left, self.lam * ff.left], 1)
                    right = torch.cat([right, ff.right], 1)
                row = torch.as_tensor(row, dtype=dtype, device=left.device).expand(left.shape[0])
                # Each term is >= 0 by definition; the clamp removes rounding below 0 (KL(p‖p) ≈ −1e-7).
                return torch.addmm(row[:, None], left, right.T).clamp_min(0.0)
            cost = self.prob_cost.pairwise(logits, logits_adv)
            if self.lam != 0.0:
                cost = cost + self.lam * self.feature_cost.pairwise(z, z_adv)
        return cost

    def __repr__(self) -> str:
        return f"JointCost(feature_cost={self.feature_cost!r}, prob_cost={self.prob_cost!r}, lam={self.lam:g})"
