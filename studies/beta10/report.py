"""Tables and learning curves of the issue-11 MNIST study (``run_study.sh``), written into RESULTS.md's study.

    .venv/bin/python -m studies.beta10.report runs/study --out studies/beta10/results

Copies each run's small files (config, metrics, evaluations, final weights) into ``--out``, and writes
``summary.md`` / ``summary.json`` (per run, per method over seeds, GOT − TRADES paired by seed, sanity
checks) and ``curves.png`` (test clean and PGD-10 accuracy on the first 2000 test points after each epoch).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path
from typing import Any

KEEP = (
    "config.json",
    "metrics.jsonl",
    "metrics.csv",
    "eval-test10k.json",
    "eval-aa1000.json",
    "eval-sanity.json",
    "eval-sweep500.json",
    "model_final.pt",
)
METHODS = {  # run-name prefix -> method label, in table order
    "trades": "TRADES",
    "got-trades-lm": "GOT-TRADES-LM (defaults)",
    "paper-trades-lm": "GOT-TRADES-LM, paper form (beta 10, no anchor, no debias)",
    "pgd-at": "PGD-AT",
    "got-pgd-lm": "GOT-PGD-LM (defaults)",
}


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def collect(root: Path) -> dict[str, dict[str, Any]]:
    runs = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and (p / "config.json").exists()):
        prefix, _, seed = d.name.rpartition("-s")
        metrics = (
            [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()]
            if (d / "metrics.jsonl").exists()
            else []
        )
        runs[d.name] = {
            "method": METHODS.get(prefix, prefix),
            "prefix": prefix,
            "seed": int(seed),
            "metrics": metrics,
            "test10k": _load(d / "eval-test10k.json"),
            "aa1000": _load(d / "eval-aa1000.json"),
            "sanity": _load(d / "eval-sanity.json"),
            "config": _load(d / "config.json"),
        }
    return runs


def row_of(r: dict[str, Any]) -> dict[str, float | None]:
    t, a, m = r["test10k"], r["aa1000"], r["metrics"]
    return {
        "clean": t["clean_acc"] if t else None,
        "pgd40": t["pgd"]["40"] if t else None,
        "aa": a["autoattack"]["robust_acc"] if a else None,
        "apgd_ce": a["autoattack"]["stages"]["apgd-ce"] if a else None,
        "epochs": len(m),
        "epoch_s": statistics.mean(x["epoch_time_s"] for x in m) if m else None,
        "got_value": m[-1].get("got_value") if m else None,
    }


def pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def mean_sd(vals: list[float]) -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "—"
    if len(vals) == 1:
        return f"{100 * vals[0]:.1f}"
    return f"{100 * statistics.mean(vals):.1f} ± {100 * statistics.stdev(vals):.1f}"


def sanity_lines(name: str, r: dict[str, Any]) -> list[str]:
    s = r["sanity"]
    if not s:
        return []
    sweep = {round(p["eps"], 3): p["acc"] for p in s.get("eps_sweep", [])}
    aa = s.get("autoattack", {})
    square = aa.get("alone", {}).get("square")
    white = aa.get("robust_acc")
    checks = [
        f"ε-sweep (PGD-20, n = {s['n']}): " + ", ".join(f"{e:g}: {pct(v)}" for e, v in sorted(sweep.items())),
        f"majority-class rate {pct(s['majority_rate'])}",
    ]
    if square is not None and white is not None:
        checks.append(f"Square alone {pct(square)} vs AutoAttack {pct(white)} (n = {aa.get('n')})")
    return [f"| {name} | " + "; ".join(checks) + " | " + ("; ".join(s.get("warnings", [])) or "none") + " |"]


def tables(runs: dict[str, dict[str, Any]]) -> str:
    out = [
        "### Per run",
        "",
        "| run | method | seed | clean (10k) | PGD-40 (10k) | AutoAttack (1000) | APGD-CE stage | epochs | s/epoch "
        "| final W |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        x = row_of(r)
        w = "—" if x["got_value"] is None else f"{x['got_value']:.4f}"
        out.append(
            f"| {name} | {r['method']} | {r['seed']} | {pct(x['clean'])} | {pct(x['pgd40'])} | {pct(x['aa'])} | "
            f"{pct(x['apgd_ce'])} | {x['epochs']} | {x['epoch_s']:.0f} | {w} |"
            if x["epoch_s"]
            else f"| {name} | {r['method']} | {r['seed']} | — | — | — | — | 0 | — | — |"
        )
    out += [
        "",
        "### Per method (mean ± sample standard deviation over seeds)",
        "",
        "| method | seeds | clean (10k) | PGD-40 (10k) | AutoAttack (1000) |",
        "|---|---|---|---|---|",
    ]
    for prefix, label in METHODS.items():
        rs = [r for r in runs.values() if r["prefix"] == prefix]
        if not rs:
            continue
        xs = [row_of(r) for r in rs]
        out.append(
            f"| {label} | {', '.join(str(r['seed']) for r in rs)} | {mean_sd([x['clean'] for x in xs])} | "
            f"{mean_sd([x['pgd40'] for x in xs])} | {mean_sd([x['aa'] for x in xs])} |"
        )
    pairs = [(runs.get(f"got-trades-lm-s{s}"), runs.get(f"trades-s{s}")) for s in range(10)]
    pairs = [(g, t) for g, t in pairs if g and t and g["aa1000"] and t["aa1000"] and g["test10k"] and t["test10k"]]
    if pairs:
        out += [
            "",
            "### GOT-TRADES-LM − TRADES, paired by seed (points)",
            "",
            "| seed | clean | PGD-40 | AutoAttack |",
            "|---|---|---|---|",
        ]
        diffs = {"clean": [], "pgd40": [], "aa": []}
        for g, t in pairs:
            xg, xt = row_of(g), row_of(t)
            d = {k: xg[k] - xt[k] for k in diffs}  # type: ignore[operator]
            for k in diffs:
                diffs[k].append(d[k])
            out.append(f"| {g['seed']} | {100 * d['clean']:+.1f} | {100 * d['pgd40']:+.1f} | {100 * d['aa']:+.1f} |")
        if len(pairs) > 1:
            out.append(
                "| mean ± sd | "
                + " | ".join(
                    f"{100 * statistics.mean(v):+.1f} ± {100 * statistics.stdev(v):.1f}" for v in diffs.values()
                )
                + " |"
            )
    lines = [line for n, r in runs.items() for line in sanity_lines(n, r)]
    if lines:
        out += [
            "",
            "### Sanity checks (seed 0)",
            "",
            "| run | checks | evaluate.py warnings |",
            "|---|---|---|",
        ] + lines
    return "\n".join(out) + "\n"


def plot(runs: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    styles = ["-o", "--s", ":^", "-.d", "-v"]
    for (prefix, label), style in zip(METHODS.items(), styles):
        rs = [r for r in runs.values() if r["prefix"] == prefix and r["metrics"]]
        if not rs:
            continue
        for ax, key in zip(axes, ("test_clean_acc", "test_pgd10_acc")):
            n = min(len(r["metrics"]) for r in rs)
            epochs = list(range(1, n + 1))
            per_seed = [[100 * r["metrics"][e][key] for e in range(n)] for r in rs]
            mean = [statistics.mean(v) for v in zip(*per_seed)]
            ax.plot(epochs, mean, style, label=f"{label} (n={len(rs)})", markersize=5)
            if len(rs) > 1:
                lo = [min(v) for v in zip(*per_seed)]
                hi = [max(v) for v in zip(*per_seed)]
                ax.fill_between(epochs, lo, hi, alpha=0.15)
    axes[0].set_title("test clean accuracy (first 2000)")
    axes[1].set_title("test PGD-10 accuracy (first 2000, ε = 0.3, step 0.04)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy (%)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle("MNIST SmallCNN, 10-step attack: mean over seeds, band = min..max")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("runs", type=Path)
    p.add_argument("--out", type=Path, default=Path("studies/beta10/results"))
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    for d in a.runs.iterdir():
        if d.is_dir() and (d / "config.json").exists():
            (a.out / d.name).mkdir(exist_ok=True)
            for f in KEEP:
                if (d / f).exists():
                    shutil.copy2(d / f, a.out / d.name / f)
    runs = collect(a.out)
    text = tables(runs)
    (a.out / "summary.md").write_text(text)
    (a.out / "summary.json").write_text(
        json.dumps({n: {**row_of(r), "method": r["method"], "seed": r["seed"]} for n, r in runs.items()}, indent=2)
        + "\n"
    )
    plot(runs, a.out / "curves.png")
    print(text)


if __name__ == "__main__":
    main()
