"""End-to-end tests of examples/ on tiny digits subsets (the whole file runs in a few minutes on 2 cores).

The scripts run as ``python -m examples.X`` from the repository root, as examples/README.md says.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `python -m pytest` from the root has it already; a bare `pytest` may not
    sys.path.insert(0, str(REPO))

from examples import _io, attacks, data, evaluate, models, plot_latent, report, train_pgd, train_trades  # noqa: E402

pytestmark = pytest.mark.integration

TINY = [
    "--train-subset",
    "128",
    "--test-subset",
    "48",
    "--batch-size",
    "32",
    "--num-steps",
    "3",
    "--eval-pgd-steps",
    "3",
    "--threads",
    "1",
    "--quiet",
]
ENV = dict(os.environ, PYTHONUNBUFFERED="1")
NO_CUDA = "no CUDA device is available on this machine"
HANG = 900  # seconds before a child process counts as hung (generous: CI machines can be heavily loaded)


def _module(name, *args):
    """The command line of ``python -m examples.<name> args`` (run with cwd=REPO)."""
    return [sys.executable, "-m", f"examples.{name}", *map(str, args)]


def _finite_numbers(row):
    return all(math.isfinite(v) for v in row.values() if isinstance(v, float))


def _strip_time(rows):
    return [{k: v for k, v in r.items() if k not in ("epoch_time_s", "train_time_s")} for r in rows]


def _clean_accuracy_of_saved_model(run: Path) -> float:
    """Oracle for ``test_clean_acc``: the saved weights, rebuilt by hand, on the run's test subset."""
    cfg = json.loads((run / "config.json").read_text())
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten; callers check the global RNG
        model = models.build_model(cfg["model"], 10, 1, 8)
    model.load_state_dict(torch.load(run / "model_final.pt", weights_only=True))
    _, test_set, _ = data.load_datasets("digits", test_subset=cfg["test_subset"])
    x, y = data.dataset_tensors(test_set)
    with torch.no_grad():
        return (model.eval()(x).argmax(1) == y).sum().item() / len(y)


# ----------------------------------------------------------------------------- models / data
@pytest.mark.parametrize(
    "name,shape", [("digitsnet", (1, 8)), ("smallcnn", (1, 28)), ("resnet18", (3, 32)), ("wrn34-10", (3, 32))]
)
def test_models_forward_and_hook_fires_once(name, shape):
    torch.manual_seed(0)
    c, s = shape
    model = models.build_model(name, 10, in_channels=c, image_size=s).eval()
    calls = []
    handle = model.get_submodule(models.default_layer(name)).register_forward_hook(lambda m, i, o: calls.append(o))
    with torch.no_grad():
        out = model(torch.rand(2, c, s, s))
    handle.remove()
    assert out.shape == (2, 10)
    assert len(calls) == 1 and calls[0].shape[0] == 2  # one distinct module, one firing per forward


def test_smallcnn_matches_trades_layout():
    m = models.build_model("smallcnn", 10, in_channels=1, image_size=28)
    assert [type(mod).__name__ for mod in m.classifier] == ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Linear"]
    assert m.classifier[2].p == 0.5 and models.default_layer("smallcnn") == "classifier.4"
    assert sum(isinstance(mod, nn.Conv2d) for mod in m.feature_extractor) == 4
    # A TRADES checkpoint (named keys: classifier.fc1.weight ...) loads into the indexed layout.
    names = {
        "feature_extractor": {0: "conv1", 2: "conv2", 5: "conv3", 7: "conv4"},
        "classifier": {0: "fc1", 3: "fc2", 5: "fc3"},
    }
    trades_sd = {}
    for k, v in m.state_dict().items():
        block, idx, leaf = k.split(".")
        trades_sd[f"{block}.{names[block][int(idx)]}.{leaf}"] = torch.randn_like(v)
    m.load_state_dict(trades_sd)
    assert torch.equal(m.classifier[5].bias, trades_sd["classifier.fc3.bias"])


def test_digits_loader():
    tr, te, info = data.load_datasets("digits")
    x, y = data.dataset_tensors(tr)
    xt, yt = data.dataset_tensors(te)
    assert x.shape[1:] == (1, 8, 8) and len(x) + len(xt) == 1797
    assert x.min() >= 0 and x.max() <= 1 and info.num_classes == 10
    assert set(y.tolist()) == set(range(10))
    # The split is fixed by split_seed, not by the training seed.
    assert torch.equal(xt, data.dataset_tensors(data.load_datasets("digits")[1])[0])
    tr_s, te_s, _ = data.load_datasets("digits", train_subset=50, test_subset=20)
    assert len(tr_s) == 50 and len(te_s) == 20


MNIST_DIR = data.default_data_dir("mnist")


@pytest.mark.skipif(
    not all((MNIST_DIR / f).is_file() for f in data.MNIST_FILES.values()), reason=f"MNIST idx files not in {MNIST_DIR}"
)
def test_mnist_loader_reads_idx_files():
    x, y, xt, yt = data.load_mnist_tensors(MNIST_DIR)
    assert x.shape == (60000, 1, 28, 28) and xt.shape == (10000, 1, 28, 28)
    assert y.shape == (60000,) and yt.shape == (10000,)
    assert y.min() == 0 and y.max() == 9 and yt.min() == 0 and yt.max() == 9
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1


def test_mnist_missing_files_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.gz") as err:
        data.load_datasets("mnist", str(tmp_path))
    assert str(tmp_path) in str(err.value)


@pytest.mark.parametrize(
    "name,expected", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"), ("svhn", "train_32x32.mat")]
)
def test_vision_missing_files_error(tmp_path, name, expected):
    with pytest.raises(FileNotFoundError, match=expected) as err:
        data.load_datasets(name, str(tmp_path))
    assert str(tmp_path) in str(err.value) and "downloaded" in str(err.value)


def test_missing_torchvision_error(tmp_path):
    try:
        import torchvision  # noqa: F401

        pytest.skip("torchvision is installed")
    except ImportError:
        pass
    for f in data.VISION_FILES["cifar10"]:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_bytes(b"")
    with pytest.raises(ImportError, match=r"got-reg\[vision\]"):
        data.load_datasets("cifar10", str(tmp_path))


def test_digits_refuses_a_data_dir(tmp_path):
    """Issue 13, item 13: digits is bundled, so a --data-dir for it was silently ignored."""
    with pytest.raises(ValueError, match="bundled with scikit-learn") as err:
        data.load_datasets("digits", str(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere") in str(err.value)
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="drop --data-dir"):
        train_trades.main(["--out", str(out), "--epochs", "1", "--data-dir", str(tmp_path / "nowhere"), *TINY])
    assert not out.exists()  # refused before the run directory was made


# ----------------------------------------------------------------------------- attacks
def _tiny_model():
    torch.manual_seed(0)
    return models.build_model("digitsnet", 10, in_channels=1, image_size=8)


@pytest.mark.parametrize("which", ["pgd", "trades"])
def test_attacks_stay_in_ball_and_leave_no_trace(which):
    model = _tiny_model()
    model.train()
    model.features.train(False)  # a deliberately mixed state must come back as it was
    flags = [m.training for m in model.modules()]
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    gen = torch.Generator().manual_seed(0)
    rng_before = torch.get_rng_state()
    if which == "pgd":
        x_adv = attacks.pgd_linf(model, x, y, 0.1, 0.03, 5, generator=gen)
    else:
        x_adv = attacks.trades_kl_attack(model, x, 0.1, 0.03, 5, generator=gen)
    assert torch.equal(torch.get_rng_state(), rng_before)  # own generator: global RNG untouched
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert [m.training for m in model.modules()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert not x_adv.requires_grad


def test_attack_restores_mode_on_error():
    model = _tiny_model().train()

    def boom(*a):
        raise RuntimeError("boom")

    model.classifier[2].register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        attacks.pgd_linf(model, torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long), 0.1, 0.03, 2)
    assert model.training and all(m.training for m in model.modules())


def test_pgd_beats_clean_on_undefended_model():
    tr, te, _ = data.load_datasets("digits", train_subset=400, test_subset=200)
    x, y = data.dataset_tensors(tr)
    model = _tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    xt, yt = data.dataset_tensors(te)
    clean = attacks.accuracy(model, xt, yt)
    adv = attacks.accuracy(model, attacks.pgd_linf(model, xt, yt, 0.2, 0.05, 10), yt)
    assert clean > 0.8 and adv < clean - 0.3


# ----------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory):
    """A baseline and a GOT-LM run (2 epochs each) shared by the evaluation/plot tests."""
    root = tmp_path_factory.mktemp("runs")
    rows = {}
    for got in ("none", "lm"):
        rows[got] = train_trades.main(
            ["--out", str(root / got), "--epochs", "2", "--got", got, "--got-beta", "1", *TINY]
        )
    return root, rows


def test_train_trades_writes_run_files(trained_runs):
    root, rows = trained_runs
    for got in ("none", "lm"):
        run = root / got
        for f in ("checkpoint.pt", "model_final.pt", "config.json", "metrics.jsonl", "metrics.csv"):
            assert (run / f).is_file(), f
        lines = _io.read_metrics(run)
        assert [r["epoch"] for r in lines] == [1, 2]
        assert all(_finite_numbers(r) for r in lines)
        assert (run / "metrics.csv").read_text().count("\n") == 3
        ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
        assert ckpt["epoch"] == 2 and {"model", "optimizer", "scheduler", "got", "rng"} <= set(ckpt)
        assert not list(run.glob(".*.tmp"))
        assert lines[-1]["test_clean_acc"] == pytest.approx(_clean_accuracy_of_saved_model(run), abs=1e-12)
    assert "got_value" in rows["lm"] and rows["lm"]["loss_got"] > 0
    assert rows["none"]["loss_got"] == 0


@pytest.mark.parametrize(
    "script,extra",
    [
        (train_pgd, ["--got", "s"]),
        (train_pgd, ["--got", "none", "--clean-weight", "0"]),
        (train_trades, ["--got", "lm", "--got-solver", "dual"]),
    ],
)
def test_training_variants_smoke(tmp_path, script, extra):
    det_before = torch.are_deterministic_algorithms_enabled()
    threads_before = torch.get_num_threads()
    rng_before = torch.get_rng_state()
    row = script.main(["--out", str(tmp_path / "run"), "--epochs", "1", "--got-beta", "1", *TINY, *extra])
    assert _finite_numbers(row)
    # The logged test accuracy is that of the saved model (the last epoch's weights are the final ones).
    assert row["test_clean_acc"] == pytest.approx(_clean_accuracy_of_saved_model(tmp_path / "run"), abs=1e-12)
    # The run's global settings are put back.
    assert torch.are_deterministic_algorithms_enabled() == det_before
    assert torch.get_num_threads() == threads_before
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_meter_leaves_out_a_call_found_non_finite_later():
    """The epoch's diagnostics sums: a call whose diagnostics say not finite (deferred_checks finds such a
    call only at the next call, after the meter has read them) adds nothing, as a skipped call does."""
    import dataclasses
    from types import SimpleNamespace

    from examples._runner import Dist, LastValue, Meter
    from got_reg.functional import GOTConfig, got_forward

    g = torch.Generator().manual_seed(0)
    z, logits = torch.randn(8, 4, generator=g), torch.randn(8, 3, generator=g)
    _, good = got_forward(GOTConfig(beta=1.0), z, z + 0.1, logits, logits + 0.1)
    bad = dataclasses.replace(good, value=torch.tensor(float("nan")), finite=torch.tensor(False))
    reg = SimpleNamespace(diagnostics=good)
    meter = Meter(reg, LastValue(lambda: None))  # type: ignore[arg-type]
    y = torch.arange(8) % 3
    for d in (good, bad):
        reg.diagnostics = d
        meter.update(torch.tensor(1.0), logits, y)
    row = meter.averages(Dist())
    assert row["got_value"] == pytest.approx(good.value.item() / 2) and "got_finite" not in row


def test_refuses_to_clobber_a_run(tmp_path, trained_runs):
    root, _ = trained_runs
    target = tmp_path / "copy"
    shutil.copytree(root / "none", target)
    with pytest.raises(SystemExit, match="--resume"):
        train_trades.main(["--out", str(target), "--epochs", "1", *TINY])


@pytest.mark.parametrize("solver", ["sinkhorn", "dual"])
def test_resume_is_bitwise_identical(tmp_path, solver):
    args = ["--got", "lm", "--got-beta", "1", "--got-solver", solver, *TINY]
    train_trades.main(["--out", str(tmp_path / "full"), "--epochs", "2", *args])
    train_trades.main(["--out", str(tmp_path / "split"), "--epochs", "1", *args])
    train_trades.main(["--out", str(tmp_path / "split"), "--epochs", "2", "--resume", *args])
    full, split = _io.read_metrics(tmp_path / "full"), _io.read_metrics(tmp_path / "split")
    assert _strip_time(full) == _strip_time(split)
    a = torch.load(tmp_path / "full" / "model_final.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "model_final.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _corrupt(kind: str, ckpt: Path) -> None:
    if kind == "truncated":  # e.g. copied while written, or a full disk
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    elif kind == "other pickle":
        torch.save({"step": 3}, ckpt)
    elif kind == "state dict":  # model_final.pt copied over checkpoint.pt
        torch.save(torch.load(ckpt, weights_only=True)["model"], ckpt)
    else:  # a checkpoint without its RNG state
        state = torch.load(ckpt, weights_only=True)
        del state["rng"]
        torch.save(state, ckpt)


@pytest.mark.parametrize(
    "kind,says",
    [
        ("truncated", "torch.load failed"),
        ("other pickle", "lacks epoch, model"),
        ("state dict", "lacks epoch"),
        ("no rng", "lacks rng"),
    ],
)
def test_resume_from_a_corrupt_checkpoint_says_how_to_recover(tmp_path, trained_runs, kind, says):
    """Issue 13, item 14: a bare EOFError / KeyError: 'rng' became a message naming the file and the way out."""
    root, _ = trained_runs
    run = tmp_path / "run"
    shutil.copytree(root / "none", run)
    ckpt = run / "checkpoint.pt"
    _corrupt(kind, ckpt)
    args = ["--out", str(run), "--epochs", "3", "--got", "none", "--got-beta", "1", *TINY]
    with pytest.raises(SystemExit) as err:
        train_trades.main([*args, "--resume"])
    message = str(err.value)
    assert str(ckpt) in message and says in message and f"rm {ckpt}" in message and "--overwrite" in message
    # Both ways out work: --overwrite starts afresh, and so does --resume once the file is deleted.
    assert train_trades.main([*args, "--overwrite"])["epoch"] == 3
    ckpt.unlink()
    assert train_trades.main([*args, "--resume"])["epoch"] == 3
    assert [r["epoch"] for r in _io.read_metrics(run)] == [1, 2, 3]


def test_sigkill_mid_epoch_then_resume(tmp_path):
    out = tmp_path / "killed"
    cmd = _module(
        "train_trades",
        "--out",
        out,
        "--epochs",
        "40",
        "--train-subset",
        "512",
        "--test-subset",
        "48",
        "--num-steps",
        "3",
        "--eval-pgd-steps",
        "1",
        "--threads",
        "1",
        "--quiet",
        "--got",
        "lm",
        "--got-beta",
        "1",
    )
    proc = subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + HANG  # not a timing check: only a guard against a hung child
        while not (out / "checkpoint.pt").exists():
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.time() < deadline, f"no checkpoint after {HANG} s"
            time.sleep(0.05)
        time.sleep(0.3)  # well inside the next epoch
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)  # never torn: written atomically
    done = ckpt["epoch"]
    assert 1 <= done < 40
    assert not (out / "model_final.pt").exists()
    model, _ = evaluate.load_run(out, torch.device("cpu"), "checkpoint")  # a killed run can be evaluated
    assert not model.training
    resume = cmd[:]
    resume[resume.index("--epochs") + 1] = str(done + 2)
    subprocess.run(resume + ["--resume"], env=ENV, cwd=REPO, check=True, capture_output=True, timeout=HANG)
    rows = _io.read_metrics(out)
    assert [r["epoch"] for r in rows] == list(range(1, done + 3))
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == done + 2
    assert (out / "model_final.pt").is_file()


def test_torchrun_two_processes(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun not found next to the interpreter")
    out = tmp_path / "ddp"
    cmd = [
        str(torchrun),
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "examples.train_trades",
        "--out",
        str(out),
        "--epochs",
        "1",
        "--got",
        "lm",
        "--got-beta",
        "1",
        *TINY,
    ]
    res = subprocess.run(
        cmd, env=dict(ENV, OMP_NUM_THREADS="1"), cwd=REPO, capture_output=True, text=True, timeout=HANG
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = _io.read_metrics(out)
    assert len(rows) == 1 and _finite_numbers(rows[0]) and rows[0]["loss_got"] > 0
    assert rows[0]["test_clean_acc"] == pytest.approx(_clean_accuracy_of_saved_model(out), abs=1e-12)


def test_init_weights_fine_tunes_from_an_earlier_run(tmp_path, trained_runs):
    root, _ = trained_runs
    start = torch.load(root / "none" / "model_final.pt", weights_only=True)
    # Zero epochs of fine-tuning leave exactly the weights it started from (a fresh init would differ).
    train_trades.main(
        ["--out", str(tmp_path / "ft0"), "--epochs", "0", "--init-weights", str(root / "none" / "checkpoint.pt"), *TINY]
    )
    same = torch.load(tmp_path / "ft0" / "model_final.pt", weights_only=True)
    assert all(torch.equal(start[k], same[k]) for k in start)
    row = train_trades.main(
        [
            "--out",
            str(tmp_path / "ft"),
            "--epochs",
            "1",
            "--got",
            "lm",
            "--got-beta",
            "1",
            "--init-weights",
            str(root / "none" / "model_final.pt"),
            *TINY,
        ]
    )
    assert _finite_numbers(row) and row["loss_got"] > 0
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["init_weights"].endswith("model_final.pt")
    with pytest.raises(SystemExit, match="no file"):
        train_trades.main(
            ["--out", str(tmp_path / "bad"), "--epochs", "1", "--init-weights", str(tmp_path / "missing.pt"), *TINY]
        )
    torch.save({"step": 3}, tmp_path / "junk.pt")
    with pytest.raises(SystemExit, match="no model state dict"):
        train_trades.main(
            ["--out", str(tmp_path / "bad2"), "--epochs", "1", "--init-weights", str(tmp_path / "junk.pt"), *TINY]
        )


# ----------------------------------------------------------------------------- devices (issue 13, item 11)
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_a_gpu_fails_before_anything_is_created(tmp_path, trained_runs):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=NO_CUDA) as err:
        train_trades.main(["--out", str(out), "--epochs", "1", "--device", "cuda", *TINY])
    assert "--device cuda" in str(err.value) and "use --device cpu" in str(err.value)
    assert not out.exists()
    root, _ = trained_runs
    with pytest.raises(SystemExit, match=NO_CUDA):
        evaluate.main([str(root / "lm"), "--device", "cuda", "--aa-n", "0", "--quiet"])
    with pytest.raises(SystemExit, match="not a device name"):
        train_trades.main(["--out", str(out), "--epochs", "1", "--device", "gpu0", *TINY])


def test_evaluate_maps_a_gpu_checkpoint_to_this_machine(tmp_path, trained_runs, monkeypatch):
    """Weights saved on a GPU (their storages tagged cuda:0) evaluate on the default device here."""
    import torch.serialization as serialization

    root, _ = trained_runs
    run = tmp_path / "gpu-run"
    run.mkdir()
    shutil.copy(root / "lm" / "config.json", run / "config.json")
    state = torch.load(root / "lm" / "model_final.pt", weights_only=True)
    with monkeypatch.context() as m:
        m.setattr(serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(state, run / "model_final.pt")
    if not torch.cuda.is_available():  # what a plain torch.load does with it here
        with pytest.raises(RuntimeError, match="deserialize object on a CUDA device"):
            torch.load(run / "model_final.pt", weights_only=True)
    model, _ = evaluate.load_run(run, evaluate.pick_device(None))
    assert all(torch.equal(p.cpu(), state[k]) for k, p in model.state_dict().items())


# ----------------------------------------------------------------------------- evaluation
def test_evaluate_writes_report(trained_runs):
    root, _ = trained_runs
    run = root / "lm"
    rng_before = torch.get_rng_state()
    res = evaluate.main(
        [
            str(run),
            "--aa-n",
            "12",
            "--pgd-steps",
            "5",
            "10",
            "--eps-sweep",
            "0",
            "0.15",
            "0.5",
            "--sweep-steps",
            "5",
            "--threads",
            "1",
            "--quiet",
        ]
    )
    assert torch.equal(torch.get_rng_state(), rng_before)  # AutoAttack reseeds inside a forked RNG
    saved = json.loads((run / "eval.json").read_text())
    assert saved["clean_acc"] == res["clean_acc"] == pytest.approx(_clean_accuracy_of_saved_model(run), abs=1e-12)
    aa = saved["autoattack"]
    assert 0 <= aa["robust_acc"] <= aa["clean_acc"] <= 1 and aa["n"] == 12
    assert set(aa["stages"]) <= set(evaluate.AA_ATTACKS) and "square" in aa["alone"]
    assert [s["eps"] for s in saved["eps_sweep"]] == [0.0, 0.15, 0.5]
    assert saved["eps_sweep"][0]["acc"] == saved["clean_acc"]  # eps = 0 is no attack
    md = (run / "eval.md").read_text()
    assert md == report.eval_report(res)
    assert "PGD-10" in md and "AutoAttack" in md and "square alone" in md
    assert (run / "eps_sweep.png").stat().st_size > 1000
    # --tag writes beside the untagged files instead of over them; no sweep, no plot.
    # --test-subset 0 lifts the run's training-time --test-subset (48 here) to the whole test set.
    # --aa-breakdown none still records the standard run's stages (free), with no attack run alone.
    tagged = evaluate.main(
        [
            str(run),
            "--tag",
            "t1",
            "--aa-n",
            "8",
            "--aa-breakdown",
            "none",
            "--pgd-steps",
            "3",
            "--eps-sweep",
            "--test-subset",
            "0",
            "--n",
            "60",
            "--quiet",
        ]
    )
    assert tagged["n"] == 60 and saved["n"] == 48
    assert "apgd-ce" in tagged["autoattack"]["stages"] and "alone" not in tagged["autoattack"]
    assert json.loads((run / "eval-t1.json").read_text())["pgd"] == tagged["pgd"]
    assert json.loads((run / "eval.json").read_text())["clean_acc"] == res["clean_acc"]
    assert (run / "eval-t1.md").is_file() and not (run / "eps_sweep-t1.png").exists()
    assert set(report.read_run(run)["evals"]) == {"", "t1"}
    with pytest.raises(ValueError, match="--tag"):
        evaluate.main([str(run), "--tag", "../x", "--aa-n", "0", "--quiet"])
    # Issue 13, item 13 on the evaluation side: the run is digits, so --data-dir is refused, not ignored.
    with pytest.raises(ValueError, match="bundled"):
        evaluate.main([str(run), "--data-dir", "/nowhere", "--aa-n", "0", "--quiet"])


def test_evaluate_on_a_missing_run_directory_says_what_it_needs(tmp_path):
    """Issue 13, item 12: a raw FileNotFoundError for config.json became a message."""
    missing = tmp_path / "no-such-run"
    with pytest.raises(SystemExit) as err:
        evaluate.main([str(missing), "--aa-n", "0", "--quiet"])
    message = str(err.value)
    assert f"no run directory {missing}" in message and "config.json" in message and "model_final.pt" in message
    assert f"python -m examples.train_trades --out {missing}" in message
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("")
    with pytest.raises(SystemExit, match=r"no config.json in it \(it holds notes.txt\)"):
        evaluate.main([str(tmp_path / "empty"), "--aa-n", "0", "--quiet"])


def test_sanity_checks_flag_masking():
    fake = {
        "pgd": {"20": 0.5, "40": 0.6},
        "eps_sweep": [{"eps": 0.0, "acc": 0.9}, {"eps": 0.3, "acc": 0.5}, {"eps": 0.5, "acc": 0.45}],
        "autoattack": {"robust_acc": 0.5, "alone": {"apgd-ce": 0.5, "square": 0.3}},
    }
    warnings = evaluate.sanity_checks(fake, majority_rate=0.1, n=1000)
    text = " ".join(warnings)
    assert "PGD-40" in text and "GRADIENT MASKING" in text and "Square alone" in text
    ok = {"pgd": {"20": 0.5, "40": 0.5}, "eps_sweep": [{"eps": 0.0, "acc": 0.9}, {"eps": 0.5, "acc": 0.0}]}
    assert evaluate.sanity_checks(ok, majority_rate=0.1, n=1000) == []


def test_report_table_and_labels():
    assert report.table(["a", "b"], [[1, ""], ["x", 2.5]]) == "| a | b |\n|---|---|\n| 1 |  |\n| x | 2.5 |"
    assert report.mean_std([]) == "—" and report.mean_std([1.0]) == "1.0" and report.mean_std([1.0, 3.0]) == "2.0 ± 1.4"
    cfg = {
        "loss": "trades",
        "got": "lm",
        "got_beta": 1.0,
        "got_theta": 0.1,
        "got_lam": 10.0,
        "model": "smallcnn",
        "got_layer": "classifier.4",
        "got_solver": "dual",
    }
    assert report.run_label(cfg) == "GOT-TRADES-LM (β = 1, λ = 10, dual)"
    assert report.run_label({"loss": "pgd", "got": "none"}) == "PGD-AT"


# ----------------------------------------------------------------------------- figures (issue 13, item 15)
def test_eps_sweep_figure_keeps_coinciding_curves_apart():
    import matplotlib.pyplot as plt

    sweep = [{"eps": e, "acc": a} for e, a in ((0.0, 0.9), (0.1, 0.5), (0.2, 0.0))]
    fig = evaluate.sweep_figure({"A": sweep, "B": list(sweep), "C": list(sweep)}, chance=0.1, train_eps=0.1)
    try:
        ax = fig.axes[0]
        curves = [line for line in ax.get_lines() if line.get_label() in ("A", "B", "C")]
        assert len(curves) == 3
        assert all(torch.equal(torch.tensor(c.get_ydata()), torch.tensor(curves[0].get_ydata())) for c in curves)
        styles = {(c.get_marker(), c.get_linestyle()) for c in curves}
        assert len(styles) == 3  # each curve its own marker and line style
        assert all(c.get_markerfacecolor() == "none" for c in curves)  # hollow: the one drawn last hides none
        sizes = [c.get_markersize() for c in curves]
        assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 3  # smaller ones inside larger ones
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert legend[:3] == ["A", "B", "C"] and "majority class" in legend and "training eps" in legend
    finally:
        plt.close(fig)


def test_latent_figure_has_a_colour_key_for_the_classes():
    import matplotlib.pyplot as plt

    rng = torch.Generator().manual_seed(0)
    y = torch.tensor([0, 1, 2, 3, 7, 9, 1, 2]).numpy()
    panels = [
        {
            "title": t,
            "clean": torch.rand(8, 2, generator=rng).numpy(),
            "adv": torch.rand(8, 2, generator=rng).numpy(),
            "y": y,
        }
        for t in ("TRADES", "GOT")
    ]
    fig = plot_latent.latent_figure(panels, steps=20)
    try:
        legend = fig.legends[0]
        labels = [t.get_text() for t in legend.get_texts()]
        assert labels == ["clean", "PGD-20", "0", "1", "2", "3", "7", "9"]
        cmap = plt.get_cmap("tab10")
        for handle, label in zip(legend.legend_handles[2:], labels[2:]):
            assert tuple(handle.get_color()) == tuple(cmap(int(label)))
        # The scatter points have the colours the key gives their class.
        clean = fig.axes[0].collections[0]
        assert [tuple(c[:3]) for c in clean.get_facecolors()] == [tuple(cmap(int(c))[:3]) for c in y]
    finally:
        plt.close(fig)


def test_adversarial_neighbour_agreement():
    z = torch.tensor([[0.0, 0.0], [0.5, 0.0], [10.0, 10.0], [10.5, 10.0]])
    y = torch.tensor([0, 0, 1, 1])
    assert plot_latent.adversarial_neighbour_agreement(z, z + 0.1, y) == 1.0  # own pair excluded
    assert plot_latent.adversarial_neighbour_agreement(z, z.flip(0), y) == 0.0


def _agreement_oracle(run: Path, n: int, steps: int) -> float:
    """adv-NN agreement recomputed by hand: own forward hook, the same PGD draws, a plain nearest-neighbour loop."""
    model, cfg = evaluate.load_run(run, torch.device("cpu"))
    x, y = evaluate.load_test_set(cfg, n)
    x_adv = attacks.pgd_linf(
        model, x, y, cfg["epsilon"], cfg["step_size"], steps, generator=torch.Generator().manual_seed(0)
    )
    feats = []
    handle = model.get_submodule(cfg["got_layer"]).register_forward_hook(lambda m, i, o: feats.append(o.flatten(1)))
    with torch.no_grad():
        model(x), model(x_adv)
    handle.remove()
    z_clean, z_adv = feats[0].double(), feats[1].double()
    hits = 0
    for i in range(len(y)):
        j = min(((z_adv[i] - z_clean[j]).pow(2).sum().item(), j) for j in range(len(y)) if j != i)[1]
        hits += int(y[j] == y[i])
    return hits / len(y)


def test_plot_latent(trained_runs, tmp_path):
    root, _ = trained_runs
    path = plot_latent.main(
        [str(root / "none"), str(root / "lm"), "--n", "30", "--steps", "3", "--out", str(tmp_path / "latent.png")]
    )
    assert path.stat().st_size > 1000
    scores = json.loads(path.with_suffix(".json").read_text())
    assert set(scores) == {str(root / "none"), str(root / "lm")}
    for run in ("none", "lm"):
        assert scores[str(root / run)]["adv_nn_agreement"] == pytest.approx(
            _agreement_oracle(root / run, 30, 3), abs=1e-12
        )


def test_main_pipeline_smoke(tmp_path):
    out = tmp_path / "digits"
    res = subprocess.run(
        _module(
            "main",
            "--out",
            out,
            "--epochs",
            "1",
            "--train-subset",
            "96",
            "--test-subset",
            "40",
            "--aa-n",
            "8",
            "--latent-n",
            "30",
            "--eps-sweep",
            "0",
            "0.5",
            "--extra",
            "--num-steps",
            "2",
            "--eval-pgd-steps",
            "2",
        ),
        env=ENV,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=HANG,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "| TRADES |" in res.stdout and "| GOT-TRADES-LM |" in res.stdout
    for f in ("summary.md", "summary.json", "eps_sweep.png", "latent_tsne.png"):
        assert (out / f).is_file(), f
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["evals"]) == {"trades", "got-trades-lm"}
    in_order = {name: summary["evals"][name] for name in ("trades", "got-trades-lm")}  # the JSON's keys are sorted
    assert summary["table"] == report.comparison_table(in_order) and summary["table"] in res.stdout


def test_no_path_hacks_in_examples_and_scripts():
    """examples/ is a package run with `python -m`; neither it nor scripts/ patch sys.path."""
    files = [
        *(REPO / "examples").glob("*.py"),
        *(REPO / "scripts").glob("*"),
        *(REPO / "studies" / "mnist_1epoch").glob("*.*"),
    ]
    offenders = [
        f.name
        for f in files
        if f.is_file() and ("sys.path.insert" in f.read_text() or "__package__ in" in f.read_text())
    ]
    assert offenders == []
