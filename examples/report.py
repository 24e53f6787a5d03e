"""Markdown tables over run directories and their ``eval*.json`` -- the one table writer.

``evaluate.py`` (``eval.md``), ``main.py`` (``summary.md``) and the studies' summaries
(``studies/mnist_1epoch/``) build their tables from these functions:

* ``read_run``: a run directory's ``config.json``, every ``eval*.json`` and its last metrics row;
* ``method_name`` / ``variant`` / ``run_label``: what a run is, from its config;
* ``pct`` / ``num`` / ``mean_std``: the number formats (accuracies are stored as fractions);
* ``table``: a markdown table from a header and rows of cells;
* ``eval_report`` (one evaluation) and ``comparison_table`` (several methods side by side).
"""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .models import default_layer

# GOT as the paper sets it up: a run's ``variant`` names what differs from it.  Configs written before a
# flag existed lack its key and ran the paper's form.
GOT_DEFAULTS = {
    "got_theta": 0.1,
    "got_lam": 1.0,
    "got_solver": "sinkhorn",
    "got_anchor": "none",
    "got_debias": False,
    "got_dual_input": "raw",
}


# ----------------------------------------------------------------------------- reading
def read_run(run_dir: Path) -> dict[str, Any]:
    """``{"run", "config", "evals", "last"}`` of a run directory.

    ``evals`` maps a tag to the parsed ``eval-TAG.json`` (``""`` for ``eval.json``; see
    ``evaluate.py --tag``); ``last`` is the last row of ``metrics.csv`` as strings (``{}`` if none).
    """
    run_dir = Path(run_dir)
    evals = {}
    for path in sorted(run_dir.glob("eval*.json")):
        if path.stem == "eval" or path.stem.startswith("eval-"):
            evals[path.stem[len("eval-") :]] = json.loads(path.read_text())
    last: dict[str, str] = {}
    if (run_dir / "metrics.csv").exists():
        with open(run_dir / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        last = rows[-1] if rows else {}
    return {
        "run": run_dir.name,
        "config": json.loads((run_dir / "config.json").read_text()),
        "evals": evals,
        "last": last,
    }


def last_metric(record: dict[str, Any], key: str) -> float | None:
    """A number of the run's last metrics row, ``None`` where it was not logged (e.g. GOT's for the baseline)."""
    value = record["last"].get(key)
    return float(value) if value else None


# ----------------------------------------------------------------------------- naming
def method_name(cfg: dict[str, Any]) -> str:
    """TRADES, PGD-AT, GOT-TRADES-LM, GOT-PGD-S, ... from a run's config."""
    base = {"trades": "TRADES", "pgd": "PGD-AT"}.get(cfg.get("loss", ""), cfg.get("loss", "?"))
    got = cfg.get("got", "none")
    return base if got == "none" else f"GOT-{base.replace('-AT', '')}-{got.upper()}"


def variant(cfg: dict[str, Any]) -> str:
    """β always, and what differs from the paper's GOT (θ, λ, layer, solver, anchor, debiasing, the dual's
    input); the run a fine-tuning started from."""
    bits = []
    if cfg.get("got", "none") != "none":
        bits.append(f"β = {cfg['got_beta']:g}")
        if cfg["got_theta"] != GOT_DEFAULTS["got_theta"]:
            bits.append(f"θ = {cfg['got_theta']:g}")
        if cfg["got_lam"] != GOT_DEFAULTS["got_lam"]:
            bits.append(f"λ = {cfg['got_lam']:g}")
        if cfg["got_layer"] != default_layer(cfg["model"]):
            bits.append(f"layer {cfg['got_layer']}")
        if cfg["got_solver"] != GOT_DEFAULTS["got_solver"]:
            bits.append(cfg["got_solver"])
            if cfg.get("got_dual_input", "raw") != GOT_DEFAULTS["got_dual_input"]:
                bits.append(f"on {cfg['got_dual_input']} features")
        if cfg.get("got_anchor", "none") != GOT_DEFAULTS["got_anchor"]:
            bits.append(f"anchor {cfg['got_anchor']}")
        if cfg.get("got_debias", False):
            bits.append("debiased")
    if cfg.get("init_weights"):
        bits.append(f"fine-tuned from {Path(cfg['init_weights']).parent.name}")
    return ", ".join(bits)


def run_label(cfg: dict[str, Any]) -> str:
    """``method_name (variant)``, e.g. ``GOT-TRADES-LM (β = 1, dual)``."""
    v = variant(cfg)
    return f"{method_name(cfg)} ({v})" if v else method_name(cfg)


# ----------------------------------------------------------------------------- numbers and tables
def pct(fraction: float | None, missing: str = "-") -> str:
    """An accuracy stored as a fraction, in % with one decimal."""
    return missing if fraction is None else f"{100 * fraction:.1f}"


def num(value: float | None, missing: str = "—") -> str:
    """A number already in %, with one decimal."""
    return missing if value is None else f"{value:.1f}"


def mean_std(values: Sequence[float], missing: str = "—") -> str:
    """``mean ± sample std`` with one decimal; a single value alone."""
    if not values:
        return missing
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table (no trailing newline)."""
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- evaluation reports
def eval_report(result: dict[str, Any]) -> str:
    """``eval.md``: one evaluation of ``evaluate.py`` (the dict it writes to ``eval.json``)."""
    r = result
    rows: list[list[str]] = [["clean", pct(r["clean_acc"])]]
    rows += [[f"PGD-{k}", pct(v)] for k, v in sorted(r["pgd"].items(), key=lambda kv: int(kv[0]))]
    aa = r.get("autoattack")
    if aa:
        rows.append([f"AutoAttack (standard, first {aa['n']} points)", pct(aa["robust_acc"])])
        previous: list[str] = []
        for name, v in (aa.get("stages") or {}).items():
            previous.append(name)
            rows.append([f"&nbsp;&nbsp; after {' + '.join(previous)} (cumulative)", pct(v)])
        for name, v in (aa.get("alone") or {}).items():
            kind = "black-box" if name == "square" else "white-box"
            rows.append([f"&nbsp;&nbsp; {name} alone ({kind})", pct(v)])
    lines = [
        f"# Evaluation of `{r['run']}`",
        "",
        f"{r['dataset']}, {r['model']}, {r['method']}; eps = {r['epsilon']:.4g}, "
        f"PGD step {r['pgd_step_size']:.4g}; {r['n']} test points.",
        "",
        table(["metric", "accuracy (%)"], rows),
    ]
    if r.get("eps_sweep"):
        lines += [
            "",
            "## Epsilon sweep (PGD, random start)",
            "",
            table(
                ["eps", "steps", "step size", "accuracy (%)"],
                [[f"{s['eps']:.4g}", s["steps"], f"{s['step_size']:.4g}", pct(s["acc"])] for s in r["eps_sweep"]],
            ),
        ]
    lines += ["", "## Sanity checks", ""]
    lines += [f"- WARNING: {w}" for w in r["warnings"]] or [
        "- none triggered (accuracy does not rise with more PGD steps or larger eps, reaches the majority-class "
        "rate at eps >= 0.5, Square does not beat the white-box attacks)"
    ]
    return "\n".join(lines) + "\n"


def comparison_table(evals: dict[str, dict[str, Any]]) -> str:
    """Methods side by side (``main.py``'s summary): clean, PGD-20/40, AutoAttack, Square alone."""
    rows = []
    for e in evals.values():
        aa = e.get("autoattack") or {}
        square = (aa.get("alone") or {}).get("square")
        rows.append(
            [
                e["method"],
                pct(e["clean_acc"]),
                pct(e["pgd"]["20"]),
                pct(e["pgd"].get("40")),
                f"{pct(aa['robust_acc'])} (n={aa['n']})" if aa else "-",
                pct(square),
            ]
        )
    return table(["method", "clean", "PGD-20", "PGD-40", "AutoAttack", "AA: Square alone"], rows)
