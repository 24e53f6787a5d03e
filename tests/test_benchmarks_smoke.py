"""The benchmark scripts' --quick modes run and write finite results (no timing is asserted)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["bench_solvers.py", "bench_overhead.py"])
def test_quick_mode_writes_tables(script, tmp_path):
    out = tmp_path / "res"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(out)],
                   check=True, cwd=ROOT, timeout=240, capture_output=True)
    data = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".md").read_text().startswith("# ")
    rows = data["rows"]
    assert rows and all(math.isfinite(r["ms"]) for r in rows if "ms" in r)
    if script == "bench_solvers.py":
        assert out.with_suffix(".png").exists()
        solved = [r for r in rows if "value_err" in r]
        assert {r["method"] for r in solved} == {"torch", "pot", "geomloss", "dual-step"}
        assert all(r["value_err"] < 0.1 for r in solved if r["method"] != "dual-step")
