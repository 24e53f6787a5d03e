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


if __name__ == "__main__":
    main()
