r"""The paper's cost, λ · cosine + KL, as one autograd node with a closed-form backward.

Bui et al., "Improving robustness with optimal transport based adversarial generalization", eq. 5 with
d_x = cosine and d_y = KL (their best choice). With unit vectors ẑ_i = z_i / |z_i| (0 for a zero row),
log-probabilities ℓ_i = log_softmax(logits_i), p_i = exp(ℓ_i), and the same on the adversarial side (ẑ', ℓ', q):

    C_ij = λ (1 − ẑ_i·ẑ'_j) + Σ_k p_ik (ℓ_ik − ℓ'_jk) = r_i − [ẑ_i, p_i]·[λ ẑ'_j, ℓ'_j],   r_i = λ + p_i·ℓ_i,

one matrix product of side-by-side factors. For an upstream gradient G = ∂L/∂C, with R = G·[λẑ', ℓ'] and
S = Gᵀ·[ẑ, p] split into their feature and class columns (R_z, R_ℓ, S_z, S_ℓ) and g = G·1:

    ∂L/∂z_i  = −(R_z,i − ẑ_i (ẑ_i·R_z,i)) / |z_i|                    (the projection of unit-vector gradients)
    ∂L/∂z'_j = −λ (S_z,j − ẑ'_j (ẑ'_j·S_z,j)) / |z'_j|
    ∂L/∂logits_i  = p_i ⊙ (v_i − p_i·v_i),   v_i = g_i ℓ_i − R_ℓ,i     (softmax's Jacobian; p·ℓ = r − λ)
    ∂L/∂logits'_j = −S_ℓ,j + q_j Σ_k S_ℓ,jk                            (log_softmax's Jacobian)

Zero feature rows get zero gradient (as :class:`~got_reg.costs.CosineCost` documents). When both sides
are the same tensors (the self-cost of the Sinkhorn divergence, over the stacked batches) the factors
are built once and the two sides' gradients are summed.

Autograd would compose this from ~30 forward operators and ~45 backward ones (normalisation, two
log_softmax, the concatenations, the addmm and the clamp, each with its backward); this node's torch code
uses ~15 and ~20. On a GPU at GOT's batch sizes every operator is a kernel launch whose cost dwarfs its
arithmetic, so on CUDA float32 tensors, with Triton installed, the node takes the kernels of
:mod:`got_reg.costs._triton_cosine_kl` instead: the forward is one Triton launch (both sides' factors,
r and 1/|z|) + the addmm + its clamp; the backward is the two matrix products R and S (only those the
requested gradients need) + one Triton launch that writes every requested gradient. The torch code
stays for CPU, float64, ``GOT_REG_DISABLE_TRITON=1``, and as the fallback: a kernel that raises is
reported once (:func:`got_reg.solvers.lse.triton_failed`, which turns the kernels off for the process)
and the same call goes on in torch. Both paths save the same tensors, so either backward follows
either forward.

The output is clamped at 0 (each term is ≥ 0; rounding leaves KL(p‖p) at −1e-7). The backward is that of
the unclamped expression: the two differ only on pairs whose cost is 0 up to rounding, where the true
gradient is 0 up to rounding as well. The backward is not itself differentiable (``once_differentiable``).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from ..solvers.lse import triton_failed
from .feature import unit_rows

# Device types whose tensors may take the Triton kernels; the one switch for them (the tests and
# benchmarks.bench_launches add "cpu" to run them interpreted).
_KERNEL_DEVICES = ("cuda",)


def _kernels(*tensors: torch.Tensor | None) -> ModuleType | None:
    """:mod:`got_reg.costs._triton_cosine_kl` if some tensor is on a GPU and Triton is on for the process
    (installed, not turned off by ``GOT_REG_DISABLE_TRITON=1``, no kernel failed), else None.

    Imported on first use: CPU work never imports Triton, which also decides at its import whether kernels
    are compiled or interpreted."""
    if not any(t is not None and t.device.type in _KERNEL_DEVICES for t in tensors):
        return None
    try:
        from . import _triton_cosine_kl
    except ImportError:  # a broken install: the torch path still works
        return None
    return _triton_cosine_kl if _triton_cosine_kl.enabled() else None


def _unit_backward(grad_unit: torch.Tensor, unit: torch.Tensor, inv: torch.Tensor, scale: float) -> torch.Tensor:
    """∂L/∂z from ∂L/∂ẑ = −scale · grad_unit: the component orthogonal to ẑ, divided by |z|."""
    along = (unit * grad_unit).sum(1, keepdim=True)
    out = torch.addcmul(grad_unit, unit, along, value=-1.0)
    return out.mul_((inv * -scale)[:, None])


class CosineKL(torch.autograd.Function):
    """``CosineKL.apply(z, logits, z_adv, logits_adv, lam, eps)``; ``z_adv = logits_adv = None`` for the self-cost."""

    @staticmethod
    def forward(
        ctx: Any,
        z: torch.Tensor,
        logits: torch.Tensor,
        z_adv: torch.Tensor | None,
        logits_adv: torch.Tensor | None,
        lam: float,
        eps: float,
    ) -> torch.Tensor:
        same = z_adv is None
        D = z.shape[1]
        tri = _kernels(z, logits, z_adv, logits_adv)
        if tri is not None and tri.forward_supported(z, logits, z_adv, logits_adv):
            try:
                cost, f = tri.forward(
                    z, logits, z_adv, logits_adv, lam, eps, keep_unit_adv=bool(ctx.needs_input_grad[2])
                )
            except Exception as exc:  # noqa: BLE001 - any kernel failure falls back to torch
                triton_failed(exc)
            else:
                ctx.lam, ctx.D, ctx.same = lam, D, same
                ctx.save_for_backward(f.left, f.right, f.log_p, f.inv, f.unit_adv, f.inv_adv, f.log_q)
                return cost
        unit, inv = unit_rows(z, eps)
        log_p = torch.log_softmax(logits, dim=1)
        p = log_p.exp()
        row = (p * log_p).sum(1).add_(lam)
        if same:
            unit_adv, inv_adv, log_q = unit, inv, log_p
        else:
            assert z_adv is not None and logits_adv is not None
            unit_adv, inv_adv = unit_rows(z_adv, eps)
            log_q = torch.log_softmax(logits_adv, dim=1)
        left = torch.cat([unit, p], 1)
        right = torch.cat([unit_adv * lam if lam != 1.0 else unit_adv, log_q], 1)
        cost = torch.addmm(row[:, None], left, right.T, alpha=-1.0).clamp_min_(0.0)
        ctx.lam, ctx.D, ctx.same = lam, D, same
        if same:  # the adversarial side is the clean one: nothing more to keep
            unit_adv = inv_adv = log_q = None  # type: ignore[assignment]
        ctx.save_for_backward(left, right, log_p, inv, unit_adv, inv_adv, log_q)
        return cost

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        left, right, log_p, inv, unit_adv, inv_adv, log_q = ctx.saved_tensors
        lam, D, same = ctx.lam, ctx.D, ctx.same
        unit, p = left[:, :D], left[:, D:]
        need_z, need_l, need_za, need_la = ctx.needs_input_grad[:4]
        tri = _kernels(grad, left)
        if tri is not None and tri.cost_supported(grad, left, right, log_p, unit_adv, log_q):
            try:
                grads = tri.backward(
                    grad, left, right, log_p, inv, unit_adv, inv_adv, log_q, lam, D, same, ctx.needs_input_grad[:4]
                )
            except Exception as exc:  # noqa: BLE001 - any kernel failure falls back to torch
                triton_failed(exc)
            else:
                return (*grads, None, None)
        R = grad @ right  # ∂L/∂left = −R
        S = grad.T @ left  # ∂L/∂right = −S
        R_z, R_l, S_z, S_l = R[:, :D], R[:, D:], S[:, :D], S[:, D:]
        g_z = g_l = g_za = g_la = None
        if same:
            # Both sides are one tensor: its gradient is the sum of the two sides'.
            if need_z:
                g_z = _unit_backward(torch.add(R_z, S_z, alpha=lam), unit, inv, 1.0)
            if need_l:
                v = torch.mul(log_p, grad.sum(1, keepdim=True)).sub_(R_l)
                pv = (p * v).sum(1, keepdim=True)
                g_l = v.sub_(pv).add_(S_l.sum(1, keepdim=True)).mul_(p).sub_(S_l)
            return g_z, g_l, None, None, None, None
        if need_z:
            g_z = _unit_backward(R_z, unit, inv, 1.0)
        if need_l:
            v = torch.mul(log_p, grad.sum(1, keepdim=True)).sub_(R_l)
            g_l = v.sub_((p * v).sum(1, keepdim=True)).mul_(p)
        if need_za:
            g_za = _unit_backward(S_z, unit_adv, inv_adv, lam)
        if need_la:
            g_la = torch.addcmul(S_l, log_q.exp(), S_l.sum(1, keepdim=True), value=-1.0).neg_()
        return g_z, g_l, g_za, g_la, None, None
