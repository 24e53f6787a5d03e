"""Flags of ``train_trades.py`` / ``train_pgd.py``, their per-dataset defaults, and the GOT regulariser
they build (``add_got_flags`` and ``make_got``, together at the end of this file).

The loops themselves are in the two scripts; what runs around them (device, seeding, resume,
``torchrun``, checkpoints, metrics files) is in ``_runner.py`` and ``_io.py``.
"""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path
from typing import Any

import torch.nn as nn

from .data import DATASETS, check_data_dir
from .models import MODEL_NAMES, default_layer

# Per-dataset defaults.  MNIST/CIFAR/SVHN follow the paper's attack settings and the TRADES
# reference optimiser settings; see examples/README.md for where the two differ.  The digits
# settings were chosen by measurement (README: "digits hyper-parameters").
_RESNET: dict[str, Any] = dict(
    model="resnet18",
    epochs=76,
    batch_size=128,
    lr=0.1,
    momentum=0.9,
    weight_decay=2e-4,
    lr_schedule=[75, 90, 100],
    epsilon=8 / 255,
    step_size=2 / 255,
    num_steps=10,
    beta_trades=6.0,
)
DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": dict(
        model="digitsnet",
        epochs=20,
        batch_size=64,
        lr=0.05,
        momentum=0.9,
        weight_decay=5e-4,
        lr_schedule=[14, 18],
        epsilon=0.15,
        step_size=0.03,
        num_steps=10,
        beta_trades=6.0,
    ),
    "mnist": dict(
        model="smallcnn",
        epochs=100,
        batch_size=128,
        lr=0.01,
        momentum=0.9,
        weight_decay=0.0,
        lr_schedule=[55, 75, 90],
        epsilon=0.3,
        step_size=0.01,
        num_steps=40,
        beta_trades=1.0,
    ),
    # TRADES' CIFAR-10 set-up (train_trades_cifar10.py) for every colour dataset.
    "cifar10": _RESNET,
    "cifar100": _RESNET,
    "svhn": {**_RESNET, "lr": 0.01},
}


# ----------------------------------------------------------------------------- arguments
def number(text: str) -> float:
    """argparse type accepting ``0.03`` as well as ``8/255``."""
    if "/" in text:
        num, den = text.split("/", 1)
        return float(num) / float(den)
    return float(text)


def build_parser(description: str, loss: str) -> argparse.ArgumentParser:
    """Flags of both training scripts; ``loss`` is ``"trades"`` or ``"pgd"``.

    Dataset-dependent flags default to ``None`` and are filled from ``DEFAULTS`` by
    ``resolve_args`` so that ``--dataset mnist`` alone gives the paper's MNIST set-up.
    """
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data and model")
    g.add_argument("--dataset", choices=DATASETS, default="digits")
    g.add_argument(
        "--data-dir",
        type=str,
        default=None,
        help="dataset directory (default: <repo>/../shared/data/<dataset>; digits needs none)",
    )
    g.add_argument("--model", choices=MODEL_NAMES, default=None, help="default: per dataset")
    g.add_argument("--train-subset", type=int, default=None, metavar="N", help="use the first N training points")
    g.add_argument("--test-subset", type=int, default=None, metavar="N", help="use the first N test points")

    g = p.add_argument_group("optimisation (default: per dataset)")
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--test-batch-size", type=int, default=500)
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--momentum", type=float, default=None)
    g.add_argument("--weight-decay", type=float, default=None)
    g.add_argument(
        "--lr-schedule",
        type=int,
        nargs="*",
        default=None,
        metavar="EPOCH",
        help="TRADES-style piecewise decay: lr is multiplied by 0.1 from each of these (1-based) epochs on",
    )

    g = p.add_argument_group("attack used for training (default: per dataset)")
    g.add_argument("--epsilon", type=number, default=None, help="L-inf radius, e.g. 0.3 or 8/255")
    g.add_argument("--num-steps", type=int, default=None)
    g.add_argument("--step-size", type=number, default=None)
    if loss == "trades":
        g.add_argument(
            "--beta-trades",
            type=float,
            default=None,
            help="TRADES weight of KL(adv||clean) (the paper's alpha; TRADES ref: 6 CIFAR, 1 MNIST)",
        )
    else:
        g.add_argument("--adv-weight", type=float, default=1.0, help="alpha in alpha*CE(adv) + clean_weight*CE(clean)")
        g.add_argument(
            "--clean-weight",
            type=float,
            default=1.0,
            help="weight of CE(clean); 0 gives Madry's PGD-AT, 1 the paper's form",
        )

    add_got_flags(p)

    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=1)
    g.add_argument("--out", type=str, default=None, help="run directory (default: runs/<dataset>-<loss>-got_<got>)")
    g.add_argument(
        "--resume", action="store_true", help="continue from <out>/checkpoint.pt if it exists (else start from scratch)"
    )
    g.add_argument("--overwrite", action="store_true", help="start afresh even if <out> holds a checkpoint")
    g.add_argument(
        "--init-weights",
        type=str,
        default=None,
        help="start from these model weights (an earlier run's model_final.pt or checkpoint.pt) with a "
        "fresh optimiser and schedule: fine-tuning, e.g. adding GOT to a trained model",
    )
    g.add_argument("--device", type=str, default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--num-workers", type=int, default=0)
    g.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads for this run (small models are fastest with 1)"
    )
    g.add_argument(
        "--eval-pgd-steps",
        type=int,
        default=10,
        help="steps of the cheap per-epoch test PGD (training epsilon and step size)",
    )
    g.add_argument(
        "--no-deterministic",
        dest="deterministic",
        action="store_false",
        help="do not call torch.use_deterministic_algorithms(True)",
    )
    g.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    return p


def resolve_args(args: argparse.Namespace, loss: str) -> argparse.Namespace:
    """Fill dataset-dependent ``None`` flags from ``DEFAULTS`` and derive the GOT layer / out dir."""
    for key, value in DEFAULTS[args.dataset].items():
        if hasattr(args, key) and getattr(args, key) is None:
            setattr(args, key, value)
    if args.got_layer is None:
        args.got_layer = default_layer(args.model)
    try:
        check_data_dir(args.dataset, args.data_dir)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    if args.out is None:
        args.out = str(Path("runs") / f"{args.dataset}-{loss}-got_{args.got}")
    args.loss = loss
    return args


def parse_args(loss: str, argv: list[str] | None = None) -> argparse.Namespace:
    """The completed flags of ``train_trades.py`` (``loss="trades"``) or ``train_pgd.py`` (``"pgd"``)."""
    description = {
        "trades": "TRADES / GOT-TRADES adversarial training",
        "pgd": "PGD-AT / GOT-PGD adversarial training",
    }[loss]
    return resolve_args(build_parser(description, loss).parse_args(argv), loss)


# ----------------------------------------------------------------------------- GOT: the flags and what they build
def add_got_flags(p: argparse.ArgumentParser) -> None:
    """The ``--got-*`` flags; ``make_got`` below turns them into the regulariser. Defaults are the library's."""
    from got_reg import GOTRegularizer

    default = {k: v.default for k, v in inspect.signature(GOTRegularizer).parameters.items()}
    g = p.add_argument_group("GOT regulariser (defaults: the library's)")
    g.add_argument(
        "--got",
        choices=["none", "s", "lm"],
        default="none",
        help="none: baseline; s: plain Sinkhorn (GOT-*-S); lm: label matching (GOT-*-LM)",
    )
    g.add_argument("--got-solver", choices=["sinkhorn", "dual"], default=default["solver"])
    g.add_argument("--got-beta", type=float, default=default["beta"], help="weight beta of the OT term")
    g.add_argument("--got-theta", type=float, default=default["theta"])
    g.add_argument("--got-lam", type=float, default=default["lam"])
    g.add_argument(
        "--got-anchor",
        choices=["none", "clean", "features"],
        default=default["anchor"],
        help="clean side of the cost held fixed (clean), its features only, or none (the paper)",
    )
    g.add_argument(
        "--got-debias",
        action=argparse.BooleanOptionalAction,
        default=default["debias"],
        help="Sinkhorn divergence W(x,y) - W(x,x)/2 - W(y,y)/2 instead of W (--no-got-debias: the paper)",
    )
    g.add_argument(
        "--got-dual-input",
        choices=["embedded", "raw"],
        default=default["dual_input"],
        help="dual potential on the cost's embedding (unit features for cosine) or on raw z (the paper)",
    )
    g.add_argument("--got-layer", type=str, default=None, help="hooked layer (default: the model's penultimate layer)")
    g.add_argument(
        "--got-cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=default["cuda_graphs"],
        help="replay the GOT call from CUDA graphs (CUDA, B <= 256; see got_reg.graphs)",
    )
    g.add_argument(
        "--got-deferred-checks",
        action=argparse.BooleanOptionalAction,
        default=default["deferred_checks"],
        help="with --got-cuda-graphs: read each call's NaN and convergence flags at the next call (no host sync)",
    )


def make_got(args: argparse.Namespace, model: nn.Module, world_size: int = 1):
    """The GOT regulariser for ``--got {s,lm}``, or ``None`` for the baseline."""
    if args.got == "none":
        return None
    from got_reg import GOTRegularizer

    kwargs = {"distributed_gather": True} if world_size > 1 else {}
    return GOTRegularizer(
        model,
        layer=args.got_layer,
        beta=args.got_beta,
        lam=args.got_lam,
        theta=args.got_theta,
        feature_cost="cosine",
        prob_cost="kl",
        label_matching=(args.got == "lm"),
        solver=args.got_solver,
        anchor=args.got_anchor,
        debias=args.got_debias,
        dual_input=args.got_dual_input,
        cuda_graphs=args.got_cuda_graphs,
        deferred_checks=args.got_deferred_checks,
        **kwargs,
    )
