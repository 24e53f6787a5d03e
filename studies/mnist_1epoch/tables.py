"""The study's tables, sweep plot and committed models, from its run directories (``examples.report`` formats).

    .venv/bin/python -m studies.mnist_1epoch.tables runs/mnist_pilot       # collect: runs -> results/ here
    .venv/bin/python -m studies.mnist_1epoch.tables                        # re-render from results/ here

Collecting reads each run's config.json, metrics.csv, eval.json (first 1000 test points: PGD-10/40/100,
eps sweep, AutoAttack on 100 with Square alone), eval-test10k.json (all 10 000 test points: clean and
PGD-40) and eval-aa1000.json (AutoAttack standard on the first 1000 with its stages), as written by
pilot.sh, full_eval.sh and ablations.sh (this folder).  It writes ``results/summary.json`` (one row of
numbers per run), ``results/tables.md`` (also between the markers of ``RESULTS.md`` here),
``results/eps_sweep.png``, and for the study's models (STUDY + FINE_TUNE)
``results/<run>/{model_final.pt, config.json, eval*.json, metrics.csv}``: the weights load with
``torch.load(weights_only=True)`` into ``examples.models.build_model(config["model"], 10, 1, 28)``.

Without a runs directory the tables are re-rendered from the committed ``results/summary.json``,
which holds the rows of every run, including the ablations whose models are not committed, and the
sweep plot from the committed models' ``eval.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path
from typing import Any

from examples.evaluate import plot_sweeps
from examples.report import last_metric, mean_std, method_name, num, read_run, table, variant

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# The GOT paper (Bui et al.), Table 1, MNIST after 100 epochs: (PGD-40, AutoAttack) accuracy in %.
# The one copy in the repository; pilot_summary.py and RESULTS.md take it from here.
PAPER = {
    "TRADES": (96.55, 89.4),
    "GOT-TRADES-LM": (97.79, 94.15),
    "PGD-AT": (95.63, 91.07),
    "GOT-PGD-LM": (97.2, 93.91),
}
STUDY = [
    "trades-s0",
    "trades-s1",
    "trades-s2",
    "got-trades-lm-s0",
    "got-trades-lm-s1",
    "got-trades-lm-s2",
    "pgd-at-s0",
    "got-pgd-lm-s0",
    "got-trades-s-s0",
    "got-trades-lm-dual-s0",
    "got-trades-lm-b10-s0",
]
MAIN = STUDY[:-1]  # the beta = 10 collapse is an ablation: evaluated like the pilot only
FINE_TUNE = [f"ft-{m}-s{s}" for s in range(3) for m in ("trades", "got-trades-lm")]
ABLATIONS = [
    "ft-got-trades-lm-b10-s0",
    "got-trades-lm-b0.1-s0",
    "got-trades-lm-s0",
    "got-trades-lm-b10-s0",
    "got-trades-lm-theta1-s0",
    "got-trades-lm-lam10-s0",
    "got-trades-lm-conv-s0",
    "got-trades-lm-dual-s0",
    "got-trades-s-s0",
    "trades-s0",
]
TOL = 1.5  # points: one example of noise on the 100-point AutoAttack subset, as evaluate.py's checks
f1 = num


def study_row(record: dict[str, Any]) -> dict[str, Any]:
    """The numbers of one run the tables use, in % (``read_run``'s record of a run directory)."""
    cfg, evals = record["config"], record["evals"]
    ev = evals[""]
    aa = ev.get("autoattack") or {}
    r: dict[str, Any] = dict(
        run=record["run"],
        method=method_name(cfg),
        variant=variant(cfg),
        seed=cfg["seed"],
        majority=100 * ev["majority_rate"],
        clean1k=100 * ev["clean_acc"],
        pgd10=100 * ev["pgd"]["10"],
        pgd40_1k=100 * ev["pgd"]["40"],
        pgd100=100 * ev["pgd"]["100"],
        aa100=100 * aa["robust_acc"],
        square100=100 * aa["alone"]["square"] if "square" in aa.get("alone", {}) else None,
        stages100={k: 100 * v for k, v in aa["stages"].items()},
        sweep={round(s["eps"], 3): 100 * s["acc"] for s in ev["eps_sweep"]},
        sweep_raw=ev["eps_sweep"],
        same_label=last_metric(record, "got_same_label_mass"),
        got_value=last_metric(record, "got_value"),
        epoch_s=last_metric(record, "epoch_time_s"),
        train_acc=100 * last_metric(record, "train_acc"),
    )
    if "test10k" in evals:
        t10k = evals["test10k"]
        r.update(clean=100 * t10k["clean_acc"], pgd40=100 * t10k["pgd"]["40"], n_full=t10k["n"])
    if "aa1000" in evals:
        aa1k = evals["aa1000"]
        fa = aa1k["autoattack"]
        r.update(
            aa=100 * fa["robust_acc"],
            aa_n=fa["n"],
            stages={k: 100 * v for k, v in fa.get("stages", {}).items()},
            aa_time=fa["time_s"],
            clean_aa1k=100 * aa1k["clean_acc"],
            pgd40_aa1k=100 * aa1k["pgd"]["40"],
        )
    return r


def rows_from_summary(path: Path = RESULTS / "summary.json") -> dict[str, dict[str, Any]]:
    """The rows ``collect`` saved (JSON turned the sweep's float keys into strings; they are turned back)."""
    rows = json.loads(Path(path).read_text())
    for r in rows.values():
        r["sweep"] = {float(k): v for k, v in r["sweep"].items()}
    return rows


def sanity(r: dict[str, Any]) -> list[str]:
    """The three checks of issue #5, as 'ok (numbers)' or 'FLAG (numbers)'."""
    s05 = r["sweep"].get(0.5)
    white = min([r["stages100"].get("fab-t", 100.0), r["stages100"].get("apgd-ce", 100.0)])
    extra = {}  # % of points Square broke after the white-box stages (information; evaluate.py warns on them)
    for key, n in (("stages100", 100), ("stages", 1000)):
        st = r.get(key) or {}
        if "fab-t" in st and "square" in st:
            extra[n] = max(st["fab-t"] - st["square"], 0.0)
    after = (
        (
            "Square's extra errors after white-box: "
            + " / ".join(f"{v:.1f}" for v in extra.values())
            + f" at n = {' / '.join(str(n) for n in extra)}"
        )
        if extra
        else ""
    )
    if r["square100"] is None:
        square = "— (not run alone); " + after
    else:
        square = (
            ("ok" if r["square100"] >= white - TOL else "FLAG") + f" (alone {f1(r['square100'])} vs white-box "
            f"{f1(white)}, n = 100" + (f"; {after}" if after else "") + ")"
        )
    return [
        ("ok" if s05 is not None and s05 <= r["majority"] + 5 else "FLAG") + f" ({f1(s05)} at ε = 0.5)",
        square,
        ("ok" if r["pgd100"] <= r["pgd40_1k"] + 0.15 and r["pgd40_1k"] <= r["pgd10"] + 0.15 else "FLAG")
        + f" (PGD-10/40/100: {f1(r['pgd10'])} / {f1(r['pgd40_1k'])} / {f1(r['pgd100'])})",
    ]


def main_table(rows: dict[str, dict[str, Any]]) -> list[str]:
    """Full test set and AutoAttack n = 1000, mean ± std per method, beside the paper; then paired differences."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in (rows[n] for n in MAIN if n in rows):
        groups.setdefault((r["method"], r["variant"]), []).append(r)
    cells = []
    for (m, v), rs in groups.items():
        full = [r for r in rs if "pgd40" in r]
        paper = PAPER.get(m, ("", "")) if v in ("", "β = 1") else ("", "")
        seeds = ", ".join(str(r["seed"]) for r in (full or rs))
        if full:
            aa = (
                mean_std([r["aa"] for r in full])
                if all("aa" in r for r in full)
                else f"{mean_std([r['aa100'] for r in full])} (first 100 only)"
            )
            cells.append(
                [
                    m,
                    v,
                    seeds,
                    mean_std([r["clean"] for r in full]),
                    mean_std([r["pgd40"] for r in full]),
                    aa,
                    paper[0],
                    paper[1],
                ]
            )
        else:
            cells.append([m, v, seeds, "not evaluated on the full test set", "", "", paper[0], paper[1]])
    lines = [
        "### Main comparison (full test set; AutoAttack standard on the first 1000 test points)\n",
        table(["method", "variant", "seeds", "clean", "PGD-40", "AutoAttack", "paper PGD-40", "paper AA"], cells),
    ]
    pairs = [(rows.get(f"trades-s{s}"), rows.get(f"got-trades-lm-s{s}")) for s in range(3)]
    pairs = [(a, b) for a, b in pairs if a and b and all(k in r for r in (a, b) for k in ("pgd40", "aa"))]
    if pairs:
        lines += [
            "",
            "GOT-TRADES-LM − TRADES, seed by seed (points): "
            + "; ".join(
                f"seed {a['seed']}: clean {b['clean'] - a['clean']:+.1f}, PGD-40 "
                f"{b['pgd40'] - a['pgd40']:+.1f}, AA {b['aa'] - a['aa']:+.1f}"
                for a, b in pairs
            )
            + (
                f". Mean PGD-40 {mean_std([b['pgd40'] - a['pgd40'] for a, b in pairs])}, "
                f"AA {mean_std([b['aa'] - a['aa'] for a, b in pairs])}."
                if len(pairs) > 1
                else "."
            ),
        ]
    return lines


def every_model_table(study: list[dict[str, Any]]) -> list[str]:
    cells = []
    for r in study:
        st = r.get("stages") or {}
        stages = " → ".join(f1(st.get(k)) for k in ("apgd-ce", "apgd-t", "fab-t", "square")) if st else "—"
        cells.append(
            [
                r["run"],
                r["method"],
                r["variant"],
                f1(r.get("clean")),
                f1(r.get("pgd40")),
                stages,
                f"{f1(r['pgd10'])} / {f1(r['pgd40_1k'])} / {f1(r['pgd100'])}",
                f"{f1(r['sweep'].get(0.3))} / {f1(r['sweep'].get(0.4))} / {f1(r['sweep'].get(0.5))}",
                "" if r["same_label"] is None else f"{r['same_label']:.2f}",
            ]
        )
    return [
        "",
        "### Every model\n",
        "Full test set (n = 10 000): clean, PGD-40. AutoAttack (first 1000): the accuracy after each stage, "
        "APGD-CE → +APGD-T → +FAB-T → +Square. First 1000 test points: PGD-10 / 40 / 100 and the ε sweep (20 "
        "steps of 2.5ε/20). Same-label mass: the share of the transport plan between same-label pairs, averaged "
        "over training.\n",
        table(
            [
                "run",
                "method",
                "variant",
                "clean",
                "PGD-40",
                "AA stages (n = 1000)",
                "PGD-10 / 40 / 100 (n = 1000)",
                "sweep ε = 0.3 / 0.4 / 0.5",
                "same-label mass",
            ],
            cells,
        ),
    ]


def sanity_table(rows: dict[str, dict[str, Any]], study: list[dict[str, Any]]) -> list[str]:
    checked = study + [rows[n] for n in FINE_TUNE + ABLATIONS if n in rows and n not in STUDY]
    return [
        "",
        "### Sanity checks\n",
        "Majority-class rate of the first 1000 test points: "
        f"{f1(study[0]['majority']) if study else '—'}%. Columns: accuracy at ε = 0.5 within 5 points of it; "
        "black-box Square alone not below the white-box attacks; more PGD steps never more accurate.\n",
        table(
            ["run", "ε = 0.5 → chance", "Square (black-box) vs white-box", "PGD steps"],
            [[r["run"], *sanity(r)] for r in checked],
        ),
    ]


def fine_tuning_table(rows: dict[str, dict[str, Any]]) -> list[str]:
    ft = [(rows.get(f"ft-trades-s{s}"), rows.get(f"ft-got-trades-lm-s{s}")) for s in range(3)]
    ft = [(a, b) for a, b in ft if a and b]
    if not ft:
        return []

    def four(r):
        return f"{f1(r['clean1k'])} / {f1(r['pgd40_1k'])} / {f1(r['pgd100'])} / {f1(r['aa100'])}"

    cells = []
    for a, b in ft:
        s0 = rows.get(f"trades-s{a['seed']}")
        start = f"{f1(s0['clean1k'])} / {f1(s0['pgd40_1k'])} / {f1(s0['aa100'])}" if s0 else "—"
        cells.append([a["seed"], start, four(a), four(b)])
    if len(ft) > 1:

        def means(side):
            return " / ".join(
                mean_std([pair[side][k] for pair in ft]) for k in ("clean1k", "pgd40_1k", "pgd100", "aa100")
            )

        cells.append(["mean ± std", "", means(0), means(1)])
    lines = [
        "",
        "### Fine-tuning a TRADES model for one more epoch, with and without GOT-LM (β = 1)\n",
        "First 1000 test points; AutoAttack on the first 100.\n",
        table(
            [
                "seed",
                "start (TRADES, 1 epoch) clean / PGD-40 / AA",
                "+ TRADES epoch: clean / PGD-40 / PGD-100 / AA",
                "+ GOT-TRADES-LM epoch: clean / PGD-40 / PGD-100 / AA",
            ],
            cells,
        ),
    ]
    if len(ft) > 1:
        lines.append(
            f"\nGOT − TRADES, paired by seed: PGD-40 {mean_std([b['pgd40_1k'] - a['pgd40_1k'] for a, b in ft])}, "
            f"PGD-100 {mean_std([b['pgd100'] - a['pgd100'] for a, b in ft])}, AA (n = 100) "
            f"{mean_std([b['aa100'] - a['aa100'] for a, b in ft])} points."
        )
    full = [(a, b) for a, b in ft if "pgd40" in a and "pgd40" in b]
    if full:
        lines.append(
            "\nOn the full test set (n = 10 000), clean / PGD-40: "
            + "; ".join(
                f"seed {a['seed']}: + TRADES {f1(a['clean'])} / {f1(a['pgd40'])}, + GOT-TRADES-LM "
                f"{f1(b['clean'])} / {f1(b['pgd40'])}"
                for a, b in full
            )
            + "."
        )
    return lines


def ablation_table(rows: dict[str, dict[str, Any]]) -> list[str]:
    ab = [rows[n] for n in ABLATIONS if n in rows]
    if not ab:
        return []
    cells = [
        [
            r["run"],
            r["method"],
            r["variant"],
            f1(r["clean1k"]),
            f1(r["pgd40_1k"]),
            f1(r["pgd100"]),
            f1(r["aa100"]),
            "" if r["got_value"] is None else f"{r['got_value']:.3f}",
            "" if r["same_label"] is None else f"{r['same_label']:.2f}",
            f1(r["train_acc"]),
        ]
        for r in ab
    ]
    return [
        "",
        "### Ablations (seed 0; first 1000 test points, AutoAttack on the first 100)\n",
        table(
            [
                "run",
                "method",
                "variant",
                "clean",
                "PGD-40",
                "PGD-100",
                "AA",
                "W (last epoch mean)",
                "same-label mass",
                "train acc",
            ],
            cells,
        ),
    ]


def tables(rows: dict[str, dict[str, Any]], diagnostics: str | None = None) -> str:
    """``tables.md``: every table of the study from its rows (``study_row``), and the diagnostics table."""
    study = [rows[n] for n in STUDY if n in rows]
    lines = (
        main_table(rows)
        + every_model_table(study)
        + sanity_table(rows, study)
        + fine_tuning_table(rows)
        + ablation_table(rows)
    )
    text = "\n".join(lines) + "\n"
    if diagnostics is not None:  # written by diagnostics.py here
        text += (
            "\n### What the GOT term does in a TRADES step (diagnostics.py; 8 training batches of 128, "
            "train mode, TRADES's attack)\n\n" + diagnostics
        )
    return text


BEGIN, END = "<!-- tables: studies/mnist_1epoch/tables.py -->", "<!-- end of tables -->"


def write_tables(rows: dict[str, dict[str, Any]], out: Path = RESULTS, results_md: Path = HERE / "RESULTS.md") -> str:
    """``out/tables.md``, and the same text between the markers of ``results_md`` (never hand-copied)."""
    diag = out / "diagnostics.md"
    text = tables(rows, diag.read_text() if diag.exists() else None)
    (out / "tables.md").write_text(text)
    md = Path(results_md)
    if md.exists() and BEGIN in md.read_text():
        head, rest = md.read_text().split(BEGIN, 1)
        md.write_text(f"{head}{BEGIN}\n{text}{END}{rest.split(END, 1)[1]}")
    return text


def plot_study_sweeps(rows: dict[str, dict[str, Any]], path: Path) -> None:
    """One eps-sweep line per method (mean over seeds), first 1000 test points."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in (rows[n] for n in STUDY if n in rows):
        by.setdefault(f"{r['method']} ({r['variant']})" if r["variant"] else r["method"], []).append(r)
    sweeps = {
        label + (f", {len(rs)} seeds" if len(rs) > 1 else ""): [
            {"eps": pt["eps"], "acc": statistics.mean(r["sweep_raw"][i]["acc"] for r in rs)}
            for i, pt in enumerate(rs[0]["sweep_raw"])
        ]
        for label, rs in by.items()
    }
    if sweeps:
        majority = rows[STUDY[0]]["majority"] / 100 if STUDY[0] in rows else None
        plot_sweeps(
            sweeps, path, title="MNIST, SmallCNN, 1 epoch: PGD-20 accuracy vs ε", chance=majority, train_eps=0.3
        )


def collect(runs: Path, out: Path = RESULTS, results_md: Path = HERE / "RESULTS.md") -> str:
    """Rows from the run directories -> summary.json, tables, sweep plot, and the committed models."""
    out.mkdir(parents=True, exist_ok=True)
    rows = {p.name: study_row(read_run(p)) for p in sorted(runs.iterdir()) if p.is_dir() and (p / "eval.json").exists()}
    text = write_tables(rows, out, results_md)
    (out / "summary.json").write_text(
        json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "sweep_raw"} for k, v in rows.items()}, indent=1)
    )
    plot_study_sweeps(rows, out / "eps_sweep.png")
    for n in STUDY + FINE_TUNE:
        if n not in rows:
            continue
        (out / n).mkdir(exist_ok=True)
        for f in ("model_final.pt", "config.json", "eval.json", "eval-test10k.json", "eval-aa1000.json", "metrics.csv"):
            if (runs / n / f).exists():
                shutil.copy2(runs / n / f, out / n / f)
    return text


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "runs",
        nargs="?",
        type=Path,
        default=None,
        help="run directories of pilot.sh / ablations.sh (default: re-render from results/summary.json)",
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--results-md", type=Path, default=HERE / "RESULTS.md")
    args = p.parse_args(argv)
    if args.runs is not None:
        text = collect(args.runs, args.out, args.results_md)
    else:
        rows = rows_from_summary(args.out / "summary.json")
        text = write_tables(rows, args.out, args.results_md)
        for name, r in rows.items():  # the committed models keep their eval.json: enough for the sweep plot
            if (args.out / name / "eval.json").exists():
                r["sweep_raw"] = json.loads((args.out / name / "eval.json").read_text())["eps_sweep"]
        if all("sweep_raw" in rows[n] for n in STUDY if n in rows):
            plot_study_sweeps(rows, args.out / "eps_sweep.png")
    print(text)
    return text


if __name__ == "__main__":
    main()
