"""The committed MNIST models of issue #5 (results/mnist/) load as documented and reproduce their evaluation."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from examples import data, models  # noqa: E402

RESULTS = REPO / "results" / "mnist"
RUNS = sorted(p.parent for p in RESULTS.glob("*/model_final.pt"))
MNIST_DIR = data.default_data_dir("mnist")


def _load(run: Path) -> tuple:
    cfg = json.loads((run / "config.json").read_text())
    model = models.build_model(cfg["model"], cfg["data"]["num_classes"], cfg["data"]["in_channels"],
                               cfg["data"]["image_size"])
    model.load_state_dict(torch.load(run / "model_final.pt", weights_only=True))  # strict: every key matches
    return model.eval(), cfg


def test_results_are_committed():
    assert len(RUNS) >= 11, f"expected the study's models under {RESULTS}, found {[r.name for r in RUNS]}"


@pytest.mark.parametrize("run", RUNS, ids=[r.name for r in RUNS])
def test_model_loads_with_weights_only(run):
    model, cfg = _load(run)
    assert cfg["dataset"] == "mnist" and cfg["model"] == "smallcnn"
    with torch.no_grad():
        out = model(torch.rand(2, 1, 28, 28))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


@pytest.mark.skipif(not all((MNIST_DIR / f).is_file() for f in data.MNIST_FILES.values()),
                    reason=f"MNIST idx files not in {MNIST_DIR}")
def test_models_reproduce_recorded_clean_accuracy():
    _, test_set, _ = data.load_datasets("mnist", str(MNIST_DIR))
    x, y = data.dataset_tensors(test_set, 1000)
    for run in RUNS:
        model, _ = _load(run)
        with torch.no_grad():
            acc = sum((model(xb).argmax(1) == yb).sum().item() for xb, yb in zip(x.split(500), y.split(500))) / len(y)
        recorded = json.loads((run / "eval.json").read_text())["clean_acc"]
        assert abs(acc - recorded) <= 1e-3, f"{run.name}: clean accuracy {acc} on the first 1000, recorded {recorded}"
