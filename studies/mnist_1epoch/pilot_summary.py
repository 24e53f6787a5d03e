"""Summarise the runs of pilot.sh (this folder) into <runs>/summary.md (and print it).

    .venv/bin/python -m studies.mnist_1epoch.pilot_summary runs/mnist_pilot

Reads each run directory's config.json, metrics.csv and eval.json (``examples.evaluate``); runs that
have not been evaluated yet are listed as missing.  The committed copy is ``results/pilot_summary.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from examples.report import last_metric, mean_std, pct, read_run, run_label, table

from .tables import PAPER


def pilot_row(record: dict[str, Any]) -> dict[str, Any]:
    cfg, ev = record["config"], record["evals"][""]
    aa = ev.get("autoattack") or {}
    sweep = {round(r["eps"], 3): r["acc"] for r in ev["eps_sweep"]}
    return dict(
        run=record["run"],
        method=run_label(cfg),
        seed=cfg["seed"],
        clean=ev["clean_acc"],
        pgd10=ev["pgd"].get("10"),
        pgd40=ev["pgd"].get("40"),
        pgd100=ev["pgd"].get("100"),
        aa=aa.get("robust_acc"),
        aa_n=aa.get("n"),
        square=(aa.get("alone") or {}).get("square"),
        s03=sweep.get(0.3),
        s04=sweep.get(0.4),
        s05=sweep.get(0.5),
        warnings=ev.get("warnings", []),
        same_label=last_metric(record, "got_same_label_mass"),
        epoch_s=last_metric(record, "epoch_time_s"),
    )


def summary(rows: list[dict[str, Any]], missing: list[str]) -> str:
    def p(x):
        return pct(x, missing="")

    per_run = table(
        [
            "run",
            "method",
            "seed",
            "clean",
            "PGD-10",
            "PGD-40",
            "PGD-100",
            "AutoAttack",
            "Square alone",
            "sweep ε=0.3 / 0.4 / 0.5",
            "same-label mass",
            "epoch s",
        ],
        [
            [
                r["run"],
                r["method"],
                r["seed"],
                p(r["clean"]),
                p(r["pgd10"]),
                p(r["pgd40"]),
                p(r["pgd100"]),
                p(r["aa"]),
                p(r["square"]),
                f"{p(r['s03'])} / {p(r['s04'])} / {p(r['s05'])}",
                "" if r["same_label"] is None else f"{r['same_label']:.3f}",
                f"{r['epoch_s']:.0f}",
            ]
            for r in rows
        ],
    )
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["method"], []).append(r)
    means = []
    for m, rs in by.items():
        if len(rs) < 2:
            continue

        def ms(k, rs=rs):
            v = [100 * r[k] for r in rs if r[k] is not None]
            return mean_std(v) if len(v) > 1 else ""

        paper = PAPER.get(m.split(" (")[0], ("", ""))
        means.append([m, ", ".join(str(r["seed"]) for r in rs), ms("clean"), ms("pgd40"), ms("aa"), paper[0], paper[1]])
    warn = [f"- {r['run']}: {w}" for r in rows for w in r["warnings"]]
    lines = [
        "# MNIST pilot (issue #5): reduced schedule, not the study\n",
        "SmallCNN on real MNIST; 1 epoch of training (469 steps of 128) with a 10-step attack of step 0.04 at "
        "ε = 0.3 (the paper: 100 epochs, 40 steps of 0.01). Test: the first 1000 test points for clean, PGD "
        "(step 0.01, random start) and the ε sweep (20 steps); AutoAttack standard (pyautoattack) on the first "
        f"{rows[0]['aa_n'] if rows else '?'}. Accuracies in %.\n",
        per_run,
        "",
        "Mean ± std over seeds (methods with more than one seed), beside the paper's Table 1 (100 epochs):\n",
        table(["method", "seeds", "clean", "PGD-40", "AutoAttack", "paper PGD-40", "paper AA"], means),
        "",
        "Sanity-check warnings from evaluate.py:" if warn else "No sanity-check warnings from evaluate.py.",
        *warn,
    ]
    if missing:
        lines += ["", f"Not evaluated (yet): {', '.join(missing)}"]
    return "\n".join(lines) + "\n"


def main(runs: str = "runs/mnist_pilot", out: str = "") -> str:
    runs_dir = Path(runs)
    rows, missing = [], []
    for run in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        if not (run / "eval.json").exists():
            missing.append(run.name)
            continue
        rows.append(pilot_row(read_run(run)))
    text = summary(rows, missing)
    (Path(out) if out else runs_dir / "summary.md").write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main(*sys.argv[1:])
