"""Table and curves of a screen (``gpu_screen.sh`` / ``run_list.py``): test clean / PGD-10 accuracy every 100 steps.

.venv/bin/python -m studies.beta10.screen_report studies/beta10/results/screen_gpu studies/beta10/screen_gpu.txt
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(folder: Path):
    runs = {}
    for f in sorted(folder.glob("*.jsonl")):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        runs[f.stem] = rows
    return runs


def describe(listfile: Path):
    out = {}
    for line in listfile.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, kw, flags = (line.split("|") + ["", ""])[:3]
        seed = flags.split("--seed")[1].split()[0] if "--seed" in flags else "0"
        name = name.strip()
        key = name if name.endswith(f"-s{seed}") else f"{name}-s{seed}"
        kw = json.loads(kw) if kw.strip() else {}
        text = "TRADES" if not kw else ", ".join(f"{k}={v}" for k, v in kw.items() if k != "label_matching")
        if kw and not kw.get("label_matching", False):
            text += ", no LM"
        out[key] = text + (f" ({flags.strip()})" if flags.strip() and "--seed" not in flags else "")
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("folder", type=Path)
    p.add_argument("listfile", type=Path)
    a = p.parse_args()
    runs, desc = load(a.folder), describe(a.listfile)
    steps = sorted({r["step"] for rows in runs.values() for r in rows if "test_clean" in r})
    lines = [
        "| run | variant | " + " | ".join(f"step {s}" for s in steps) + " | CE at the end | W at the end |",
        "|---|---|" + "---|" * len(steps) + "---|---|",
    ]
    for name, rows in runs.items():
        ev = {r["step"]: r for r in rows if "test_clean" in r}
        cells = [
            f"{100 * ev[s]['test_clean']:.0f} / {100 * ev[s]['test_pgd10']:.0f}" if s in ev else "NaN" for s in steps
        ]
        if "error" in rows[-1]:
            cells = [
                c if s < rows[-1]["step"] else f"NaN features at step {rows[-1]['step']}" for s, c in zip(steps, cells)
            ]
            rows = rows[:-1] or [{"ce": float("nan")}]
        last = rows[-1]
        w = last.get("value")
        lines.append(
            f"| {name} | {desc.get(name, '?')} | "
            + " | ".join(cells)
            + f" | {last['ce']:.2f} | {'—' if w is None else f'{w:.3f}'} |"
        )
    text = "\n".join(lines) + "\n"
    (a.folder / "summary.md").write_text(text)
    print(text)
    plot(runs, a.folder / "curves.png")


# The runs drawn in curves.png: (run, label, colour, line style).
CURVES = [
    ("trades-s0", "TRADES", "black", "-"),
    ("trades-s1", None, "black", "-"),
    ("b3-anchor-debias-s0", "defaults (β 3, anchor, debias)", "tab:blue", "-"),
    ("b3-anchor-debias-s1", None, "tab:blue", "-"),
    ("b10-anchor-debias-s0", "β 10, anchor, debias", "tab:green", "--"),
    ("b10-dual-anchor-debias-s0", "β 10, anchor, debias, dual", "tab:olive", "--"),
    ("b10-debias-s0", "β 10, debias only", "tab:purple", ":"),
    ("b10-anchor-s0", "β 10, anchor only", "tab:orange", ":"),
    ("b10-paper-s0", "β 10, paper form", "tab:red", "-."),
    ("b1-paper-s0", "β 1, paper form", "tab:pink", "-."),
]


def plot(runs: dict[str, list[dict]], path: Path) -> None:
    """Test clean and PGD-10 accuracy against training step for the main variants (two seeds where run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    for name, label, colour, style in CURVES:
        ev = [r for r in runs.get(name, []) if "test_clean" in r]
        if not ev:
            continue
        steps = [r["step"] for r in ev]
        for ax, key in zip(axes, ("test_clean", "test_pgd10")):
            ax.plot(steps, [100 * r[key] for r in ev], style, color=colour, marker="o", ms=3, label=label)
    for ax, title in zip(axes, ("clean (first 1000 test points)", "PGD-10 (first 500 test points)")):
        ax.set_title(title)
        ax.set_xlabel("training step (batch 128; 469 steps = 1 epoch)")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper left")
    fig.suptitle("MNIST SmallCNN, TRADES + GOT-LM variants (H200 screen, seeds 0 and 1 where two lines)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
