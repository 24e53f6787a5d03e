r"""The learned dual of eq. 5/6 (Bui et al.): a Kantorovich potential φ maximised inside the regulariser.

With uniform weights, the entropic semi-dual of (1) (see :mod:`got_reg.solvers.sinkhorn`) is

    S_θ(φ) = mean_i φ_i + mean_j [ −θ · log mean_i exp((φ_i − C_ij)/θ) ],                 (2)

the inner term being the (soft) c-transform of φ. For every φ, S_θ(φ) ≤ W_θ(C) (weak duality), with
equality at the optimal potential. Its gradients are ∂S/∂C = P and ∂S/∂φ = a − P·1, with
P_ij = softmax_i((φ_i − C_ij)/θ)/B' the plan that φ and its c-transform imply (columns exact, rows only
at the optimum).

The paper parametrises φ as a linear function of the clean features. A constant cancels in (2), so
φ(e) = wᵀe has no bias; the family reaches W_θ only when the B vectors e_i span R^B (D ≥ B for
features in general position), otherwise max_w S_θ is a strict lower bound. :class:`KantorovichPotential`
keeps w and its optimiser. It acts on ``embedding`` features: the representation that the feature cost
sees (unit vectors for the cosine cost). On raw features (the paper's form, ``embedding=False``) the
min-max is ill-posed with a scale-invariant cost: scaling z leaves C unchanged but scales φ(z), and
(2) then falls without bound as |z| grows (measured: |z| from 1.8 to 37.7 in 5 steps at β = 10, then
NaN). On unit vectors |φ| ≤ |w|, and (2) is bounded.

With a label mask (eq. 6), forbidden pairs have C = +∞ and drop out of the inner log-sum-exp.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .lse import softmax_rows_
from .result import OTResult


def semidual(
    cost: torch.Tensor, phi: torch.Tensor, theta: float, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, OTResult]:
    """S_θ(φ) of (2) for a (B, B') cost and potentials φ (B,) on the clean side, differentiable in both
    (∂S/∂C = P, ∂S/∂φ = 1/B − P·1), and its :class:`OTResult` (detached), from one pass over C."""
    value, plan_t = _SemiDual.apply(cost, phi, theta, mask)
    plan = plan_t.T
    rows = plan.sum(1)
    # Columns are exact by construction, so the L1 marginal error is the rows'.
    err = (rows - 1.0 / cost.shape[0]).abs().sum()
    res = OTResult(
        value.detach(),
        plan,
        cost.new_zeros((), dtype=torch.int64),
        err,
        torch.zeros((), dtype=torch.bool, device=cost.device),
    )
    return value, res


class _SemiDual(torch.autograd.Function):
    """S_θ(φ) with the closed-form gradients above; the transposed plan is a second, non-differentiable output."""

    @staticmethod
    def forward(
        ctx: Any, cost: torch.Tensor, phi: torch.Tensor, theta: float, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        value, plan_t = _semidual_pass(cost.detach(), phi.detach(), theta, mask)
        ctx.save_for_backward(plan_t)
        ctx.mark_non_differentiable(plan_t)
        return value.to(cost.dtype), plan_t

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, _grad_plan: torch.Tensor | None) -> tuple[Any, ...]:
        (plan_t,) = ctx.saved_tensors
        grad_cost = grad_phi = None
        if ctx.needs_input_grad[0]:
            grad_cost = grad * plan_t.T
        if ctx.needs_input_grad[1]:
            grad_phi = grad * (1.0 / plan_t.shape[1] - plan_t.sum(0))
        return grad_cost, grad_phi, None, None


@torch.no_grad()
def _semidual_pass(
    cost: torch.Tensor, phi: torch.Tensor, theta: float, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """S_θ(φ) and the transposed plan Pᵀ (B', B): the columns of C are the rows of one contiguous copy
    of Cᵀ, which becomes Pᵀ in place through the shared row softmax (:func:`~got_reg.solvers.lse.softmax_rows_`)."""
    B, Bp = cost.shape
    # Always a copy: the work is in place, and cost.T may already be contiguous (cost a view).
    P_t = cost.T.to(phi.dtype, memory_format=torch.contiguous_format, copy=True)
    if mask is not None:
        P_t.masked_fill_(~mask.T, math.inf)
    lse = softmax_rows_(P_t, phi / theta, -1.0 / theta, divide=Bp)
    value = phi.mean() - theta * (lse.mean() - math.log(B))
    return value, P_t


@contextlib.contextmanager
def _capturable(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Adam under CUDA graph capture: it insists on ``capturable=True``, which its fused update needs no
    change for (the step count is on the device anyway); outside a capture the flag would make Adam warn."""
    groups = optimizer.param_groups
    flags = [g["capturable"] for g in groups]
    for g in groups:
        g["capturable"] = g["capturable"] or g["fused"]
    try:
        yield
    finally:
        for g, flag in zip(groups, flags):
            g["capturable"] = flag


class KantorovichPotential(nn.Module):
    """φ(e) = wᵀe, built at the first call from e's size, trained by ascent on (2).

    The optimiser (Adam) is owned here, so a training loop needs no extra code; its state is saved in
    ``state_dict()`` as extra state, beside w. Each :meth:`step` uses the plan of the pass that gave
    the model its value, through the closed form ∂S/∂w = Σ_i (1/B − (P·1)_i) e_i: no second pass and
    no autograd graph. A non-finite w (which bounded embeddings make unreachable) resets φ to 0 with a
    warning instead of reaching the model.
    """

    def __init__(self, lr: float = 1e-2, steps: int = 1) -> None:
        super().__init__()
        self.lr = lr
        self.steps = steps
        self.weight: nn.Parameter | None
        self.register_parameter("weight", None)
        self.optimizer: torch.optim.Optimizer | None = None
        # Updates not in the optimizer's own count: those of optimizers that a reset replaced, and a loaded
        # checkpoint's. The count is read from Adam's step tensor so that a CUDA graph replay counts too.
        self._updates_before = 0

    @property
    def built(self) -> bool:
        return self.weight is not None

    @property
    def num_updates(self) -> int:
        """Ascent steps taken so far (Adam's step count, a host read on a GPU, plus those before a reset)."""
        return self._updates_before + self._optimizer_steps()

    def _optimizer_steps(self) -> int:
        if self.optimizer is None or self.weight is None:
            return 0
        state = self.optimizer.state.get(self.weight)
        return int(state["step"]) if state else 0

    def build(self, dim: int, device: torch.device, dtype: torch.dtype) -> None:
        self._updates_before = self.num_updates
        # Zeros: no draw from the global RNG (which the user's seeding owns, and which must agree across
        # DDP ranks); φ = 0 gives (2) the soft-min cost, a valid lower bound.
        # Never an inference tensor (a first call under torch.inference_mode()): Adam updates w in place later.
        with torch.inference_mode(False):
            self.weight = nn.Parameter(torch.zeros(dim, device=device, dtype=dtype))
        # One fused kernel for the update, which also keeps Adam's step count off the host (the unfused
        # step reads it back: a synchronisation per step on a GPU).
        try:
            self.optimizer = torch.optim.Adam([self.weight], lr=self.lr, fused=True)
        except RuntimeError:  # no fused Adam for this device in this torch (CPU before torch 2.4, MPS, ...)
            self.optimizer = torch.optim.Adam([self.weight], lr=self.lr)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        """φ(e) for (B, D) embeddings, with w detached: the model never trains φ, :meth:`step` does."""
        if self.weight is None:
            raise RuntimeError("KantorovichPotential used before build(); call it through GOTRegularizer")
        if e.shape[1] != self.weight.shape[0]:
            raise ValueError(
                f"the dual potential was built for features of dim {self.weight.shape[0]}, got dim {e.shape[1]}"
            )
        # A copy of w: the matmul saves it for the backward to e, and step() then changes w in place.
        return e.to(self.weight.dtype) @ self.weight.detach().clone()

    @torch.no_grad()
    def step(self, e: torch.Tensor, plan: torch.Tensor) -> None:
        """One ascent step on (2) from a pass's plan P (B, B'); only w moves."""
        assert self.optimizer is not None and self.weight is not None
        B = plan.shape[0]
        self.weight.grad = -(e.detach().to(self.weight.dtype).T @ (1.0 / B - plan.sum(1).to(self.weight.dtype)))
        if self.weight.is_cuda and torch.cuda.is_current_stream_capturing():
            with _capturable(self.optimizer):
                self.optimizer.step()
        else:
            self.optimizer.step()
        self.weight.grad = None

    def ascend(self, e: torch.Tensor, cost: torch.Tensor, theta: float, mask: torch.Tensor | None, n: int) -> None:
        """``n`` extra ascent steps, each from its own pass (for ``steps`` > 1)."""
        e, cost = e.detach(), cost.detach()
        for _ in range(n):
            _, plan_t = _semidual_pass(cost, self(e), theta, mask)
            self.step(e, plan_t.T)

    def state_tensors(self) -> list[torch.Tensor]:
        """w and Adam's state tensors (empty before the first step), the memory that a step updates in place."""
        if self.weight is None or self.optimizer is None:
            return []
        state = self.optimizer.state.get(self.weight, {})
        return [self.weight, *(v for v in state.values() if isinstance(v, torch.Tensor))]

    def fingerprint(self) -> tuple:
        """Where φ's state lives and the step's settings: a CUDA graph that updates φ is valid while this holds."""
        groups = self.optimizer.param_groups if self.optimizer is not None else []
        settings = tuple((g["lr"], g["betas"], g["eps"], g["weight_decay"], g["amsgrad"], g["fused"]) for g in groups)
        return tuple(t.data_ptr() for t in self.state_tensors()), settings, self.steps

    @contextlib.contextmanager
    def unchanged(self) -> Iterator[None]:
        """Inside, steps may run; on exit w and Adam's state are back to their values on entry, in place (the
        tensors keep their storage: a CUDA graph captured inside updates them). What was built inside is
        left as built, at its initial values (w = 0, Adam's state 0)."""
        before = {id(t): t.detach().clone() for t in self.state_tensors()}
        try:
            yield
        finally:
            with torch.no_grad():
                for t in self.state_tensors():
                    old = before.get(id(t))
                    if old is None:
                        t.zero_()
                    else:
                        t.copy_(old)

    def reset_if_diverged(self) -> bool:
        """Reset φ to 0 if w is not finite (one host read); returns whether it did."""
        if self.weight is None or bool(torch.isfinite(self.weight).all()):
            return False
        self.build(self.weight.shape[0], self.weight.device, self.weight.dtype)
        return True

    def get_extra_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"num_updates": self.num_updates}
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def set_extra_state(self, state: dict[str, Any]) -> None:
        updates = int(state.get("num_updates", 0))
        if "optimizer" in state and self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            saved = [g["lr"] for g in self.optimizer.param_groups]
            if any(lr != self.lr for lr in saved):
                warnings.warn(
                    f"the loaded dual optimiser state had lr {saved[0]:g}; the configured dual_lr={self.lr:g} is kept",
                    UserWarning,
                    stacklevel=2,
                )
            for g in self.optimizer.param_groups:
                g["lr"] = self.lr
        self._updates_before = updates - self._optimizer_steps()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # φ is lazy: a fresh regulariser builds it from the saved weight before loading it.
        w = state_dict.get(prefix + "weight")
        if w is not None and self.weight is None:
            self.build(w.shape[0], w.device, w.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
