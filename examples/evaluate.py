r"""Evaluate a run directory written by ``train_trades.py`` / ``train_pgd.py``.

Reports, on the run's test set (``model.eval()``, true labels):

* clean accuracy;
* PGD-20 and PGD-40 (L-inf, random start, the run's epsilon and step size -- the paper's
  protocol: MNIST eps=0.3 step 0.01, CIFAR eps=8/255 step 2/255);
* AutoAttack, standard L-inf version (Croce & Hein 2020) through ``pyautoattack``, on the first
  ``--aa-n`` test points, with a per-attack breakdown: the accuracy after each stage of the
  standard run (APGD-CE, +APGD-T, +FAB-T white-box, +Square black-box) and Square run *alone* on
  the same points (``--aa-breakdown individual``: every attack alone), so the black-box attack
  can be compared with the gradient-based ones -- Square beating them is a symptom of gradient
  masking;
* an epsilon sweep of PGD (``--sweep-steps`` steps of size 2.5*eps/steps, Madry et al.) with a
  markdown table and a PNG plot;
* sanity checks: accuracy must not rise with more PGD steps, must not rise with epsilon, and at
  eps >= 0.5 -- where the all-grey image x = 0.5 lies in every ball -- no classifier can beat
  the majority-class rate, so anything well above it means the attack failed (masking).

Writes ``eval.json``, ``eval.md`` and ``eps_sweep.png`` into the run directory (``eval-TAG.*`` with ``--tag``).

    python -m examples.evaluate runs/digits-trades-got_lm
    python -m examples.evaluate RUN --aa-n 1000 --eps-sweep 0 0.1 0.2 0.3 0.4 0.5
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ._io import CHECKPOINT, CONFIG, FINAL_MODEL, atomic_write_bytes, load_checkpoint, load_model_weights, write_json
from ._runner import num_threads, pick_device
from .attacks import accuracy, eval_mode, pgd_linf
from .common import number
from .data import dataset_tensors, load_datasets
from .models import build_model
from .report import eval_report, method_name

AA_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")
DEFAULT_SWEEPS = {
    "digits": [0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5],
    "mnist": [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],
    "cifar10": [0.0, 2 / 255, 4 / 255, 8 / 255, 16 / 255, 32 / 255, 64 / 255, 0.5],
    "cifar100": [0.0, 2 / 255, 4 / 255, 8 / 255, 16 / 255, 32 / 255, 64 / 255, 0.5],
    "svhn": [0.0, 2 / 255, 4 / 255, 8 / 255, 16 / 255, 32 / 255, 64 / 255, 0.5],
}
GREY_EPS = 0.5  # for x in [0,1], every L-inf ball of radius >= 0.5 contains the constant image 0.5


# ----------------------------------------------------------------------------- loading
def load_run(run_dir: Path, device: torch.device, which: str = "final"):
    """Rebuild the model of ``run_dir`` from ``config.json`` and its weights; returns ``(model, cfg)``.

    ``which="final"`` reads ``model_final.pt``; ``"checkpoint"`` the last ``checkpoint.pt``
    (useful while a run is still going).  Both are loaded with ``weights_only=True`` and mapped to
    ``device``, so a model trained on a GPU evaluates on a CPU-only machine.
    """
    run_dir = Path(run_dir)
    make_one = f"it is the --out directory of a training run, e.g. python -m examples.train_trades --out {run_dir}"
    if not run_dir.is_dir():
        raise SystemExit(
            f"no run directory {run_dir}: expected a directory holding {CONFIG} and {FINAL_MODEL} "
            f"or {CHECKPOINT}; {make_one}"
        )
    if not (run_dir / CONFIG).is_file():
        present = ", ".join(sorted(p.name for p in run_dir.iterdir())) or "nothing"
        raise SystemExit(
            f"{run_dir} is not a run directory: no {CONFIG} in it (it holds {present}); "
            f"a run directory holds {CONFIG} and {FINAL_MODEL} or {CHECKPOINT}; {make_one}"
        )
    cfg = json.loads((run_dir / CONFIG).read_text())
    data = cfg["data"]
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten: leave the caller's RNG alone
        model = build_model(cfg["model"], data["num_classes"], data["in_channels"], data["image_size"])
    if which == "final" and (run_dir / FINAL_MODEL).exists():
        state = load_model_weights(run_dir / FINAL_MODEL, device, flag="evaluate")
    elif (run_dir / CHECKPOINT).exists():
        state = load_checkpoint(
            run_dir / CHECKPOINT, device, recover=f"Evaluate {FINAL_MODEL} instead, or train the run again."
        )["model"]
    else:
        raise SystemExit(
            f"{run_dir} holds neither {FINAL_MODEL} nor {CHECKPOINT}: its training has not finished "
            f"an epoch (resume it with the same flags and --resume)"
        )
    model.load_state_dict(state)
    return model.to(device).eval(), cfg


def load_test_set(
    cfg: dict[str, Any], n: int | None = None, data_dir: str | None = None, test_subset: int | None = None
):
    """The first ``n`` points of the run's test set: its ``--test-subset`` unless ``test_subset`` (0: all) is given."""
    subset = cfg.get("test_subset") if test_subset is None else (test_subset or None)
    _, test_set, _ = load_datasets(cfg["dataset"], data_dir or cfg.get("data_dir"), None, subset)
    return dataset_tensors(test_set, n)


# ----------------------------------------------------------------------------- attacks
def pgd_accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epsilon: float,
    step_size: float,
    num_steps: int,
    seed: int = 0,
    batch_size: int = 500,
    device: torch.device | None = None,
) -> float:
    """Accuracy under ``pgd_linf`` (random start drawn from a generator seeded with ``seed``)."""
    device = device or next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    correct = 0.0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
        x_adv = pgd_linf(model, xb, yb, epsilon, step_size, num_steps, generator=gen) if epsilon > 0 else xb
        correct += accuracy(model, x_adv, yb) * len(xb)
    return correct / max(len(x), 1)


class _StageLog(logging.Handler):
    """Collects "robust accuracy after <ATTACK>: xx.xx%" from pyautoattack's log (pinned 0.2.0).

    Those are the cumulative accuracies after each stage of the standard run, which
    ``run_standard_evaluation`` logs but does not return.
    """

    pattern = re.compile(r"robust accuracy after (\S+): ([0-9.]+)%")

    def __init__(self, echo: bool) -> None:
        super().__init__(logging.DEBUG)
        self.stages: dict[str, float] = {}
        self.echo = echo

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        m = self.pattern.search(msg)
        if m:
            self.stages[m.group(1).lower()] = float(m.group(2)) / 100.0
        if self.echo and (m or "initial accuracy" in msg):
            print(f"  AutoAttack: {msg}", flush=True)


@contextmanager
def _capture_aa_log(echo: bool):
    logger = logging.getLogger("auto-attack")
    handler = _StageLog(echo)
    saved = (logger.level, logger.propagate)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # its DEBUG chatter must not reach the caller's root handlers
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def autoattack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epsilon: float,
    batch_size: int = 500,
    seed: int = 0,
    breakdown: str = "stages",
    device: torch.device | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Standard L-inf AutoAttack (pyautoattack 0.2.0) on ``x, y`` plus a per-attack breakdown.

    ``breakdown``:
      * ``"stages"``: the cumulative accuracy after each stage of the standard run
        (APGD-CE, +APGD-T, +FAB-T, +Square; APGD-CE's stage is APGD-CE alone), and Square run
        alone on all points -- the black-box vs white-box comparison at the cost of one extra attack;
      * ``"individual"``: additionally every attack alone (AutoAttack's individual mode; ~2x cost);
      * ``"none"``: the standard run and its stages only.

    pyautoattack reseeds the global torch RNG inside its attacks; ``fork_rng`` gives the caller
    its RNG state back afterwards.
    """
    from pyautoattack import AutoAttack

    device = device or next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    out: dict[str, Any] = {"n": len(x), "eps": epsilon, "version": "standard", "seed": seed}
    with (
        eval_mode(model),
        torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
        _capture_aa_log(verbose) as log,
    ):
        t0 = time.time()
        aa = AutoAttack(model, norm="Linf", eps=epsilon, version="standard", device=device, seed=seed)
        x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=batch_size)
        _check_in_ball(x_adv, x, epsilon)
        out["robust_acc"] = accuracy(model, x_adv, y, batch_size)
        out["clean_acc"] = accuracy(model, x, y, batch_size)
        out["time_s"] = round(time.time() - t0, 2)
        out["stages"] = dict(log.stages)  # free: read from the standard run's own log
        if breakdown == "none":
            return out
        alone = ["square"] if breakdown == "stages" else list(AA_ATTACKS)
        out["alone"] = {}
        standard = aa.attacks_to_run
        try:
            for name in alone:
                # What run_standard_evaluation_individual does, one attack at a time.
                aa.attacks_to_run = [name]
                x_one, _ = aa.run_standard_evaluation(x, y, batch_size=batch_size)
                _check_in_ball(x_one, x, epsilon)
                out["alone"][name] = accuracy(model, x_one, y, batch_size)
        finally:
            aa.attacks_to_run = standard
        if "apgd-ce" in out["stages"]:
            out["alone"].setdefault("apgd-ce", out["stages"]["apgd-ce"])  # first stage == alone
        out["breakdown_time_s"] = round(time.time() - t0 - out["time_s"], 2)
    return out


def _check_in_ball(x_adv: torch.Tensor, x: torch.Tensor, epsilon: float) -> None:
    excess = (x_adv - x).abs().max().item() - epsilon
    if excess > 1e-5 or x_adv.min() < -1e-6 or x_adv.max() > 1 + 1e-6:
        raise RuntimeError(f"adversarial examples leave the eps-ball or [0,1] (excess {excess:.2e})")


def eps_sweep(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps_list: Sequence[float],
    steps: int = 20,
    seed: int = 0,
    batch_size: int = 500,
) -> list[dict[str, float]]:
    """PGD accuracy per epsilon, ``steps`` steps of size 2.5*eps/steps (Madry et al.'s rule)."""
    return [
        {
            "eps": float(e),
            "step_size": 2.5 * e / steps,
            "steps": steps,
            "acc": pgd_accuracy(model, x, y, e, 2.5 * e / steps, steps, seed, batch_size),
        }
        for e in eps_list
    ]


# ----------------------------------------------------------------------------- checks
def sanity_checks(result: dict[str, Any], majority_rate: float, n: int) -> list[str]:
    """Warnings about an evaluation that looks unreliable (empty list: nothing suspicious)."""
    warnings: list[str] = []
    tol = 1.5 / max(n, 1)  # allow one example of noise from the random starts
    pgd = result["pgd"]
    steps = sorted(pgd, key=int)
    for a, b in zip(steps, steps[1:]):
        if pgd[b] > pgd[a] + tol:
            warnings.append(
                f"PGD-{b} accuracy {pgd[b]:.3f} is above PGD-{a} {pgd[a]:.3f}: more steps should "
                "not help the defender (attack not converged, or gradient masking)"
            )
    sweep = result.get("eps_sweep") or []
    for a, b in zip(sweep, sweep[1:]):
        if b["acc"] > a["acc"] + tol:
            warnings.append(
                f"accuracy rises from {a['acc']:.3f} at eps={a['eps']:.4g} to {b['acc']:.3f} at "
                f"eps={b['eps']:.4g}: a larger ball contains the smaller one, so the attack failed"
            )
    big = [s for s in sweep if s["eps"] >= GREY_EPS - 1e-9]
    if big:
        s = big[-1]
        if s["acc"] > majority_rate + 0.05:
            warnings.append(
                f"GRADIENT MASKING SUSPECTED: accuracy {s['acc']:.3f} at eps={s['eps']:.3g}, where the "
                f"all-grey image is in every ball, is well above the majority-class rate "
                f"{majority_rate:.3f}"
            )
    elif sweep:
        warnings.append(
            f"the eps sweep stops at {sweep[-1]['eps']:.3g} < {GREY_EPS}: add {GREY_EPS} to check that "
            "accuracy falls to chance"
        )
    aa = result.get("autoattack")
    alone = (aa or {}).get("alone") or {}
    stages = (aa or {}).get("stages") or {}
    white = [v for k, v in alone.items() if k != "square"]
    if "fab-t" in stages:  # after APGD-CE + APGD-T + FAB-T: the white-box part of AutoAttack
        white.append(stages["fab-t"])
    if "square" in alone and white and alone["square"] < min(white) - tol:
        warnings.append(
            f"GRADIENT MASKING SUSPECTED: black-box Square alone ({alone['square']:.3f}) beats the "
            f"white-box attacks ({min(white):.3f})"
        )
    if "square" in stages and "fab-t" in stages and stages["square"] < stages["fab-t"] - tol:
        warnings.append(
            f"Square found errors on {stages['fab-t'] - stages['square']:.3f} of the points that survived "
            "all white-box attacks: check for gradient masking"
        )
    if aa and pgd:
        worst_pgd = min(pgd.values())
        if aa["robust_acc"] < worst_pgd - 0.05:
            note = ""
            if "apgd-ce" in stages and stages["apgd-ce"] >= worst_pgd - tol:
                note = (
                    f"; APGD-CE alone gives {stages['apgd-ce']:.3f}, so the gap comes from the targeted / "
                    "minimum-norm attacks: the cross-entropy loss is a weak attack objective for this model"
                )
            warnings.append(
                f"AutoAttack ({aa['robust_acc']:.3f}) is more than 5 points below PGD ({worst_pgd:.3f}): "
                f"PGD overestimates robustness{note}"
            )
    return warnings


# ----------------------------------------------------------------------------- figure
# Line styles and markers cycle at different lengths (4 and 7), so no two of the first 28 curves
# look alike; hollow markers shrinking from curve to curve keep coinciding curves visible.
LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def sweep_figure(
    sweeps: dict[str, list[dict[str, float]]],
    title: str = "",
    chance: float | None = None,
    train_eps: float | None = None,
):
    """Robust accuracy vs epsilon, one line per run; returns the matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    outside = len(sweeps) > 4  # many lines: the legend goes right of the axes instead of over the curves
    fig, ax = plt.subplots(figsize=(8 if outside else 5, 3.5))
    for i, (label, sweep) in enumerate(sweeps.items()):
        ax.plot(
            [s["eps"] for s in sweep],
            [100 * s["acc"] for s in sweep],
            label=label,
            ls=LINESTYLES[i % len(LINESTYLES)],
            marker=MARKERS[i % len(MARKERS)],
            markersize=max(9 - i, 4),
            markerfacecolor="none",
            markeredgewidth=1.2,
        )
    if chance is not None:
        ax.axhline(100 * chance, color="grey", ls=":", lw=1, label="majority class")
    if train_eps is not None:
        ax.axvline(train_eps, color="grey", ls="--", lw=1, label="training eps")
    ax.set_xlabel("L-inf epsilon")
    ax.set_ylabel("PGD accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if outside:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    else:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_sweeps(
    sweeps: dict[str, list[dict[str, float]]],
    path: Path,
    title: str = "",
    chance: float | None = None,
    train_eps: float | None = None,
) -> None:
    """``sweep_figure`` saved as a PNG."""
    import matplotlib.pyplot as plt

    fig = sweep_figure(sweeps, title, chance, train_eps)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Evaluate a GOT/TRADES/PGD-AT run directory", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("run_dir", type=str)
    p.add_argument("--weights", choices=["final", "checkpoint"], default="final")
    p.add_argument("--data-dir", type=str, default=None, help="override the run's --data-dir")
    p.add_argument(
        "--test-subset",
        type=int,
        default=None,
        help="test set to draw from: the first N test points, 0 for all (default: the run's --test-subset, "
        "which training may have limited for its per-epoch check)",
    )
    p.add_argument("--n", type=int, default=None, help="test points for clean/PGD/sweep (default: all of the test set)")
    p.add_argument("--epsilon", type=number, default=None, help="default: the run's training epsilon")
    p.add_argument("--step-size", type=number, default=None, help="PGD step (default: the run's step size)")
    p.add_argument("--pgd-steps", type=int, nargs="+", default=[20, 40])
    p.add_argument("--aa-n", type=int, default=500, help="AutoAttack test points (0: skip AutoAttack)")
    p.add_argument(
        "--aa-breakdown",
        choices=["stages", "individual", "none"],
        default="stages",
        help="stages: cumulative accuracy after each attack + Square alone; individual: every "
        "attack alone as well; none: the standard run only (its stages are still recorded)",
    )
    p.add_argument("--aa-batch-size", type=int, default=500)
    p.add_argument("--eps-sweep", type=number, nargs="*", default=None, help="default: per dataset, up to 0.5")
    p.add_argument("--sweep-steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=str, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quiet", action="store_true")
    p.add_argument(
        "--tag",
        type=str,
        default=None,
        help="write eval-TAG.json / eval-TAG.md / eps_sweep-TAG.png, keeping earlier evaluations",
    )
    return p


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    if args.tag is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", args.tag):
        raise ValueError(f"--tag must be letters, digits, '_', '.' or '-' (it names files); got {args.tag!r}")
    device = pick_device(args.device)
    run_dir = Path(args.run_dir)
    model, cfg = load_run(run_dir, device, args.weights)
    x, y = load_test_set(cfg, args.n, args.data_dir, args.test_subset)
    eps = cfg["epsilon"] if args.epsilon is None else args.epsilon
    step = cfg["step_size"] if args.step_size is None else args.step_size
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    t0 = time.time()

    result: dict[str, Any] = {
        "run": str(run_dir),
        "dataset": cfg["dataset"],
        "model": cfg["model"],
        "method": method_name(cfg),
        "epsilon": eps,
        "pgd_step_size": step,
        "n": len(x),
        "seed": args.seed,
    }
    result["clean_acc"] = pgd_accuracy(model, x, y, 0.0, 0.0, 0, args.seed, args.batch_size, device)
    result["pgd"] = {}
    for k in args.pgd_steps:
        result["pgd"][str(k)] = pgd_accuracy(model, x, y, eps, step, k, args.seed, args.batch_size, device)
        say(f"{result['method']}: PGD-{k} accuracy {result['pgd'][str(k)]:.4f}")
    if args.aa_n > 0:
        n_aa = min(args.aa_n, len(x))
        result["autoattack"] = autoattack(
            model,
            x[:n_aa],
            y[:n_aa],
            eps,
            args.aa_batch_size,
            args.seed,
            args.aa_breakdown,
            device,
            verbose=not args.quiet,
        )
        say(
            f"{result['method']}: AutoAttack accuracy {result['autoattack']['robust_acc']:.4f} "
            f"({result['autoattack']['time_s']} s)"
        )
    sweep_eps = DEFAULT_SWEEPS[cfg["dataset"]] if args.eps_sweep is None else args.eps_sweep
    result["eps_sweep"] = eps_sweep(model, x, y, sorted(sweep_eps), args.sweep_steps, args.seed, args.batch_size)
    majority = torch.bincount(y).max().item() / len(y)
    result["majority_rate"] = majority
    result["warnings"] = sanity_checks(result, majority, len(x))
    result["time_s"] = round(time.time() - t0, 2)

    suffix = f"-{args.tag}" if args.tag else ""
    write_json(run_dir / f"eval{suffix}.json", result)
    atomic_write_bytes(run_dir / f"eval{suffix}.md", eval_report(result).encode())
    if result["eps_sweep"]:
        plot_sweeps(
            {result["method"]: result["eps_sweep"]},
            run_dir / f"eps_sweep{suffix}.png",
            title=f"{cfg['dataset']}: {result['method']}",
            chance=majority,
            train_eps=cfg["epsilon"],
        )
    for w in result["warnings"]:
        say(f"WARNING: {w}")
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    # pyautoattack logs its progress at DEBUG level on "auto-attack"; keep it quiet unless asked.
    with num_threads(args.threads):
        return evaluate(args)


if __name__ == "__main__":
    main()
