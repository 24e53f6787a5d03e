"""The committed 1-epoch MNIST study (studies/mnist_1epoch/): its models load as documented and reproduce their
evaluation, and its tables are what its table writer makes of its committed numbers."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `python -m pytest` from the root has it already; a bare `pytest` may not
    sys.path.insert(0, str(REPO))

from examples import data, models, report  # noqa: E402
from studies.mnist_1epoch import pilot_summary, tables  # noqa: E402

pytestmark = pytest.mark.integration

RESULTS = tables.RESULTS
RUNS = sorted(p.parent for p in RESULTS.glob("*/model_final.pt"))
MNIST_DIR = data.default_data_dir("mnist")
HAVE_MNIST = all((MNIST_DIR / f).is_file() for f in data.MNIST_FILES.values())


def _load(run: Path) -> tuple:
    """As the study's README shows it: build_model from config.json, then the weights with weights_only=True."""
    cfg = json.loads((run / "config.json").read_text())
    model = models.build_model(
        cfg["model"], cfg["data"]["num_classes"], cfg["data"]["in_channels"], cfg["data"]["image_size"]
    )
    model.load_state_dict(torch.load(run / "model_final.pt", weights_only=True))  # strict: every key matches
    return model.eval(), cfg


def test_committed_models_are_the_studys():
    """Every model the tables call a study or fine-tuning model whose numbers were collected is committed."""
    collected = json.loads((RESULTS / "summary.json").read_text())
    expected = [n for n in tables.STUDY + tables.FINE_TUNE if n in collected]
    assert [r.name for r in RUNS] == sorted(expected)


@pytest.mark.parametrize("run", RUNS, ids=[r.name for r in RUNS])
def test_model_loads_with_weights_only(run):
    model, cfg = _load(run)
    assert cfg["dataset"] == "mnist" and cfg["model"] == "smallcnn"
    with torch.no_grad():
        out = model(torch.rand(2, 1, 28, 28))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


@pytest.mark.skipif(not HAVE_MNIST, reason=f"MNIST idx files not in {MNIST_DIR}")
def test_models_reproduce_recorded_clean_accuracy():
    _, test_set, _ = data.load_datasets("mnist", str(MNIST_DIR))
    x, y = data.dataset_tensors(test_set, 1000)
    for run in RUNS:
        model, _ = _load(run)
        with torch.no_grad():
            acc = sum((model(xb).argmax(1) == yb).sum().item() for xb, yb in zip(x.split(500), y.split(500))) / len(y)
        recorded = json.loads((run / "eval.json").read_text())["clean_acc"]
        # One test point of slack: the study ran on another CPU, and a point on the decision boundary may flip.
        assert abs(acc - recorded) <= 1e-3, f"{run.name}: clean accuracy {acc} on the first 1000, recorded {recorded}"


def test_summary_rows_are_the_committed_evaluations():
    """summary.json (which also holds the uncommitted ablation runs) agrees with every committed run directory."""
    rows = tables.rows_from_summary(RESULTS / "summary.json")
    for run in RUNS:
        row = tables.study_row(report.read_run(run))
        row.pop("sweep_raw")
        assert row == rows[run.name], run.name


def test_tables_are_the_writers_output():
    """tables.md, and its copy in RESULTS.md, are what the table writer renders from summary.json."""
    rows = tables.rows_from_summary(RESULTS / "summary.json")
    text = tables.tables(rows, (RESULTS / "diagnostics.md").read_text())
    assert (RESULTS / "tables.md").read_text() == text
    results_md = (tables.HERE / "RESULTS.md").read_text()
    assert f"{tables.BEGIN}\n{text}{tables.END}" in results_md


def test_pilot_summary_is_the_writers_output(tmp_path):
    """The generated part of results/pilot_summary.md, from the 11 committed pilot models' run directories."""
    for name in tables.STUDY:
        (tmp_path / name).symlink_to(RESULTS / name)
    text = pilot_summary.main(str(tmp_path), str(tmp_path / "summary.md"))
    assert (RESULTS / "pilot_summary.md").read_text().startswith(text)


def test_diagnostics_measure_the_terms_of_a_trades_step():
    """diagnostics.py on a small untrained SmallCNN: label matching can only raise W and keeps all mass within
    labels; the entropic part theta * KL(P || ab^T) lies in [0, theta * log B]; the gradients reach the layer."""
    from studies.mnist_1epoch import diagnostics

    torch.manual_seed(0)
    model = models.build_model("smallcnn", 10, 1, 28)
    with torch.no_grad():
        model.classifier[5].weight.normal_(0, 0.1)  # TRADES zero-initialises it: no gradient through it then
    g = torch.Generator().manual_seed(0)
    batches = [(torch.rand(16, 1, 28, 28, generator=g), torch.arange(16) % 4)]
    cfg = {"epsilon": 0.3, "step_size": 0.1, "num_steps": 2, "beta_trades": 1.0}
    r = diagnostics.measure(model, models.default_layer("smallcnn"), batches, cfg, theta=0.1, lam=1.0, seed=0)
    assert r["w_lm"] >= r["w_s"] - 1e-6
    assert r["same_label_lm"] == pytest.approx(1.0, abs=1e-3) and 0 < r["same_label_s"] < 1
    for tag in ("lm", "s"):
        assert -1e-3 <= r[f"entropic_part_{tag}"] <= 0.1 * math.log(16) + 1e-3
        assert r[f"grad_w_{tag}_z"] > 0 and r[f"grad_w_{tag}_conv"] > 0
    assert r["grad_trades_z"] > 0 and -1 <= r["cos_w_lm_trades"] <= 1


def test_top_level_results_quote_the_studys_headline_table():
    """RESULTS.md's history section copies the study's main table: the copy must be the generated one, verbatim."""
    top = (REPO / "RESULTS.md").read_text()
    generated = (RESULTS / "tables.md").read_text()
    history = top[top.index("## History: the 1-epoch study") :]
    quoted = [line for line in history.splitlines() if line.startswith("|")]
    assert len(quoted) >= 3 and all(line in generated.splitlines() for line in quoted)
    assert "studies/mnist_1epoch/RESULTS.md" in top
