"""The benchmark scripts' --quick modes run and write finite results (no timing is asserted).

The scripts run at once, one thread each, so the set takes about the time of the slowest one.
"""
import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("bench_solvers.py", "bench_overhead.py", "bench_relaxation.py")


def _finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_quick_modes_write_finite_tables(tmp_path):
    t0 = time.perf_counter()
    procs = {s: subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / s), "--quick", "--threads", "1",
                                  "--out", str(tmp_path / s.replace(".py", ""))],
                                 cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for s in SCRIPTS}
    for s, p in procs.items():
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]
    elapsed = time.perf_counter() - t0

    out = tmp_path / "bench_solvers"
    data = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".md").read_text().startswith("# ")
    assert out.with_suffix(".png").stat().st_size > 0
    rows = data["rows"]
    assert rows and all(_finite(r["ms"]) and r["ms"] > 0 for r in rows if "ms" in r)
    solved = [r for r in rows if "value_err" in r]
    assert {r["method"] for r in solved} == {"torch", "pot", "pot-eq", "pot-lib", "geomloss", "dual-step"}
    assert all(_finite(r["value_err"]) and _finite(r["plan_err"]) for r in solved)
    assert all(r["value_err"] < 0.1 for r in solved if r["method"] != "dual-step")
    assert all(r["ref_err"] < 1e-10 for r in solved)  # the float64 Newton reference converged
    assert all(_finite(r["iter_lib_ms"]) and _finite(r["bound_ms"]) for r in data["bandwidth"])
    # relax=1 takes the plain solver's iterations; all three reach the same value
    assert all(r["iterations_relax1"] == r["iterations_plain"] for r in data["plain_vs_lib"])
    assert all(r["value_diff_lib"] < 1e-4 and r["value_diff_relax1"] < 1e-4 for r in data["plain_vs_lib"])
    assert all(v is not None and _finite(v) for v in data["memory_mb"].values())

    out = tmp_path / "bench_overhead"
    data = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".md").read_text().startswith("# ")
    assert {r["variant"] for r in data["rows"]} >= {"TRADES", "+GOT-S torch"}
    assert all(_finite(r["ms"]) and _finite(r["overhead_pct"]) and _finite(r["got_call_ms"]) for r in data["rows"])
    out = tmp_path / "bench_relaxation"
    rows = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".md").read_text().startswith("# ")
    assert {r["mask"] for r in rows} == {False, True}
    # the relaxed solve meets the tolerance, and agrees with plain Sinkhorn where that converged too
    assert all(r["err_relax"] <= 1e-3 for r in rows)
    assert all(r["value_diff"] < 1e-3 for r in rows if r["err_plain"] <= 1e-3)
    # Budget of the issue: under a minute on an idle 2-core CPU; generous here for shared machines.
    assert elapsed < 240, elapsed
