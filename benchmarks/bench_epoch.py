"""Issue 12, target 4: the training time of an MNIST epoch with GOT-LM against TRADES, alone on the device
and with 4 runs sharing it (2 TRADES + 2 GOT-LM), through the real training script (examples.train_trades).

    python -m benchmarks.bench_epoch --device cuda --data-dir DIR --out OUTDIR [--train-subset N] [--graphs] [--quick]

``--graphs`` adds GOT-LM with ``--got-cuda-graphs --got-deferred-checks`` (the form without a host
synchronisation in the step): alone, and 2 TRADES + 2 of it sharing the device.
On CUDA a short untimed run of each GOT method comes first, so that Triton's compiled kernels are in its
on-disk cache: the timed epochs then pay what every run but a machine's very first pays.

Each run is ``python -m examples.train_trades --dataset mnist --epochs 1`` with the 10-step attack of step
0.04; its ``train_time_s`` (the training loop alone, without the per-epoch test) is read back from
``metrics.jsonl``. ``--train-subset`` shortens the epoch (the ratio is what the target is about). Writes
``epoch_<gpu|cpu>.md`` / ``.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

METHODS = {
    "TRADES": ["--got", "none"],
    "GOT-LM": ["--got", "lm"],
    "GOT-LM graphs deferred": ["--got", "lm", "--got-cuda-graphs", "--got-deferred-checks"],
}


def launch(name: str, method: str, a: argparse.Namespace, root: Path) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "examples.train_trades",
        "--dataset",
        "mnist",
        "--epochs",
        "1",
        "--num-steps",
        "10",
        "--step-size",
        "0.04",
        "--test-subset",
        "200",
        "--eval-pgd-steps",
        "1",
        "--device",
        a.device,
        *METHODS[method],
        "--out",
        str(root / name),
        "--overwrite",
        "--quiet",
        "--no-deterministic",
        "--train-subset",
        str(a.train_subset),
        "--threads",
        "1",
    ]
    if a.data_dir:
        cmd += ["--data-dir", a.data_dir]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(name: str, p: subprocess.Popen, root: Path) -> float:
    out, _ = p.communicate()
    if p.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{out[-2000:]}")
    rows = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return float(rows[-1]["train_time_s"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--train-subset", type=int, default=60000, help="training points per epoch (all: 60000)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--reps", type=int, default=2, help="runs of each method alone")
    p.add_argument("--graphs", action="store_true", help="also GOT-LM with --got-cuda-graphs --got-deferred-checks")
    p.add_argument("--quick", action="store_true", help="512 points per epoch (smoke test)")
    a = p.parse_args()
    if a.quick:
        a.train_subset = 512
    kind = "cpu" if a.device == "cpu" else "gpu"
    got_methods = ["GOT-LM"] + (["GOT-LM graphs deferred"] if a.graphs else [])
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # Untimed, on CUDA: a short run of each GOT method first, so that the timed epochs find Triton's kernels
        # in its on-disk cache, as every run but a machine's first does (a first compile takes seconds, once).
        # Its size keeps the epoch's remainder modulo 1024, so the short last batch is compiled for too.
        if a.device != "cpu":
            subset = a.train_subset
            a.train_subset = min(subset, 1024 + subset % 1024)
            for method in got_methods:
                name = f"warm-{method}".replace(" ", "_")
                finish(name, launch(name, method, a, root), root)
            a.train_subset = subset
        # Alone: one run at a time, TRADES then each GOT method, --reps times each.
        for rep in range(a.reps):
            for method in ["TRADES", *got_methods]:
                name = f"solo-{len(rows)}"
                t = finish(name, launch(name, method, a, root), root)
                rows.append({"setting": "alone", "method": method, "rep": rep, "train_s": t})
                print(rows[-1], flush=True)
        # Shared: 2 TRADES + 2 runs of one GOT method at once, for each GOT method.
        for got in got_methods:
            setting = "4 runs sharing" if got == "GOT-LM" else f"4 runs sharing ({got})"
            runs = [(m, i, f"shared-{got}-{m}-{i}".replace(" ", "_")) for m in ("TRADES", got) for i in range(2)]
            started = {run: launch(run[2], run[0], a, root) for run in runs}
            for (m, i, name), proc in started.items():
                rows.append({"setting": setting, "method": m, "rep": i, "train_s": finish(name, proc, root)})
                print(rows[-1], flush=True)

    def best(setting: str, method: str) -> float:
        return min(r["train_s"] for r in rows if r["setting"] == setting and r["method"] == method)

    lines = [
        f"# One MNIST epoch ({a.train_subset} training points) of examples.train_trades on {a.device}",
        "",
        "| setting | TRADES s | GOT s | GOT method | GOT / TRADES | target |",
        "|---|---|---|---|---|---|",
    ]
    summary = {}
    for got in got_methods:
        for setting, target in (("alone", 1.05), ("4 runs sharing", 1.15)):
            shared = setting != "alone"
            key = setting if not shared or got == "GOT-LM" else f"4 runs sharing ({got})"
            t, g = best(key, "TRADES"), best(key, got)
            summary[f"{got}, {setting}"] = {"trades_s": t, "got_s": g, "ratio": g / t, "target": target}
            verdict = "met" if g / t <= target else "missed"
            lines.append(f"| {setting} | {t:.1f} | {g:.1f} | {got} | {g / t:.3f} | ≤ {target:.2f}: {verdict} |")
    lines += [
        "",
        "Times: the training loop of the epoch (`train_time_s`), the faster of the repeats alone and the",
        "faster of the two runs of each method when shared (TRADES: of the runs beside that GOT method).",
        "On CUDA, an untimed short run of each GOT method came first (Triton's on-disk kernel cache warm).",
        "GOT-LM uses the library's defaults; 'GOT-LM graphs deferred' adds `--got-cuda-graphs --got-deferred-checks`",
        "(`cuda_graphs=True, deferred_checks=True`).",
    ]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"epoch_{kind}.md").write_text("\n".join(lines) + "\n")
    (out / f"epoch_{kind}.json").write_text(json.dumps({"rows": rows, "summary": summary}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
