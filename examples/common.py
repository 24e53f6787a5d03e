"""Plumbing shared by ``train_trades.py`` and ``train_pgd.py``.

The two scripts only define their loss (the reference loss plus one GOT line) and call
``run_training(args, train_step)``.  Everything else lives here: flags and per-dataset defaults,
seeding and determinism, data loaders, the optional ``torch.distributed`` (gloo) set-up, the
epoch loop with metrics, and crash-safe checkpoints that resume bit-for-bit on CPU.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import sys
import tempfile
import time
from contextlib import contextmanager, suppress
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

if __package__ in (None, ""):  # run as `python examples/train_trades.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from attacks import accuracy, pgd_linf  # type: ignore  # noqa: E402
    from data import DATASETS, dataset_tensors, load_datasets  # type: ignore  # noqa: E402
    from models import MODEL_NAMES, build_model, default_layer  # type: ignore  # noqa: E402
else:
    from .attacks import accuracy, pgd_linf
    from .data import DATASETS, dataset_tensors, load_datasets
    from .models import MODEL_NAMES, build_model, default_layer

CHECKPOINT = "checkpoint.pt"
FINAL_MODEL = "model_final.pt"
CONFIG = "config.json"

# Per-dataset defaults.  MNIST/CIFAR/SVHN follow the paper's attack settings and the TRADES
# reference optimiser settings; see examples/README.md for where the two differ.  The digits
# settings were chosen by measurement (README: "digits hyper-parameters").
DEFAULTS: Dict[str, Dict[str, Any]] = {
    "digits": dict(model="digitsnet", epochs=20, batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4,
                   lr_schedule=[14, 18], epsilon=0.15, step_size=0.03, num_steps=10, beta_trades=6.0),
    "mnist": dict(model="smallcnn", epochs=100, batch_size=128, lr=0.01, momentum=0.9, weight_decay=0.0,
                  lr_schedule=[55, 75, 90], epsilon=0.3, step_size=0.01, num_steps=40, beta_trades=1.0),
    "cifar10": dict(model="resnet18", epochs=76, batch_size=128, lr=0.1, momentum=0.9, weight_decay=2e-4,
                    lr_schedule=[75, 90, 100], epsilon=8 / 255, step_size=2 / 255, num_steps=10, beta_trades=6.0),
    "cifar100": dict(model="resnet18", epochs=76, batch_size=128, lr=0.1, momentum=0.9, weight_decay=2e-4,
                     lr_schedule=[75, 90, 100], epsilon=8 / 255, step_size=2 / 255, num_steps=10, beta_trades=6.0),
    "svhn": dict(model="resnet18", epochs=76, batch_size=128, lr=0.01, momentum=0.9, weight_decay=2e-4,
                 lr_schedule=[75, 90, 100], epsilon=8 / 255, step_size=2 / 255, num_steps=10, beta_trades=6.0),
}

# Flags that may change between the original run and a --resume of it.
RESUMABLE_CHANGES = {"resume", "overwrite", "epochs", "quiet", "device", "out", "num_workers", "threads"}


# ----------------------------------------------------------------------------- arguments
def number(text: str) -> float:
    """argparse type accepting ``0.03`` as well as ``8/255``."""
    if "/" in text:
        num, den = text.split("/", 1)
        return float(num) / float(den)
    return float(text)


def build_parser(description: str, loss: str) -> argparse.ArgumentParser:
    """Flags of both training scripts; ``loss`` is ``"trades"`` or ``"pgd"``.

    Dataset-dependent flags default to ``None`` and are filled from ``DEFAULTS`` by
    ``resolve_args`` so that ``--dataset mnist`` alone gives the paper's MNIST set-up.
    """
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data and model")
    g.add_argument("--dataset", choices=DATASETS, default="digits")
    g.add_argument("--data-dir", type=str, default=None,
                   help="dataset directory (default: <repo>/../shared/data/<dataset>; digits needs none)")
    g.add_argument("--model", choices=MODEL_NAMES, default=None, help="default: per dataset")
    g.add_argument("--train-subset", type=int, default=None, metavar="N", help="use the first N training points")
    g.add_argument("--test-subset", type=int, default=None, metavar="N", help="use the first N test points")

    g = p.add_argument_group("optimisation (default: per dataset)")
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--test-batch-size", type=int, default=500)
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--momentum", type=float, default=None)
    g.add_argument("--weight-decay", type=float, default=None)
    g.add_argument("--lr-schedule", type=int, nargs="*", default=None, metavar="EPOCH",
                   help="TRADES-style piecewise decay: lr is multiplied by 0.1 from each of these (1-based) epochs on")

    g = p.add_argument_group("attack used for training (default: per dataset)")
    g.add_argument("--epsilon", type=number, default=None, help="L-inf radius, e.g. 0.3 or 8/255")
    g.add_argument("--num-steps", type=int, default=None)
    g.add_argument("--step-size", type=number, default=None)
    if loss == "trades":
        g.add_argument("--beta-trades", type=float, default=None,
                       help="TRADES weight of KL(adv||clean) (the paper's alpha; TRADES ref: 6 CIFAR, 1 MNIST)")
    else:
        g.add_argument("--adv-weight", type=float, default=1.0, help="alpha in alpha*CE(adv) + clean_weight*CE(clean)")
        g.add_argument("--clean-weight", type=float, default=1.0,
                       help="weight of CE(clean); 0 gives Madry's PGD-AT, 1 the paper's form")

    g = p.add_argument_group("GOT regulariser")
    g.add_argument("--got", choices=["none", "s", "lm"], default="none",
                   help="none: baseline; s: plain Sinkhorn (GOT-*-S); lm: label matching (GOT-*-LM)")
    g.add_argument("--got-solver", choices=["sinkhorn", "dual"], default="sinkhorn")
    g.add_argument("--got-beta", type=float, default=10.0, help="weight beta of the Wasserstein term")
    g.add_argument("--got-theta", type=float, default=0.1)
    g.add_argument("--got-lam", type=float, default=1.0)
    g.add_argument("--got-layer", type=str, default=None, help="hooked layer (default: the model's penultimate layer)")

    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=1)
    g.add_argument("--out", type=str, default=None, help="run directory (default: runs/<dataset>-<loss>-got_<got>)")
    g.add_argument("--resume", action="store_true",
                   help="continue from <out>/checkpoint.pt if it exists (else start from scratch)")
    g.add_argument("--overwrite", action="store_true", help="start afresh even if <out> holds a checkpoint")
    g.add_argument("--init-weights", type=str, default=None,
                   help="start from these model weights (an earlier run's model_final.pt or checkpoint.pt) with a "
                        "fresh optimiser and schedule: fine-tuning, e.g. adding GOT to a trained model")
    g.add_argument("--device", type=str, default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--num-workers", type=int, default=0)
    g.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for this run (small models are fastest with 1)")
    g.add_argument("--eval-pgd-steps", type=int, default=10,
                   help="steps of the cheap per-epoch test PGD (training epsilon and step size)")
    g.add_argument("--no-deterministic", dest="deterministic", action="store_false",
                   help="do not call torch.use_deterministic_algorithms(True)")
    g.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    return p


def resolve_args(args: argparse.Namespace, loss: str) -> argparse.Namespace:
    """Fill dataset-dependent ``None`` flags from ``DEFAULTS`` and derive the GOT layer / out dir."""
    for key, value in DEFAULTS[args.dataset].items():
        if hasattr(args, key) and getattr(args, key) is None:
            setattr(args, key, value)
    if args.got_layer is None:
        args.got_layer = default_layer(args.model)
    if args.out is None:
        args.out = str(Path("runs") / f"{args.dataset}-{loss}-got_{args.got}")
    args.loss = loss
    return args


# ----------------------------------------------------------------------------- io helpers
def _fsync_dir(path: Path) -> None:
    with suppress(OSError):  # not supported on every platform / filesystem
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then ``os.replace``: a crash leaves
    either the old or the new file, never a torn one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_torch_save(obj: Any, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_metrics(out: Path, rows: List[Dict[str, Any]]) -> None:
    """Rewrite ``metrics.jsonl`` and ``metrics.csv`` from ``rows`` (one dict per epoch)."""
    atomic_write_bytes(out / "metrics.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())
    fields: List[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(out / "metrics.csv", buf.getvalue().encode())


def read_metrics(out: Path) -> List[Dict[str, Any]]:
    path = Path(out) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- RNG state
def rng_state(loader_generator: Optional[torch.Generator]) -> Dict[str, Any]:
    """All RNG state a run consumes, as tensors / plain types (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }
    if loader_generator is not None:
        state["loader"] = loader_generator.get_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any], loader_generator: Optional[torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    npk = state["numpy"]
    np.random.set_state(("MT19937", npk["keys"].numpy().astype(np.uint32), npk["pos"],
                         npk["has_gauss"], npk["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    if loader_generator is not None and "loader" in state:
        loader_generator.set_state(state["loader"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """``torch.use_deterministic_algorithms`` for the duration of a run, then the caller's setting.

    ``warn_only`` so an op without a deterministic kernel warns instead of aborting the run.
    """
    previous = (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled())
    set_cublas = enabled and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    if set_cublas:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # deterministic cuBLAS needs it
    if enabled:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        if set_cublas:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


@contextmanager
def num_threads(n: Optional[int]) -> Iterator[None]:
    """``torch.set_num_threads(n)`` for the duration of a run (``None``: leave as is)."""
    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ----------------------------------------------------------------------------- distributed
class Dist:
    """Rank / world size of a ``torchrun`` launch (world size 1 when not launched by it)."""

    def __init__(self) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world_size > 1
        self.owns_group = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def init(self, device: torch.device) -> None:
        if self.enabled and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.owns_group = True

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum(self, values: List[float]) -> List[float]:
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def gather_objects(self, obj: Any) -> List[Any]:
        if not self.enabled:
            return [obj]
        out: List[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def pick_device(name: Optional[str], d: Dist) -> torch.device:
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", d.local_rank)
    return torch.device("cpu")


# ----------------------------------------------------------------------------- GOT
def make_got(args: argparse.Namespace, model: nn.Module, world_size: int = 1):
    """The GOT regulariser for ``--got {s,lm}``, or ``None`` for the baseline."""
    if args.got == "none":
        return None
    from got_reg import GOTRegularizer

    kwargs = {"distributed_gather": True} if world_size > 1 else {}
    return GOTRegularizer(model, layer=args.got_layer, beta=args.got_beta, lam=args.got_lam,
                          theta=args.got_theta, feature_cost="cosine", prob_cost="kl",
                          label_matching=(args.got == "lm"), solver=args.got_solver, **kwargs)


def _numeric_diagnostics(got) -> Dict[str, float]:
    if got is None:
        return {}
    out = {}
    for k, v in dict(getattr(got, "diagnostics", {}) or {}).items():
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, (bool, int, float)) and not isinstance(v, str):
            out[f"got_{k}"] = float(v)
    return out


# ----------------------------------------------------------------------------- training
TrainStep = Callable[..., Tuple[torch.Tensor, Dict[str, torch.Tensor], torch.Tensor]]


def _config(args: argparse.Namespace, info) -> Dict[str, Any]:
    cfg = {k: v for k, v in vars(args).items()}
    cfg["data"] = asdict(info)
    return cfg


def _check_resume_config(out: Path, args: argparse.Namespace) -> None:
    path = out / CONFIG
    if not path.exists():
        return
    old = json.loads(path.read_text())
    diff = {k: (old.get(k), v) for k, v in vars(args).items()
            if k not in RESUMABLE_CHANGES and k in old and old.get(k) != v}
    if diff:
        raise SystemExit(f"--resume: these flags differ from {path}: {diff}")


@torch.no_grad()
def _evaluate(model: nn.Module, test_x: torch.Tensor, test_y: torch.Tensor, args, epoch: int,
              device: torch.device) -> Dict[str, float]:
    """Clean accuracy and a cheap PGD (training eps/step, ``--eval-pgd-steps``) on the test set.

    Its own seeded generator keeps the global RNG stream -- and hence training -- independent of
    whether or how often this runs.
    """
    gen = torch.Generator(device=device).manual_seed(10_000 * args.seed + epoch)
    correct_clean = correct_adv = 0
    for i in range(0, len(test_x), args.test_batch_size):
        x = test_x[i:i + args.test_batch_size].to(device)
        y = test_y[i:i + args.test_batch_size].to(device)
        x_adv = pgd_linf(model, x, y, args.epsilon, args.step_size, args.eval_pgd_steps, generator=gen)
        correct_clean += accuracy(model, x, y) * len(x)
        correct_adv += accuracy(model, x_adv, y) * len(x)
    n = max(len(test_x), 1)
    return {"test_clean_acc": correct_clean / n, f"test_pgd{args.eval_pgd_steps}_acc": correct_adv / n}


def run_training(args: argparse.Namespace, train_step: TrainStep) -> Dict[str, Any]:
    """Train with ``train_step`` and return the last epoch's metrics (rank 0; ``{}`` elsewhere).

    ``train_step(model, got, x, y, optimizer, args, attack_model)`` returns
    ``(loss, parts, logits_clean)``; ``run_training`` does ``backward`` and ``step``.
    ``attack_model`` is the bare network (the DDP-wrapped one is ``model``): attacks need no
    gradient synchronisation.
    """
    d = Dist()
    device = pick_device(args.device, d)
    d.init(device)
    caller_rng = rng_state(None)  # the run seeds the global RNGs; the caller gets its own back
    try:
        with deterministic_algorithms(args.deterministic), num_threads(args.threads):
            return _run(args, train_step, d, device)
    finally:
        set_rng_state(caller_rng, None)
        d.close()


def load_model_weights(path: str, device: torch.device) -> Dict[str, torch.Tensor]:
    """The model state dict in ``path``: a ``model_final.pt`` (a state dict) or a ``checkpoint.pt``."""
    if not Path(path).is_file():
        raise SystemExit(f"--init-weights: no file {path} (expected an earlier run's {FINAL_MODEL} or {CHECKPOINT})")
    state = torch.load(path, map_location=device, weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SystemExit(f"--init-weights: {path} holds no model state dict (expected {FINAL_MODEL} or {CHECKPOINT})")
    return state


def _run(args, train_step: TrainStep, d: Dist, device: torch.device) -> Dict[str, Any]:
    from tqdm.auto import tqdm

    out = Path(args.out)
    ckpt_path = out / CHECKPOINT
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if ckpt_path.exists() and not (args.resume or args.overwrite):
            raise SystemExit(f"{ckpt_path} exists: pass --resume to continue it or --overwrite to start afresh")
        for stale in out.glob(".*.tmp"):  # half-written temp files of a killed run
            stale.unlink()
    d.barrier()
    resuming = args.resume and ckpt_path.exists()
    if resuming:  # every rank checks, so none is left waiting in a collective if it fails
        _check_resume_config(out, args)

    # The same seed on every rank: DDP broadcasts rank 0's weights anyway, and anything else
    # initialised from the global RNG (e.g. a lazily built dual potential) must agree across
    # ranks.  Ranks then draw the same attack noise and dropout masks, applied to different images.
    seed_all(args.seed)
    train_set, test_set, info = load_datasets(args.dataset, args.data_dir, args.train_subset, args.test_subset)
    loader_gen = torch.Generator().manual_seed(args.seed)
    if d.enabled:
        sampler = DistributedSampler(train_set, d.world_size, d.rank, shuffle=True, seed=args.seed)
        loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers)
    else:
        sampler = None
        loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, generator=loader_gen,
                            num_workers=args.num_workers)
    test_x, test_y = dataset_tensors(test_set)

    model = build_model(args.model, info.num_classes, info.in_channels, info.image_size).to(device)
    if args.init_weights and not resuming:  # a resumed run's checkpoint already holds the fine-tuned weights
        model.load_state_dict(load_model_weights(args.init_weights, device))
    raw_model = model
    if d.enabled:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    got = make_got(args, raw_model, d.world_size)
    if got is not None:
        got.to(device)
    optimizer = torch.optim.SGD(raw_model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    # TRADES' adjust_learning_rate uses lr*0.1 for `epoch >= e` (1-based); MultiStepLR stepped
    # after each epoch reaches that with milestone e-1.
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [e - 1 for e in args.lr_schedule], gamma=0.1)

    start_epoch, rows = 1, []
    if resuming:
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if got is not None and ckpt.get("got") is not None:
            got.load_state_dict(ckpt["got"])
        states = ckpt["rng"]
        set_rng_state(states[d.rank] if d.rank < len(states) else states[0], loader_gen)
        start_epoch = int(ckpt["epoch"]) + 1
        # Epochs after the checkpoint (written just before a crash) are re-run, so drop them.
        rows = [r for r in read_metrics(out) if r["epoch"] < start_epoch]
        if d.is_main and not args.quiet:
            print(f"resumed from {ckpt_path} after epoch {ckpt['epoch']}", flush=True)
    if d.is_main:
        write_json(out / CONFIG, _config(args, info))

    bars = args.quiet or not sys.stderr.isatty() or not d.is_main
    last: Dict[str, Any] = rows[-1] if rows else {}
    for epoch in range(start_epoch, args.epochs + 1):
        t0 = time.time()
        if sampler is not None:
            sampler.set_epoch(epoch)
        model.train()
        sums: Dict[str, float] = {}
        n_seen = n_correct = n_batches = 0
        for x, y in tqdm(loader, desc=f"epoch {epoch}/{args.epochs}", disable=bars, leave=False):
            x, y = x.to(device), y.to(device)
            loss, parts, logits_clean = train_step(model, got, x, y, optimizer, args, raw_model)
            loss.backward()
            optimizer.step()
            n_batches += 1
            n_seen += len(y)
            n_correct += (logits_clean.detach().argmax(1) == y).sum().item()
            for k, v in {"loss": loss.detach(), **parts}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            for k, v in _numeric_diagnostics(got).items():
                sums[k] = sums.get(k, 0.0) + v
        scheduler.step()

        keys = sorted(sums)
        totals = d.sum([sums[k] for k in keys] + [n_batches, n_seen, n_correct])
        batches = max(totals[-3], 1)
        row: Dict[str, Any] = {"epoch": epoch, "lr": _lr_of_epoch(args, epoch)}
        row.update({k: totals[i] / batches for i, k in enumerate(keys)})
        row["train_acc"] = totals[-1] / max(totals[-2], 1)
        if d.is_main:
            row.update(_evaluate(raw_model, test_x, test_y, args, epoch, device))
        row["epoch_time_s"] = round(time.time() - t0, 3)

        rng = d.gather_objects(rng_state(loader_gen))
        if d.is_main:
            rows.append(row)
            write_metrics(out, rows)
            atomic_torch_save({
                "epoch": epoch,
                "model": raw_model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "got": got.state_dict() if got is not None else None,
                "rng": rng,
                "args": {k: v for k, v in vars(args).items()},
            }, ckpt_path)
            if not args.quiet:
                shown = ", ".join(f"{k}={v:.4g}" for k, v in row.items()
                                  if k != "epoch" and isinstance(v, float) and not k.startswith("got_"))
                print(f"epoch {epoch}: {shown}", flush=True)
        d.barrier()
        last = row

    if d.is_main:
        atomic_torch_save(raw_model.state_dict(), out / FINAL_MODEL)
    if got is not None:
        got.remove()
    d.barrier()
    return last if d.is_main else {}


def _lr_of_epoch(args: argparse.Namespace, epoch: int) -> float:
    """Learning rate used during ``epoch`` (1-based), as TRADES' ``adjust_learning_rate``."""
    return args.lr * 0.1 ** sum(epoch >= e for e in args.lr_schedule)


def main_from(parser: argparse.ArgumentParser, loss: str, train_step: TrainStep,
              argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = resolve_args(parser.parse_args(argv), loss)
    return run_training(args, train_step)
