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
from typing import Any, Dict, Optional

import torch
from torch import nn


def semidual_value(
    cost: torch.Tensor, phi: torch.Tensor, theta: float, mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """S_θ(φ) of (2) for a (B, B') cost and potentials φ (B,) on the clean side; differentiable in both."""
    X = _scores(cost, phi, theta, mask)
    c_transform = -theta * (torch.logsumexp(X, dim=0) - math.log(cost.shape[0]))
    return phi.mean() + c_transform.mean()


@torch.no_grad()
def semidual_plan(
    cost: torch.Tensor, phi: torch.Tensor, theta: float, mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """The plan implied by φ and its c-transform; its columns sum to 1/B' exactly, its rows only at the optimum."""
    return torch.softmax(_scores(cost, phi, theta, mask), dim=0) / cost.shape[1]


def _scores(cost: torch.Tensor, phi: torch.Tensor, theta: float, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """(φ_i − C_ij)/θ, with forbidden pairs at −∞ (C = +∞ there)."""
    X = (phi[:, None] - cost) / theta
    return X if mask is None else X.masked_fill(~mask, -math.inf)


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
