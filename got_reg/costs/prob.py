"""Costs d_y(h(z_i), h(z_adv_j)) between predicted class distributions, taken from logits."""

from __future__ import annotations

from typing import Any

import torch

from .base import Factorized, PairwiseCost


class KLCost(PairwiseCost):
    r"""d_y(p, q) = KL(p ‖ q) = Σ_k p_k (log p_k − log q_k), the paper's best choice.

    As a matrix: KL[i, j] = Σ_k p_ik log p_ik − (p @ log qᵀ)[i, j], with log-probabilities from
    ``log_softmax`` so that saturated logits do not give log 0.
    """

    name = "kl"

    def pairwise(self, logits: torch.Tensor, logits_adv: torch.Tensor) -> torch.Tensor:
        f = self.factorized(logits, logits_adv)
        # Rounding can leave KL(p‖p) at -1e-7; the divergence is non-negative by definition.
        return torch.addmm(f.row[:, None], f.left, f.right.T).clamp_min(0.0)  # type: ignore[index]

    def factorized(self, logits: torch.Tensor, logits_adv: torch.Tensor) -> Factorized:
        log_p = torch.log_softmax(logits, dim=1)
        log_q = torch.log_softmax(logits_adv, dim=1)
        p = log_p.exp()
        return Factorized((p * log_p).sum(1), -p, log_q)

    def embed(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, dim=1)


class _PairwiseL1(torch.autograd.Function):
    """out[i, j] = Σ_k |p_ik − q_jk| in O(B²) memory: one (B, B) slice per class, forward and backward.

    The autograd of the naive loop would keep M (B, B) sign tensors alive; here they are recomputed.
    """

    @staticmethod
    def forward(ctx: Any, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        out = p.new_zeros(p.shape[0], q.shape[0])
        for k in range(p.shape[1]):
            out += (p[:, k, None] - q[None, :, k]).abs_()
        ctx.save_for_backward(p, q)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p, q = ctx.saved_tensors
        gp = torch.empty_like(p)
        gq = torch.empty_like(q)
        for k in range(p.shape[1]):
            s = torch.sign(p[:, k, None] - q[None, :, k]) * grad
            gp[:, k] = s.sum(1)
            gq[:, k] = -s.sum(0)
        return gp, gq


class L1Cost(PairwiseCost):
    r"""d_y(p, q) = |p − q|_1 = Σ_k |p_k − q_k|, in [0, 2].

    Not a matrix product; computed one class at a time, so memory is O(B²) for any number of classes.
    """

    name = "l1"

    def pairwise(self, logits: torch.Tensor, logits_adv: torch.Tensor) -> torch.Tensor:
        return _PairwiseL1.apply(torch.softmax(logits, dim=1), torch.softmax(logits_adv, dim=1))

    def embed(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, dim=1)
