"""The committed results of the β = 10 study (studies/beta10/results/): each summary.md is what report.py renders
from the committed run folders, and RESULTS.md quotes the GPU study's tables verbatim."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `python -m pytest` from the root has it already; a bare `pytest` may not
    sys.path.insert(0, str(REPO))

from studies.beta10 import report  # noqa: E402

pytestmark = pytest.mark.integration

RESULTS = REPO / "studies" / "beta10" / "results"


@pytest.mark.parametrize("study", ["gpu_study", "cpu_study"])
def test_summary_is_what_the_report_renders_from_the_committed_runs(study):
    runs = report.collect(RESULTS / study)
    assert runs, f"no run folders in {study}"
    assert (RESULTS / study / "summary.md").read_text() == report.tables(runs)


def test_gpu_study_has_every_run_it_reports_on():
    """3 seeds of TRADES and GOT-TRADES-LM, one of the others, each trained 5 epochs and evaluated."""
    runs = report.collect(RESULTS / "gpu_study")
    expected = {f"{m}-s{s}" for m in ("trades", "got-trades-lm") for s in range(3)}
    expected |= {"pgd-at-s0", "got-pgd-lm-s0", "paper-trades-lm-s0"}
    assert set(runs) == expected
    for name, r in runs.items():
        assert len(r["metrics"]) == 5 and r["test10k"] is not None, name
        assert (r["aa1000"] is not None) == (not name.startswith("paper-")), name
        assert r["config"]["device"] == "cuda" and r["config"]["epochs"] == 5, name


def test_results_md_leads_with_the_gpu_study_and_quotes_its_tables():
    top = (REPO / "RESULTS.md").read_text()
    lead = top[: top.index("\n## ", top.index("\n## ") + 1)]
    assert "5 epochs, 3 seeds" in lead.splitlines()[2]
    generated = (RESULTS / "gpu_study" / "summary.md").read_text().splitlines()
    for title in ("| method | seeds | clean (10k)", "| seed | clean | PGD-40 | AutoAttack |"):
        i = generated.index(next(line for line in generated if line.startswith(title)))
        table = []
        for line in generated[i:]:
            if not line.startswith("|"):
                break
            table.append(line)
        assert "\n".join(table) in lead, title


def test_gpu_study_script_smoke_on_cpu(tmp_path):
    """gpu_study.sh end to end on CPU (--quick: 256 training points, evaluations on 100 test points,
    AutoAttack on 20), one run: training, the three evaluations, the report, and a tar without weights."""
    import subprocess
    import tarfile

    from examples import data

    mnist = data.default_data_dir("mnist")
    if not all((mnist / f).is_file() for f in data.MNIST_FILES.values()):
        pytest.skip(f"MNIST not found in {mnist}")
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", "studies/beta10/gpu_study.sh", str(out), "--device", "cpu", "--quick", "--epochs", "1"]
        + ["--jobs", "1", "--budget", "900", "--data-dir", str(mnist), "--runs", "trades-s0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with tarfile.open(out / "study.tar.gz") as tar:
        names = set(tar.getnames())
    assert not any(n.endswith(".pt") for n in names), "weights must not come back"
    for f in ("config.json", "metrics.jsonl", "eval-test10k.json", "eval-aa1000.json", "eval-sanity.json"):
        assert f"study/trades-s0/{f}" in names, f
    assert {"report/summary.md", "report/curves.png"} <= names
    log = (out / "gpu_study.log").read_text()
    assert "run_study.sh exit 0" in log and "| trades-s0 | TRADES | 0 |" in log
