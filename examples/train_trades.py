r"""TRADES (Zhang et al., ICML 2019) with the GOT regulariser -- GOT-TRADES-S / GOT-TRADES-LM.

Per mini-batch {(x_i, y_i)}:

    x'_i = argmax_{||x' - x_i||_inf <= eps}  KL( f(x_i) || f(x') )          (trades_kl_attack)
    L    = CE(f(x), y) + alpha * KL( f(x') || f(x) )                         (TRADES, alpha = --beta-trades)
         + beta * W_theta( P_clean, P_adv )                                  (GOT,    beta  = --got-beta)

where W_theta is the entropic Wasserstein distance between the empirical joint distributions of
(z, softmax(f)) on clean and adversarial points, z = g(x) the hooked layer (--got-layer);
with --got lm only same-label pairs may be transported.  "Improving robustness with optimal
transport based adversarial generalization" (GOT), eq. for GOT-TRADES.

``train`` is the reference ``train`` of yaodongyu/TRADES (``train_trades_mnist.py``) with its
``trades_loss`` (``distance='l_inf'``) written out, plus the GOT line.  Two differences from the
reference: one forward of ``model(x_natural)`` in train mode serves the CE and the KL target (the
reference runs it twice; it is also the forward GOT pairs with the clean features), and the
attack runs on the bare network under ``torchrun`` (it needs no gradient synchronisation).

    python -m examples.train_trades                                   # TRADES on digits
    python -m examples.train_trades --got lm                          # GOT-TRADES-LM on digits
    python -m examples.train_trades --dataset mnist --got lm          # paper's MNIST set-up
    torchrun --nproc_per_node=2 -m examples.train_trades --got lm     # 2 CPU processes (gloo)
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F

from ._runner import Run
from .attacks import trades_kl_attack
from .common import parse_args


def train(args, run: Run, epoch: int) -> None:
    """One epoch: TRADES' ``train`` with its ``trades_loss`` written out, plus the GOT line."""
    model, got, optimizer = run.model, run.got, run.optimizer
    model.train()
    for x_natural, y in run.batches(epoch):
        # generate adversarial example (eval mode inside; the model's train mode is restored)
        x_adv = trades_kl_attack(run.attack_model, x_natural, args.epsilon, args.step_size, args.num_steps)
        optimizer.zero_grad()
        # calculate robust loss
        logits_natural = model(x_natural)
        logits_adv = model(x_adv)
        loss_natural = F.cross_entropy(logits_natural, y)
        loss_robust = (1.0 / len(x_natural)) * F.kl_div(
            F.log_softmax(logits_adv, dim=1), F.softmax(logits_natural, dim=1), reduction="sum"
        )
        loss = loss_natural + args.beta_trades * loss_robust
        loss = loss + got(logits_natural, logits_adv, y)  # GOT
        loss.backward()
        optimizer.step()
        run.meter.update(loss, logits_natural, y, loss_natural=loss_natural, loss_robust=loss_robust)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Entry point; ``argv`` as for the command line.  Returns the last epoch's metrics."""
    args = parse_args("trades", argv)
    with Run(args) as run:  # device, seeding, data, model, GOT, optimiser, resume: examples/_runner.py
        for epoch in run.epochs():
            train(args, run, epoch)
            run.scheduler.step()
            run.end_epoch(epoch)  # test accuracy, metrics.{jsonl,csv}, checkpoint.pt
    return run.last


if __name__ == "__main__":
    main()
