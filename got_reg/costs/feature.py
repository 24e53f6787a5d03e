"""Feature costs d_x(z_i, z_adv_j) on the hooked layer's flattened outputs."""

from __future__ import annotations

from typing import Any

import torch

from .base import Factorized, PairwiseCost


def unit_rows(z: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(ẑ, 1/|z|) row by row, with ẑ = 0 and 1/|z| = 0 on rows of norm ≤ eps (differentiable: their gradient is 0).

    1/|z| is computed in (B,) arithmetic, then one (B, D) product; a zero row's norm is replaced by +∞
    before the reciprocal, so neither the value nor the gradient meets 1/0.
    """
    norm = torch.linalg.vector_norm(z, dim=1)
    inv = torch.where(norm > eps, norm, torch.inf).reciprocal()
    return z * inv[:, None], inv


class CosineCost(PairwiseCost):
    r"""d_x(a, b) = 1 − <a, b> / (|a| |b|), in [0, 2]; the paper's best choice.

    The cost sees only directions, so :meth:`embed` gives unit vectors. A zero feature vector (common
    after ReLU) has no direction: it gets cost 1 to everything, the value of an orthogonal pair, and
    zero gradient. ``F.normalize``'s ``x / max(|x|, eps)`` would give it a gradient of 1/eps = 1e8
    instead, which blows up training.
    """

    name = "cosine"

    def __init__(self, eps: float = 1e-12) -> None:
        self.eps = eps

    def embed(self, z: torch.Tensor) -> torch.Tensor:
        return unit_rows(z, self.eps)[0]

    def pairwise(self, z: torch.Tensor, z_adv: torch.Tensor) -> torch.Tensor:
        # Rounding can put 1 − cos at −2e-16 for identical vectors; the cost is in [0, 2] by definition.
        return (1.0 - self.embed(z) @ self.embed(z_adv).T).clamp(0.0, 2.0)

    def factorized(self, z: torch.Tensor, z_adv: torch.Tensor) -> Factorized:
        return Factorized(1.0, -self.embed(z), self.embed(z_adv))


class _SafeSqrt(torch.autograd.Function):
    """sqrt with gradient 0 at 0 (a subgradient of |.|), where torch.sqrt's is inf.

    Identical clean and adversarial features give distance 0 exactly; the plain sqrt would turn that
    into a NaN gradient.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        out = x.clamp_min(0).sqrt()
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (out,) = ctx.saved_tensors
        return torch.where(out > 0, grad / (2 * out).clamp_min(torch.finfo(out.dtype).tiny), torch.zeros_like(grad))


class L2Cost(PairwiseCost):
    r"""Euclidean distance d_x(a, b) = |a − b|_2, from |a|² + |b|² − 2<a, b> (no (B, B, D) tensor).

    The expansion loses about sqrt(machine eps)·|a| on near-identical pairs (clean vs adversarial),
    so both batches are first centred on their common mean, which the distance does not see.
    """

    name = "l2"

    def pairwise(self, z: torch.Tensor, z_adv: torch.Tensor) -> torch.Tensor:
        centre = 0.5 * (z.mean(0) + z_adv.mean(0))
        z, z_adv = z - centre, z_adv - centre
        sq = (z * z).sum(1, keepdim=True) + (z_adv * z_adv).sum(1)[None, :] - 2.0 * (z @ z_adv.T)
        return _SafeSqrt.apply(sq)
