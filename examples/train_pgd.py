r"""PGD adversarial training (Madry et al., ICLR 2018) with the GOT regulariser -- GOT-PGD-S / -LM.

Per mini-batch {(x_i, y_i)}:

    x'_i = argmax_{||x' - x_i||_inf <= eps}  CE( f(x'), y_i )                (pgd_linf, random start)
    L    = alpha * CE(f(x'), y) + c * CE(f(x), y)                            (alpha = --adv-weight, c = --clean-weight)
         + beta * W_theta( P_clean, P_adv )                                  (GOT, beta = --got-beta)

``--clean-weight 0 --adv-weight 1`` is Madry's PGD-AT; the GOT paper writes PGD-AT as
alpha*CE(adv) + CE(clean) (the defaults, alpha = 1).  W_theta is the entropic Wasserstein
distance between the clean and adversarial joint distributions of (z, softmax(f)) on the hooked
layer z = g(x); --got lm transports only between same-label pairs.  The attack runs in eval mode
like the TRADES one (Madry's TF code has no such switch).

    python -m examples.train_pgd --got lm
    python -m examples.train_pgd --dataset cifar10 --model resnet18 --got s
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F

from ._runner import Run
from .attacks import pgd_linf
from .common import parse_args


def train(args, run: Run, epoch: int) -> None:
    """One epoch of PGD-AT, plus the GOT line."""
    model, got, optimizer = run.model, run.got, run.optimizer
    model.train()
    for x_natural, y in run.batches(epoch):
        x_adv = pgd_linf(run.attack_model, x_natural, y, args.epsilon, args.step_size, args.num_steps)
        optimizer.zero_grad()
        logits_natural = model(x_natural)
        logits_adv = model(x_adv)
        loss_adv = F.cross_entropy(logits_adv, y)
        loss_natural = F.cross_entropy(logits_natural, y)
        loss = args.adv_weight * loss_adv + args.clean_weight * loss_natural
        loss = loss + got(logits_natural, logits_adv, y)  # GOT
        loss.backward()
        optimizer.step()
        run.meter.update(loss, logits_natural, y, loss_natural=loss_natural, loss_adv=loss_adv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Entry point; ``argv`` as for the command line.  Returns the last epoch's metrics."""
    args = parse_args("pgd", argv)
    with Run(args) as run:  # device, seeding, data, model, GOT, optimiser, resume: examples/_runner.py
        for epoch in run.epochs():
            train(args, run, epoch)
            run.scheduler.step()
            run.end_epoch(epoch)  # test accuracy, metrics.{jsonl,csv}, checkpoint.pt
    return run.last


if __name__ == "__main__":
    main()
