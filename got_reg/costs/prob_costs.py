"""Costs d_y(h(z_i), h(z_adv_j)) between predicted class distributions, taken from logits."""
from __future__ import annotations

from typing import Dict, Optional, Type, Union

import torch

from .._checks import check_choice
from .feature_costs import Bilinear


class ProbCost:
    """Base class: ``pairwise(logits, logits_adv)[i, j] = d_y(softmax(logits_i), softmax(logits_adv_j))``."""

    name = "base"

    def pairwise(self, logits: torch.Tensor, logits_adv: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def bilinear(self, logits: torch.Tensor, logits_adv: torch.Tensor) -> Optional[Bilinear]:
        """The cost as a :class:`~got_reg.costs.feature_costs.Bilinear` form before clamping, or None."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class KLCost(ProbCost):
    r"""d_y(p, q) = KL(p ‖ q) = Σ_k p_k (log p_k − log q_k), the paper's best choice.

    As a matrix: KL[i, j] = Σ_k p_ik log p_ik − (p @ log qᵀ)[i, j], with log-probabilities from
    ``log_softmax`` so that saturated logits do not give log 0.
    """

    name = "kl"

    def pairwise(self, logits: torch.Tensor, logits_adv: torch.Tensor) -> torch.Tensor:
        b = self.bilinear(logits, logits_adv)
        # Rounding can leave KL(p‖p) at -1e-7; the divergence is non-negative by definition.
        return torch.addmm(b.row[:, None], b.left, b.right.T).clamp_min(0.0)

    def bilinear(self, logits: torch.Tensor, logits_adv: torch.Tensor) -> Bilinear:
        log_p = torch.log_softmax(logits, dim=1)
        log_q = torch.log_softmax(logits_adv, dim=1)
        p = log_p.exp()
        return Bilinear((p * log_p).sum(1), -p, log_q)


class _PairwiseL1(torch.autograd.Function):
    """out[i, j] = Σ_k |p_ik − q_jk| in O(B²) memory: one (B, B) slice per class, forward and backward.

    The autograd of the naive loop would keep M (B, B) sign tensors alive; here they are recomputed.
    """

    @staticmethod
    def forward(ctx, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = p.new_zeros(p.shape[0], q.shape[0])
        for k in range(p.shape[1]):
            out += (p[:, k, None] - q[None, :, k]).abs_()
        ctx.save_for_backward(p, q)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        p, q = ctx.saved_tensors
        gp = torch.empty_like(p)
        gq = torch.empty_like(q)
        for k in range(p.shape[1]):
            s = torch.sign(p[:, k, None] - q[None, :, k]) * grad
            gp[:, k] = s.sum(1)
            gq[:, k] = -s.sum(0)
        return gp, gq


class L1Cost(ProbCost):
    r"""d_y(p, q) = |p − q|_1 = Σ_k |p_k − q_k|, in [0, 2].

    Not a matrix product; computed one class at a time, so memory is O(B²) for any number of classes.
    """

    name = "l1"

    def pairwise(self, logits: torch.Tensor, logits_adv: torch.Tensor) -> torch.Tensor:
        return _PairwiseL1.apply(torch.softmax(logits, dim=1), torch.softmax(logits_adv, dim=1))


PROB_COSTS: Dict[str, Type[ProbCost]] = {"kl": KLCost, "l1": L1Cost}


def get_prob_cost(cost: Union[str, ProbCost] = "kl") -> ProbCost:
    """Factory: a name in :data:`PROB_COSTS` or a :class:`ProbCost` instance."""
    if isinstance(cost, ProbCost):
        return cost
    return PROB_COSTS[check_choice("prob_cost", cost, PROB_COSTS)]()
