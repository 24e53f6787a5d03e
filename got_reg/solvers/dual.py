r"""The learned dual of eq. 5/6 (Bui et al.): a Kantorovich potential φ maximised inside the regulariser.

With uniform weights, the entropic semi-dual of (1) (see :mod:`got_reg.solvers.sinkhorn`) is

    S_θ(φ) = mean_i φ(z_i) + mean_j [ −θ · log mean_i exp((φ(z_i) − C_ij)/θ) ],          (2)

the inner term being the (soft) c-transform of φ. For every φ, S_θ(φ) ≤ W_θ(C) (weak duality), with
equality at the optimal potential. The paper parametrises φ as a linear layer on the clean features z,
φ(z) = wᵀz + c. A constant c cancels in (2), so the family reaches every potential, and hence W_θ, only
when the B feature vectors span R^B, i.e. when the feature dim D ≥ B (for features in general position).
Otherwise the maximum over w is a strict lower bound of W_θ in general: read the value as a lower bound.

With a label mask (eq. 6), forbidden pairs have C = +∞ and drop out of the inner log-sum-exp.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from .sinkhorn import _block_rows, _floor


def semidual_value(
    cost: torch.Tensor, phi: torch.Tensor, theta: float, mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """S_θ(φ) of (2) for a (B, B') cost and potentials φ (B,) on the clean side; differentiable in both.

    ∂S/∂C = P and ∂S/∂φ = 1/B − P·1, with P_ij = softmax_i((φ_i − C_ij)/θ)/B' the plan that φ and
    its c-transform imply (see :func:`semidual_plan`).
    """
    return semidual_value_and_plan(cost, phi, theta, mask)[0]


def semidual_value_and_plan(
    cost: torch.Tensor, phi: torch.Tensor, theta: float, mask: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """S_θ(φ) (differentiable, as :func:`semidual_value`) and the detached plan P, from one pass over C."""
    value, plan_t = _SemiDual.apply(cost, phi, theta, mask)
    return value, plan_t.T


@torch.no_grad()
def semidual_plan(
    cost: torch.Tensor, phi: torch.Tensor, theta: float, mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """The plan implied by φ and its c-transform; its columns sum to 1/B' exactly, its rows only at the optimum."""
    return _semidual_pass(cost, phi, theta, mask)[1].T


class _SemiDual(torch.autograd.Function):
    """S_θ(φ) with the closed-form gradients above (∂S/∂C = P, as the envelope gradient of W_θ); the plan
    is a second, non-differentiable output."""

    @staticmethod
    def forward(ctx, cost, phi, theta, mask):  # type: ignore[override]
        value, plan_t = _semidual_pass(cost.detach(), phi.detach(), theta, mask)
        ctx.save_for_backward(plan_t)
        ctx.mark_non_differentiable(plan_t)
        return value.to(cost.dtype), plan_t

    @staticmethod
    def backward(ctx, grad, _grad_plan):  # type: ignore[override]
        (plan_t,) = ctx.saved_tensors
        grad_cost = grad_phi = None
        if ctx.needs_input_grad[0]:
            grad_cost = grad * plan_t.T
        if ctx.needs_input_grad[1]:
            grad_phi = grad * (1.0 / plan_t.shape[1] - plan_t.sum(0))
        return grad_cost, grad_phi, None, None


@torch.no_grad()
def _semidual_pass(
    cost: torch.Tensor, phi: torch.Tensor, theta: float, mask: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """S_θ(φ) and the transposed plan Pᵀ (B', B), each column's log-sum-exp done once.

    The columns of C are the rows of Cᵀ, so the work runs on one contiguous copy of Cᵀ, which becomes
    Pᵀ in place. On CPU it goes in cache-sized row blocks with the exponent floored, as in the Sinkhorn
    solver's ``_RowLogSumExp`` (torch's exp is 10-40x slower on subnormal results); the floored terms,
    below e^−86 of their column's largest, are set to exactly 0 afterwards, so forbidden pairs carry no
    mass at all, and so are terms whose plan entry would be subnormal.
    """
    B, Bp = cost.shape
    # Always a copy: the work below is in place, and cost.T may already be contiguous (cost a view).
    P_t = cost.T.to(phi.dtype, memory_format=torch.contiguous_format, copy=True)
    if mask is not None:
        P_t.masked_fill_(~mask.T, math.inf)
    w = phi / theta
    floor = _floor(P_t)
    if floor is None:
        X = torch.add(w, P_t, alpha=-1.0 / theta)
        lse = torch.logsumexp(X, dim=1)
        if not bool(torch.isfinite(lse).all()):
            raise ValueError("every column of the cost needs a finite (allowed) entry")
        P_t = torch.exp(X - lse[:, None]).div_(Bp)
    else:
        lse = P_t.new_empty(Bp)
        rows = _block_rows(Bp, B)
        # Zero every term below the floor (forbidden pairs included) and every one whose plan entry,
        # once divided by its column sum s·B' (s ≤ B), would be subnormal: subnormals in the plan make
        # the matrix products of the cost's backward 5-10x slower on x86.
        tiny = max(2.0 * math.exp(floor), torch.finfo(P_t.dtype).tiny * B * Bp)
        for r0 in range(0, Bp, rows):
            block = P_t[r0 : r0 + rows]
            block.mul_(-1.0 / theta).add_(w)
            m = block.amax(dim=1, keepdim=True)
            if not bool(torch.isfinite(m).all()):
                raise ValueError("every column of the cost needs a finite (allowed) entry")
            block.sub_(m).clamp_min_(floor).exp_()
            torch.threshold_(block, tiny, 0.0)
            s = block.sum(dim=1, keepdim=True)
            lse[r0 : r0 + rows] = (s.log() + m).squeeze(1)
            block.div_(s.mul_(Bp))
    value = phi.mean() - theta * (lse.mean() - math.log(B))
    return value, P_t


class KantorovichPotential(nn.Module):
    """φ(z) = wᵀz + c, built at the first call from z's size, trained by ascent on (2).

    The optimiser (Adam by default) is owned here, so a training loop needs no extra code; its state
    is saved in ``state_dict()`` as extra state, beside w and c.
    """

    def __init__(self, lr: float = 1e-2, steps: int = 1) -> None:
        super().__init__()
        self.lr = lr
        self.steps = steps
        self.linear: Optional[nn.Linear] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.num_updates = 0

    @property
    def built(self) -> bool:
        return self.linear is not None

    def build(self, dim: int, device: torch.device, dtype: torch.dtype) -> None:
        # skip_init: no draw from the global RNG, which the user's seeding owns (and which must agree
        # across DDP ranks). Start at φ = 0, whose value (2) is the soft-min cost: a valid lower bound.
        self.linear = torch.nn.utils.skip_init(nn.Linear, dim, 1, device=device, dtype=dtype)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.optimizer = torch.optim.Adam(self.linear.parameters(), lr=self.lr)

    def forward(self, z: torch.Tensor, *, detach_params: bool = False) -> torch.Tensor:
        if self.linear is None:
            raise RuntimeError("KantorovichPotential used before build(); call it through GOTRegularizer")
        if z.shape[1] != self.linear.in_features:
            raise ValueError(
                f"the dual potential was built for features of dim {self.linear.in_features}, got dim {z.shape[1]}"
            )
        w, b = self.linear.weight, self.linear.bias
        if detach_params:
            w, b = w.detach(), b.detach()
        return torch.nn.functional.linear(z.to(w.dtype), w, b).squeeze(1)

    def ascend(self, z: torch.Tensor, cost: torch.Tensor, theta: float, mask: Optional[torch.Tensor]) -> None:
        """``steps`` optimiser steps maximising (2) on a detached batch; only w and c move."""
        assert self.optimizer is not None
        z, cost = z.detach(), cost.detach()
        for _ in range(self.steps):
            self.optimizer.zero_grad(set_to_none=True)
            loss = -semidual_value(cost, self(z), theta, mask)
            loss.backward()
            self.optimizer.step()
            self.num_updates += 1
        # No stale grads left on φ: the model's backward must not seem to have reached it.
        self.optimizer.zero_grad(set_to_none=True)

    def get_extra_state(self) -> Dict[str, Any]:
        state: Dict[str, Any] = {"num_updates": self.num_updates}
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        self.num_updates = int(state.get("num_updates", 0))
        if "optimizer" in state and self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        # φ is lazy: a fresh regulariser builds it from the saved weight before loading it.
        w = state_dict.get(prefix + "linear.weight")
        if w is not None and self.linear is None:
            self.build(w.shape[1], w.device, w.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
