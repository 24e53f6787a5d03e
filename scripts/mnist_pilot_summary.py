"""Summarise the runs of scripts/mnist_pilot.sh into <out>/summary.md (and print it).

    .venv/bin/python scripts/mnist_pilot_summary.py runs/mnist_pilot

Reads each run directory's config.json, metrics.csv and eval.json (examples/evaluate.py); runs that
have not been evaluated yet are listed as missing.
"""
import csv
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from evaluate import method_name  # noqa: E402

PAPER = {"TRADES": (96.55, 89.4), "GOT-TRADES-LM": (97.79, 94.15), "PGD-AT": (95.63, 91.07), "GOT-PGD-LM": (97.2, 93.91)}


def label(cfg):
    name = method_name(cfg)
    if cfg["got"] == "none":
        return name
    extras = [f"β = {cfg['got_beta']:g}"] + (["dual"] if cfg["got_solver"] == "dual" else [])
    return f"{name} ({', '.join(extras)})"


def pct(x):
    return "" if x is None else f"{100 * x:.1f}"


def main(out):
    out = Path(out)
    rows, missing = [], []
    for run in sorted(p for p in out.iterdir() if p.is_dir()):
        if not (run / "eval.json").exists():
            missing.append(run.name)
            continue
        cfg = json.loads((run / "config.json").read_text())
        ev = json.loads((run / "eval.json").read_text())
        with open(run / "metrics.csv") as f:
            last = list(csv.DictReader(f))[-1]
        aa = ev.get("autoattack") or {}
        sweep = {round(r["eps"], 3): r["acc"] for r in ev["eps_sweep"]}
        rows.append(dict(run=run.name, method=label(cfg), seed=cfg["seed"], clean=ev["clean_acc"],
                         pgd10=ev["pgd"].get("10"), pgd40=ev["pgd"].get("40"), pgd100=ev["pgd"].get("100"),
                         aa=aa.get("robust_acc"), aa_n=aa.get("n"), square=(aa.get("alone") or {}).get("square"),
                         s03=sweep.get(0.3), s04=sweep.get(0.4), s05=sweep.get(0.5), warnings=ev.get("warnings", []),
                         same_label=float(last["got_same_label_mass"]) if last.get("got_same_label_mass") else None,
                         epoch_s=float(last["epoch_time_s"])))
    L = ["# MNIST pilot (issue #5): reduced schedule, not the study\n",
         "SmallCNN on real MNIST; 1 epoch of training (469 steps of 128) with a 10-step attack of step 0.04 at "
         "ε = 0.3 (the paper: 100 epochs, 40 steps of 0.01). Test: the first 1000 test points for clean, PGD "
         "(step 0.01, random start) and the ε sweep (20 steps); AutoAttack standard (pyautoattack) on the first "
         f"{rows[0]['aa_n'] if rows else '?'}. Accuracies in %.\n",
         "| run | method | seed | clean | PGD-10 | PGD-40 | PGD-100 | AutoAttack | Square alone | sweep ε=0.3 / 0.4 / 0.5 "
         "| same-label mass | epoch s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sl = "" if r["same_label"] is None else f"{r['same_label']:.3f}"
        L.append(f"| {r['run']} | {r['method']} | {r['seed']} | {pct(r['clean'])} | {pct(r['pgd10'])} | {pct(r['pgd40'])} | "
                 f"{pct(r['pgd100'])} | {pct(r['aa'])} | {pct(r['square'])} | {pct(r['s03'])} / {pct(r['s04'])} / "
                 f"{pct(r['s05'])} | {sl} | {r['epoch_s']:.0f} |")
    L += ["", "Mean ± std over seeds (methods with more than one seed), beside the paper's Table 1 (100 epochs):\n",
          "| method | seeds | clean | PGD-40 | AutoAttack | paper PGD-40 | paper AA |", "|---|---|---|---|---|---|---|"]
    by = {}
    for r in rows:
        by.setdefault(r["method"], []).append(r)
    for m, rs in by.items():
        if len(rs) < 2:
            continue

        def ms(k):
            v = [100 * r[k] for r in rs if r[k] is not None]
            return f"{statistics.mean(v):.1f} ± {statistics.stdev(v):.1f}" if len(v) > 1 else ""

        paper = PAPER.get(m.split(" (")[0], ("", ""))
        L.append(f"| {m} | {', '.join(str(r['seed']) for r in rs)} | {ms('clean')} | {ms('pgd40')} | {ms('aa')} | "
                 f"{paper[0]} | {paper[1]} |")
    warn = [f"- {r['run']}: {w}" for r in rows for w in r["warnings"]]
    L += ["", "Sanity-check warnings from evaluate.py:" if warn else "No sanity-check warnings from evaluate.py.", *warn]
    if missing:
        L += ["", f"Not evaluated (yet): {', '.join(missing)}"]
    text = "\n".join(L) + "\n"
    (out / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/mnist_pilot")
