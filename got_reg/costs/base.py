"""The base class of every pairwise cost, and the factorised form that lets costs share one product."""

from __future__ import annotations

from typing import NamedTuple

import torch


class Factorized(NamedTuple):
    """A pairwise cost ``C[i, j] = row[i] + (left @ right.T)[i, j]`` (``row`` a scalar or (B,)).

    Costs of this form (cosine, KL) let :class:`~got_reg.costs.JointCost` build λ·d_x + d_y with one
    matrix product of the factors side by side, instead of a B×B temporary per term and operation.
    """

    row: float | torch.Tensor
    left: torch.Tensor
    right: torch.Tensor


class PairwiseCost:
    """Base class: ``pairwise(a, b)[i, j] = d(a[i], b[j])`` for (B, D) and (B', D) inputs.

    Subclasses implement :meth:`pairwise`, and :meth:`factorized` where the cost has that form.
    Feature costs act on the hooked layer's flattened output z; probability costs act on logits and
    take the softmax inside. :meth:`embed` is the representation the cost sees (e.g. unit vectors for
    the cosine cost): the learned dual's potential φ acts on it, so that φ cannot move along
    directions to which the cost is blind (see :mod:`got_reg.solvers.dual`).
    """

    name = "base"

    def pairwise(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def factorized(self, a: torch.Tensor, b: torch.Tensor) -> Factorized | None:
        """The cost as a :class:`Factorized` form (before clamping), or None if it has none."""
        return None

    def embed(self, a: torch.Tensor) -> torch.Tensor:
        """The representation of ``a`` that the cost depends on (identity unless overridden)."""
        return a

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
