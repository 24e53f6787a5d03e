r"""L-infinity attacks used for training and evaluation.

* ``pgd_linf`` -- Madry et al. (2018), "Towards Deep Learning Models Resistant to Adversarial
  Attacks": uniform random start in the eps-ball, then ``num_steps`` of

      x <- Proj_{B_inf(x0, eps) ∩ [0,1]^d} ( x + step_size * sign(grad_x CE(f(x), y)) ).

* ``trades_kl_attack`` -- the inner maximisation of TRADES (Zhang et al. 2019,
  yaodongyu/TRADES ``trades.py``): start at ``x0 + 0.001 * N(0, I)`` and ascend

      KL( softmax f(x0) || softmax f(x) )

  with the same signed steps and projection.

Both run the model in eval mode (as TRADES does: BatchNorm uses running statistics and dropout
is off, so the attack sees the deterministic network) and put every module's train/eval flag
back afterwards, even on error.  Gradients are taken with ``torch.autograd.grad`` w.r.t. the
input only, so nothing is accumulated in the parameters' ``.grad``.  Randomness comes from the
optional ``generator`` (else the global torch RNG is *consumed*, never reseeded).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["eval_mode", "pgd_linf", "trades_kl_attack", "accuracy"]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode; restore each submodule's own flag on exit.

    Restoring per module (not ``model.train(was_training)``) keeps deliberately mixed states,
    e.g. a frozen BatchNorm held in eval mode inside a training model.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def _project(x_adv: torch.Tensor, x0: torch.Tensor, epsilon: float) -> torch.Tensor:
    x_adv = torch.min(torch.max(x_adv, x0 - epsilon), x0 + epsilon)
    return torch.clamp(x_adv, 0.0, 1.0)


def pgd_linf(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epsilon: float,
    step_size: float,
    num_steps: int,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Untargeted L-inf PGD on the cross-entropy (Madry et al. 2018). Returns detached ``x_adv``."""
    x0 = x.detach()
    if random_start:
        noise = torch.rand(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_adv = _project(x0 + (2.0 * noise - 1.0) * epsilon, x0, epsilon)
    else:
        x_adv = x0.clone()
    with eval_mode(model), torch.enable_grad():
        for _ in range(num_steps):
            x_adv.requires_grad_(True)
            # Sum, not mean: only the sign of the gradient is used, and a mean would underflow
            # per-example gradients for large batches.
            loss = F.cross_entropy(model(x_adv), y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, [x_adv])
            x_adv = _project(x_adv.detach() + step_size * grad.sign(), x0, epsilon)
    return x_adv.detach()


def trades_kl_attack(
    model: nn.Module,
    x_natural: torch.Tensor,
    epsilon: float,
    step_size: float,
    num_steps: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """TRADES inner maximisation (``trades_loss`` of yaodongyu/TRADES, ``distance='l_inf'``).

    ``model.eval()`` during the attack as in the reference (which then calls ``model.train()``;
    here the caller's modes are restored instead).  The reference re-evaluates
    ``softmax(model(x_natural))`` at every step; in eval mode that target is a constant, so it is
    computed once (same iterates, half the forwards).
    """
    x0 = x_natural.detach()
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_adv = x0 + 0.001 * noise
    with eval_mode(model):
        with torch.no_grad():
            p_natural = F.softmax(model(x0), dim=1)
        with torch.enable_grad():
            for _ in range(num_steps):
                x_adv.requires_grad_(True)
                loss_kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), p_natural, reduction="sum")
                (grad,) = torch.autograd.grad(loss_kl, [x_adv])
                x_adv = _project(x_adv.detach() + step_size * grad.sign(), x0, epsilon)
    # The reference clamps once more after the loop; a no-op for num_steps > 0 but not for 0.
    return torch.clamp(x_adv, 0.0, 1.0).detach()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy of ``model`` (in eval mode, restored afterwards) on tensors ``x, y``."""
    correct = 0
    with eval_mode(model):
        for i in range(0, len(x), batch_size):
            correct += (model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum().item()
    return correct / max(len(x), 1)
