"""One result type for every solver and backend, and the envelope gradient attached to its value."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class OTResult:
    r"""What every solver returns; all fields are detached tensors on the cost's device (no host sync).

    Attributes:
        value: W_θ(C) = <P, C> + θ·KL(P ‖ abᵀ) (0-d). For the Sinkhorn solvers it is the dual objective
            at the returned potentials, equal to the primal at convergence; for the semi-dual it is
            S_θ(φ), a lower bound of W_θ.
        plan: the transport plan P (B, B').
        iterations: sweeps (or optimiser steps for the dual) that produced it (0-d int64).
        marginal_error: max(‖P·1 − a‖₁, ‖Pᵀ·1 − b‖₁), measured on the returned ``plan`` for every
            solver and backend (0-d); a and b are the uniform weights.
        converged: ``marginal_error <= tol`` (0-d bool; always False for the semi-dual, which has no tol).
        potentials: (f, g) in cost units when the solver has them, else None.
    """

    value: torch.Tensor
    plan: torch.Tensor
    iterations: torch.Tensor
    marginal_error: torch.Tensor
    converged: torch.Tensor
    potentials: tuple[torch.Tensor, torch.Tensor] | None = None

    def unbind(self) -> list[OTResult]:
        """The k results of a stacked solve (every field with a leading k), as views: no copy, no sync."""
        pots = self.potentials
        return [
            OTResult(
                self.value[i],
                self.plan[i],
                self.iterations[i],
                self.marginal_error[i],
                self.converged[i],
                None if pots is None else (pots[0][i], pots[1][i]),
            )
            for i in range(self.plan.shape[0])
        ]


def marginal_error(plan: torch.Tensor) -> torch.Tensor:
    """max(‖P·1 − a‖₁, ‖Pᵀ·1 − b‖₁) for uniform a = 1/B, b = 1/B' (0-d; one per plan of a (k, B, B') stack)."""
    B, Bp = plan.shape[-2:]
    l1 = lambda x: torch.linalg.vector_norm(x, ord=1, dim=-1)  # noqa: E731
    return torch.maximum(l1(plan.sum(-1) - 1.0 / B), l1(plan.sum(-2) - 1.0 / Bp))


class _Envelope(torch.autograd.Function):
    """value(C) with dvalue/dC = plan (Danskin's theorem); the solve itself ran outside autograd."""

    @staticmethod
    def forward(ctx: Any, cost: torch.Tensor, value: torch.Tensor, plan: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(plan)  # ∂value/∂cost: the plan, or any fixed matrix of cost's shape
        ctx.cost_dtype = cost.dtype
        return value.to(cost.dtype).clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (plan,) = ctx.saved_tensors
        return (grad * plan).to(ctx.cost_dtype), None, None


def envelope(cost: torch.Tensor, value: torch.Tensor, dvalue_dcost: torch.Tensor) -> torch.Tensor:
    """``value`` as a function of ``cost`` whose gradient is the fixed ``dvalue_dcost`` (Danskin's theorem)."""
    return _Envelope.apply(cost, value, dvalue_dcost)


def with_grad(cost: torch.Tensor, result: OTResult, grad: str = "envelope") -> torch.Tensor:
    """The value as a function of ``cost``: ``"envelope"`` (∂W/∂C = P, never unrolled) or ``"detach"``."""
    if grad == "detach":
        return result.value.to(cost.dtype)
    return envelope(cost, result.value, result.plan)
