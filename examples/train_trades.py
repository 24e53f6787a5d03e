r"""TRADES (Zhang et al., ICML 2019) with the GOT regulariser -- GOT-TRADES-S / GOT-TRADES-LM.

Per mini-batch {(x_i, y_i)}:

    x'_i = argmax_{||x' - x_i||_inf <= eps}  KL( f(x_i) || f(x') )          (trades_kl_attack)
    L    = CE(f(x), y) + alpha * KL( f(x') || f(x) )                         (TRADES, alpha = --beta-trades)
         + beta * W_theta( P_clean, P_adv )                                  (GOT,    beta  = --got-beta)

where W_theta is the entropic Wasserstein distance between the empirical joint distributions of
(z, softmax(f)) on clean and adversarial points, z = g(x) the hooked layer (--got-layer);
with --got lm only same-label pairs may be transported.  "Improving robustness with optimal
transport based adversarial generalization" (GOT), eq. for GOT-TRADES.

    python examples/train_trades.py                                   # TRADES on digits
    python examples/train_trades.py --got lm                          # GOT-TRADES-LM on digits
    python examples/train_trades.py --dataset mnist --got lm          # paper's MNIST set-up
    torchrun --nproc_per_node=2 examples/train_trades.py --got lm     # 2 CPU processes (gloo)
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from attacks import trades_kl_attack  # type: ignore  # noqa: E402
    from common import build_parser, main_from  # type: ignore  # noqa: E402
else:
    from .attacks import trades_kl_attack
    from .common import build_parser, main_from


def trades_step(model, got, x_natural, y, optimizer, args, attack_model):
    """``trades_loss`` of yaodongyu/TRADES (``distance='l_inf'``) plus the GOT term.

    The reference evaluates ``model(x_natural)`` twice in train mode (once for the CE, once as
    the KL target); one forward serves both here, which is also the forward GOT pairs with the
    clean features.  The KL target is not detached, as in the reference.
    """
    batch_size = len(x_natural)
    # generate adversarial example (eval mode inside; the caller's train mode is restored)
    x_adv = trades_kl_attack(attack_model, x_natural, args.epsilon, args.step_size, args.num_steps)
    # zero gradient
    optimizer.zero_grad()
    # calculate robust loss
    logits_natural = model(x_natural)
    logits_adv = model(x_adv)
    loss_natural = F.cross_entropy(logits_natural, y)
    loss_robust = (1.0 / batch_size) * F.kl_div(F.log_softmax(logits_adv, dim=1),
                                                F.softmax(logits_natural, dim=1), reduction="sum")
    loss = loss_natural + args.beta_trades * loss_robust
    loss_got = got(logits_natural, logits_adv, y) if got is not None else torch.zeros((), device=y.device)  # GOT
    loss = loss + loss_got
    parts = {"loss_natural": loss_natural.detach(), "loss_robust": loss_robust.detach(),
             "loss_got": loss_got.detach()}
    return loss, parts, logits_natural


def build_trades_parser():
    return build_parser("TRADES / GOT-TRADES adversarial training", loss="trades")


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Entry point; ``argv`` as for the command line.  Returns the last epoch's metrics."""
    return main_from(build_trades_parser(), "trades", trades_step, argv)


if __name__ == "__main__":
    main()
