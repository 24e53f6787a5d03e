r"""PGD adversarial training (Madry et al., ICLR 2018) with the GOT regulariser -- GOT-PGD-S / -LM.

Per mini-batch {(x_i, y_i)}:

    x'_i = argmax_{||x' - x_i||_inf <= eps}  CE( f(x'), y_i )                (pgd_linf, random start)
    L    = alpha * CE(f(x'), y) + c * CE(f(x), y)                            (alpha = --adv-weight, c = --clean-weight)
         + beta * W_theta( P_clean, P_adv )                                  (GOT, beta = --got-beta)

``--clean-weight 0 --adv-weight 1`` is Madry's PGD-AT; the GOT paper writes PGD-AT as
alpha*CE(adv) + CE(clean) (the defaults, alpha = 1).  W_theta is the entropic Wasserstein
distance between the clean and adversarial joint distributions of (z, softmax(f)) on the hooked
layer z = g(x); --got lm transports only between same-label pairs.

    python examples/train_pgd.py --got lm
    python examples/train_pgd.py --dataset cifar10 --model resnet18 --got s
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from attacks import pgd_linf  # type: ignore  # noqa: E402
    from common import build_parser, main_from  # type: ignore  # noqa: E402
else:
    from .attacks import pgd_linf
    from .common import build_parser, main_from


def pgd_at_step(model, got, x_natural, y, optimizer, args, attack_model):
    """PGD-AT loss plus the GOT term.  The attack runs in eval mode like the TRADES one."""
    x_adv = pgd_linf(attack_model, x_natural, y, args.epsilon, args.step_size, args.num_steps)
    optimizer.zero_grad()
    logits_natural = model(x_natural)
    logits_adv = model(x_adv)
    loss_adv = F.cross_entropy(logits_adv, y)
    loss_natural = F.cross_entropy(logits_natural, y)
    loss = args.adv_weight * loss_adv + args.clean_weight * loss_natural
    loss_got = got(logits_natural, logits_adv, y) if got is not None else torch.zeros((), device=y.device)  # GOT
    loss = loss + loss_got
    parts = {"loss_natural": loss_natural.detach(), "loss_adv": loss_adv.detach(), "loss_got": loss_got.detach()}
    return loss, parts, logits_natural


def build_pgd_parser():
    return build_parser("PGD-AT / GOT-PGD adversarial training", loss="pgd")


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Entry point; ``argv`` as for the command line.  Returns the last epoch's metrics."""
    return main_from(build_pgd_parser(), "pgd", pgd_at_step, argv)


if __name__ == "__main__":
    main()
