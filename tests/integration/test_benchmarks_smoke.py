"""benchmarks/: `gpu_check.sh --device cpu --quick` runs every step and writes tables with the expected rows and
numbers that parse, and the quick modes of bench_acceleration and bench_cpu_paths run. No timing is asserted:
what a shared CPU measures says nothing about the targets (those are read off the GPU tables,
benchmarks/README.md).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # benchmarks/ is a package of the repository, not of the installed library
    sys.path.insert(0, str(ROOT))

pytestmark = pytest.mark.integration

SOLVER_METHODS = {"matmul", "cost", "torch", "pot", "geomloss", "ot.solve", "dual"}
SINKHORN = {"torch", "pot", "geomloss", "ot.solve"}
OVERHEAD_VARIANTS = {"TRADES", "+GOT-S", "+GOT-LM", "+GOT-LM dual", "+GOT-S geomloss"}


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _table(md: str, first_header: str) -> tuple[list[str], list[list[str]]]:
    """The header and rows of the first markdown table whose header starts with ``| first_header |``."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return header, rows


@pytest.fixture(scope="module")
def gpu_check(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    tar = str(tmp_path_factory.mktemp("packed") / "gpu_check.tar.gz")
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out), "--device", "cpu", "--quick", "--tar", tar],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,  # ~1 min on an idle 2-core CPU; minutes when other jobs share it
    )
    return out, proc, Path(tar)


def test_gpu_check_runs_every_step(gpu_check):
    out, proc, tar = gpu_check
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    status = (out / "gpu_check.md").read_text()
    assert "| solvers | exit 0 |" in status and "| overhead | exit 0 |" in status, status
    assert "triton_selfcheck" in status and "cuda_tests" in status  # skipped on CPU, and say so
    log = (out / "gpu_check.log").read_text()
    assert "=== solvers" in log and "=== overhead" in log
    # A lent GPU machine returns at most 8 files: --tar packs the 12 into one.
    with tarfile.open(tar) as t:
        packed = {Path(n).name for n in t.getnames() if n not in (".", "./")}
    assert packed == {f.name for f in out.iterdir()} and len(packed) == 12, packed


def test_solver_tables(gpu_check):
    out, _, _ = gpu_check
    data = json.loads((out / "solvers_cpu_quick.json").read_text())
    md = (out / "solvers_cpu_quick.md").read_text()
    assert md.startswith("# ")
    env = data["env"]
    assert env["device"] == "cpu" and env["triton_kernels"] is False and env["torch"]
    rows = data["rows"]
    cells = {(r["B"], r["mask"]) for r in rows}
    assert cells == {(32, False), (32, True)}
    for cell in cells:
        assert {r["method"] for r in rows if (r["B"], r["mask"]) == cell} == SOLVER_METHODS
    for r in rows:
        if "status" in r:  # only a missing optional package may leave a row without numbers
            assert r["status"].startswith("not installed"), r
            continue
        assert _number(r["ms"]) and r["ms"] > 0, r
        if r["method"] in SINKHORN | {"dual"}:
            assert _number(r["ms_solve"]) and r["ms_solve"] > 0, r
            assert _number(r["plan_err"]) and _number(r["value_err"]) and _number(r["marginal_err"]), r
            assert isinstance(r["iterations"], int) and r["iterations"] >= 1, r
    for cell in cells:
        by = {r["method"]: r for r in rows if (r["B"], r["mask"]) == cell}
        default = by["torch"]
        assert default["equal"] == "(the default)" and default["marginal_err"] <= 1e-3
        assert default["value_err"] < 1e-3
        for m in SINKHORN - {"torch"}:
            r = by[m]
            if "status" in r:
                continue
            assert r["equal"] in ("yes", "NOT reached"), r
            if r["equal"] == "yes":  # equal accuracy: within the default's distance to the reference
                assert r["plan_err"] <= default["plan_err"], r
            assert r["value_err"] < 1e-2, r
    assert all(p["ref_marginal_err"] < 1e-10 for p in data["problems"])  # the float64 references converged
    assert data["reference_check"] and all(_number(r["newton_err"]) for r in data["reference_check"])
    # the markdown tables hold the same rows, with cells that parse
    header, body = _table(md, "B")
    assert header[:3] == ["B", "mask", "method"] and len(body) == len(rows)
    ms = header.index("ms with cost")
    for cells_ in body:
        assert len(cells_) == len(header)
        float(cells_[ms])
    assert "## The default against POT and GeomLoss at equal accuracy" in md
    _, summary = _table(md, "B | mask | default ms with cost")
    assert len(summary) == 2 and all(float(c[2]) > 0 for c in summary)


def test_overhead_tables(gpu_check):
    out, _, _ = gpu_check
    data = json.loads((out / "overhead_cpu_quick.json").read_text())
    md = (out / "overhead_cpu_quick.md").read_text()
    assert md.startswith("# ")
    rows = data["rows"]
    assert {r["variant"] for r in rows} == OVERHEAD_VARIANTS
    for r in rows:
        if "status" in r:
            assert r["status"].startswith("not installed"), r
            continue
        assert _number(r["ms"]) and _number(r["overhead_pct"]), r
        assert r["syncs_step"] is None  # counted on CUDA only
        if r["variant"] != "TRADES":
            assert _number(r["got_call_ms"]) and _number(r["got_fwd_in_step_ms"]), r
            assert _number(r["got_call_share_pct"]) and r["got_call_share_pct"] > 0, r
    assert r["data"] == "MNIST" or r["data"].startswith("random")
    header, body = _table(md, "B | variant")
    assert len(body) == len(rows)
    col = header.index("host syncs / step")
    assert all(c[col] == "n/a" for c in body)


def _run_quick(script: str, out) -> None:
    """Run ``python -m benchmarks.<script> --quick --out OUT``, which must succeed."""
    proc = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{script}", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]


def _quick_rows(script: str, out, stem: str) -> list:
    """:func:`_run_quick`, then the rows of its OUT/<stem>.json."""
    _run_quick(script, out)
    return json.loads((out / f"{stem}.json").read_text())["rows"]


def test_acceleration_quick(tmp_path):
    rows = _quick_rows("bench_acceleration", tmp_path, "acceleration_cpu_quick")
    assert {r["mask"] for r in rows} == {False, True}
    assert {r["problem"] for r in rows} == {"cross", "clean-clean", "adv-adv"}
    # the accelerated solve meets the tolerance, and agrees with plain Sinkhorn where that converged too
    assert all(r["err_aa"] <= 1e-3 for r in rows)
    assert all(r["value_diff"] < 1e-3 for r in rows if r["err_plain"] <= 1e-3)
    assert (tmp_path / "acceleration_cpu_quick.md").read_text().startswith("# ")


def test_acceleration_times_the_fused_launch_above_its_dispatch_limit(tmp_path, monkeypatch):
    """Where the kernel takes a size that the solvers do not send it (FUSED_MAX lowered to 16 here, the
    kernel run by Triton's interpreter on CPU), bench_acceleration times each GOT call both ways, and the
    fused launch gives the torch loop's values; its side-by-side table pairs the two by batch and memory."""
    from interpreted import kernel_modules

    (T,) = kernel_modules("got_reg.solvers._triton")
    import benchmarks.bench_acceleration as bench

    monkeypatch.setattr(T, "FUSED_MAX", 16)
    assert bench.main(["--quick", "--anderson", "8", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "acceleration_cpu_quick.json").read_text())
    calls = data["calls"]
    ways = ("3 × sinkhorn_log", bench.ABOVE)
    assert {(c["mask"], c["how"]) for c in calls} == {(m, h) for m in (False, True) for h in ways}
    assert all(c["value_diff"] < 1e-4 for c in calls)
    assert all(c["value_diff"] == 0.0 for c in calls if c["how"] != bench.ABOVE)  # the reference itself
    singles = [r for r in data["rows"] if "ms_fused" in r]
    assert len(singles) == 6 and all(r["err_fused"] <= 1e-3 and r["fused_value_diff"] < 1e-4 for r in singles)
    header, rows = _table((tmp_path / "acceleration_cpu_quick.md").read_text(), "B | what")
    assert header == ["B", "what", "torch loop ms", "fused ms", "ratio", "max value diff"]
    assert len(rows) == 4  # GOT-S and GOT-LM calls, the cross problem alone with and without the mask
    for row in rows:
        loop, fused, ratio = (float(c.split()[0]) for c in row[2:5])
        assert abs(ratio - fused / loop) <= 0.01 * ratio + 0.01  # one batch: the ratio of the medians


def test_cpu_paths_quick(tmp_path):
    rows = _quick_rows("bench_cpu_paths", tmp_path, "cpu_paths_quick")
    assert {(r["mask"], r["variant"]) for r in rows} == {
        (m, v) for m in (False, True) for v in ("before", "kernel LSE", "host step", "after (default)")
    }
    # every variant solves the same problems to tol; 'before' is its own reference
    assert all(r["converged"] for r in rows)
    assert all(r["ratio"] == 1.0 and r["value_diff"] == 0.0 for r in rows if r["variant"] == "before")
    assert all(r["value_diff"] < 1e-3 and r["plan_diff_l1"] < 1e-2 for r in rows)
    assert (tmp_path / "cpu_paths_quick.md").read_text().startswith("# ")


def test_host_profile_quick(tmp_path):
    _run_quick("bench_host", tmp_path)
    md = (tmp_path / "host_cpu_quick.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| call")]
    assert [r.split(" | ")[0] for r in rows] == ["| joint cost alone", "| +GOT-S", "| +GOT-LM", "| +GOT-LM dual"]
    for r in rows:  # host and drained ms: positive, drained not below host
        host, drained = (float(x) for x in r.strip(" |").split(" | ")[1:])
        assert 0 < host <= drained
    for call in ("joint cost alone", "+GOT-LM"):
        assert f"## {call}: torch.profiler over 2 calls" in md and f"## {call}: cProfile over 4 calls" in md
    assert "CosineKLBackward" in md  # the cost's autograd node shows in its profile


def test_calibration_picks_the_loosest_setting_within_the_target():
    """The equal-accuracy ladder, on a synthetic solver whose plan error is 2·setting (no timing involved)."""
    import argparse

    import torch

    from benchmarks.bench_solvers import Grid

    a = argparse.Namespace(time_limit=0, budget=60.0)
    grid = Grid(a, torch.device("cpu"))

    def linear(s):  # error 2·setting, sweeps growing as the setting tightens
        return 2 * s, int(10 / s)

    tight = grid.calibrate(linear, guess=1.0, target=0.3, max_iter=10**6)
    assert tight["met"] and tight["setting"] == 0.125 and tight["err"] == 0.25
    loose = grid.calibrate(linear, guess=0.01, target=0.3, max_iter=10**6)
    assert loose["met"] and loose["setting"] == pytest.approx(0.08)  # loosened ×2 three times at most
    # an error stuck above the target (fp32 rounding) while sweeps grow: the most accurate setting, not met
    stuck = grid.calibrate(lambda s: (1.0 + 0.01 * s, int(10 / s)), guess=1.0, target=0.5, max_iter=10**9)
    assert not stuck["met"] and len(stuck["probes"]) <= 4
    assert stuck["err"] == min(p["plan_err"] for p in stuck["probes"])


def test_launch_tables(gpu_check):
    """Counts of kernels and host reads per got(...) call: well-formed, and one host read per call."""
    out, _, _ = gpu_check
    data = json.loads((out / "launches_cpu_quick.json").read_text())
    counts = data["counts"]
    assert set(counts) == {"+GOT-S", "+GOT-LM", "+GOT-LM dual", "+GOT-LM debias=False", "joint cost alone"}
    interpreted = data["path"].startswith("the CUDA path")
    for name, c in counts.items():
        assert c["calls"] == (1 if name == "joint cost alone" else 5), (name, c)  # a cycle of the collapse monitor
        assert c["kernels"] == pytest.approx(c["kernels_fwd"] + c["kernels_bwd"], abs=0.02) and c["kernels"] > 0
        assert sum(c["ops"].values()) == pytest.approx(c["kernels"], abs=0.02 * len(c["ops"])), (name, c)
        assert c["reads"] == (0 if name == "joint cost alone" else 1), (name, c)  # the call's one read
        if interpreted:  # the cost's two launches (its factors; its gradients), every Sinkhorn solve in one more
            assert c["triton"] == (2 if name == "joint cost alone" else 3), (name, c)
    for name, per_b in data["times_ms"].items():
        assert all(_number(ms) and ms > 0 for ms in per_b.values()), (name, per_b)
    header, body = _table((out / "launches_cpu_quick.md").read_text(), "call | kernels fwd")
    assert len(body) == len(counts) and header[3] == "kernels"
