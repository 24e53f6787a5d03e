"""Everything around the training loops of ``train_trades.py`` / ``train_pgd.py`` that is not the loss.

``Run`` is a context manager: it checks the device, seeds, builds data, model, GOT regulariser,
optimiser and schedule, joins a ``torchrun`` group, resumes from ``checkpoint.pt``, and at the end
of every epoch evaluates, writes the metrics files and a checkpoint.  The loops only see::

    with Run(args) as run:
        for epoch in run.epochs():
            for x, y in run.batches(epoch):
                ...loss...; loss = loss + run.got(logits_clean, logits_adv, y)
                loss.backward(); run.optimizer.step(); run.meter.update(loss, logits_clean, y, **parts)
            run.scheduler.step()
            run.end_epoch(epoch)

On CPU a run is a deterministic function of ``--seed`` and a resumed run is bit-identical to an
uninterrupted one: every random stream the run draws from (torch, numpy, python ``random``, the
loader's shuffling generator; one set per rank) is saved in the checkpoint, and the per-epoch
test PGD draws from its own generator so that evaluating never perturbs training.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from ._io import (
    CHECKPOINT,
    CONFIG,
    FINAL_MODEL,
    atomic_torch_save,
    load_checkpoint,
    load_model_weights,
    read_metrics,
    remove_stale_temp_files,
    write_json,
    write_metrics,
)
from .attacks import accuracy, pgd_linf
from .common import make_got
from .data import dataset_tensors, load_datasets
from .models import build_model

# Flags that may change between the original run and a --resume of it.
RESUMABLE_CHANGES = {"resume", "overwrite", "epochs", "quiet", "device", "out", "num_workers", "threads"}


# ----------------------------------------------------------------------------- device
def pick_device(name: str | None, local_rank: int = 0, distributed: bool = False) -> torch.device:
    """``--device`` as a ``torch.device``, checked before anything is created (default: cuda if available).

    Under ``torchrun`` a bare ``cuda`` means each process's own GPU, ``cuda:LOCAL_RANK``.
    """
    if not name:
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise SystemExit(f"--device {name}: not a device name ({exc}); use cpu, cuda or cuda:N") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(
                f"--device {name}: no CUDA device is available on this machine "
                "(torch.cuda.is_available() is False); use --device cpu"
            )
        if device.index is None and distributed:
            device = torch.device("cuda", local_rank)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SystemExit(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                f"cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )
    return device


# ----------------------------------------------------------------------------- RNG and global settings
def rng_state(loader_generator: torch.Generator | None) -> dict[str, Any]:
    """All RNG state a run consumes, as tensors / plain types (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }
    if loader_generator is not None:
        state["loader"] = loader_generator.get_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], loader_generator: torch.Generator | None) -> None:
    torch.set_rng_state(state["torch"])
    npk = state["numpy"]
    np.random.set_state(
        ("MT19937", npk["keys"].numpy().astype(np.uint32), npk["pos"], npk["has_gauss"], npk["cached_gaussian"])
    )
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
def restored_rng() -> Iterator[None]:
    """The run seeds the global RNGs; the caller gets its own state back afterwards."""
    caller = rng_state(None)
    try:
        yield
    finally:
        set_rng_state(caller, None)


@contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """``torch.use_deterministic_algorithms`` for the duration of a run, then the caller's setting.

    ``warn_only`` so an op without a deterministic kernel warns instead of aborting the run.
    """
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
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
def num_threads(n: int | None) -> Iterator[None]:
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

    def sum(self, values: list[float]) -> list[float]:
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def gather_objects(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- per-epoch numbers
def no_got(logits_clean: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The baseline's GOT term (``--got none``): zero, so the loops have one code path."""
    return torch.zeros((), device=y.device)


class LastValue:
    """Calls ``fn`` and keeps its last result, so that the loops can add the GOT term in one line
    (``loss = loss + got(...)``) and the metrics still log it as ``loss_got``."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.last: torch.Tensor | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.last = self.fn(*args, **kwargs)
        return self.last


class Meter:
    """Sums of the loss parts, the GOT term and its diagnostics, and the training accuracy over one epoch.

    The sums stay float64 tensors on the run's device, read once per epoch in :meth:`averages`: a
    per-step ``.item()`` would make every training step wait for the GPU (and starve runs sharing one).
    """

    def __init__(self, regularizer: nn.Module | None, got: LastValue) -> None:
        self.regularizer = regularizer
        self.got = got
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.diag_sums: dict[tuple[str, ...], torch.Tensor] = {}  # by field names: same_label_mass is LM only
        self.batches = self.seen = 0
        self.correct: torch.Tensor | None = None

    def _add(self, key: str, value: torch.Tensor) -> None:
        v = value.detach().to(torch.float64).reshape(())
        self.sums[key] = v if key not in self.sums else self.sums[key] + v

    def update(self, loss: torch.Tensor, logits_clean: torch.Tensor, y: torch.Tensor, **parts: torch.Tensor) -> None:
        """After ``optimizer.step()``: the batch's ``loss``, its clean logits and labels, the loss parts by name."""
        self.batches += 1
        self.seen += len(y)
        correct = (logits_clean.detach().argmax(1) == y).sum()
        self.correct = correct if self.correct is None else self.correct + correct
        for k, v in {"loss": loss, **parts, "loss_got": self.got.last}.items():
            if v is not None:
                self._add(k, v)
        diagnostics = getattr(self.regularizer, "diagnostics", None)
        if diagnostics is not None:
            names, values = diagnostics.numbers()  # one vector: a few kernels a step, not two per field
            # Not `finite` itself: a call with NaN raised or was skipped, or (deferred_checks) is found so at the
            # next call, having returned zero; it adds nothing here either.
            names, values = names[:-1], torch.where(values[-1] > 0, values[:-1], 0)
            key = tuple(f"got_{k}" for k in names)
            self.diag_sums[key] = values if key not in self.diag_sums else self.diag_sums[key] + values

    def averages(self, d: Dist) -> dict[str, float]:
        """Epoch means over all ranks: the loss parts per batch, ``train_acc`` per example (one host read)."""
        sums = dict(self.sums)
        for names, vector in self.diag_sums.items():
            sums.update(zip(names, vector.unbind()))
        keys = sorted(sums)
        local = [float(v) for v in torch.stack([sums[k].cpu() for k in keys]).tolist()] if keys else []
        correct = int(self.correct) if self.correct is not None else 0
        totals = d.sum(local + [self.batches, self.seen, correct])
        batches = max(totals[-3], 1)
        row = {k: totals[i] / batches for i, k in enumerate(keys)}
        row["train_acc"] = totals[-1] / max(totals[-2], 1)
        return row


@torch.no_grad()
def test_accuracy(
    model: nn.Module, test_x: torch.Tensor, test_y: torch.Tensor, args, epoch: int, device: torch.device
) -> dict[str, float]:
    """Clean accuracy and a cheap PGD (training eps/step, ``--eval-pgd-steps``) on the test set.

    Its own seeded generator keeps the global RNG stream -- and hence training -- independent of
    whether or how often this runs.
    """
    gen = torch.Generator(device=device).manual_seed(10_000 * args.seed + epoch)
    correct_clean = correct_adv = 0
    for i in range(0, len(test_x), args.test_batch_size):
        x = test_x[i : i + args.test_batch_size].to(device)
        y = test_y[i : i + args.test_batch_size].to(device)
        x_adv = pgd_linf(model, x, y, args.epsilon, args.step_size, args.eval_pgd_steps, generator=gen)
        correct_clean += accuracy(model, x, y) * len(x)
        correct_adv += accuracy(model, x_adv, y) * len(x)
    n = max(len(test_x), 1)
    return {"test_clean_acc": correct_clean / n, f"test_pgd{args.eval_pgd_steps}_acc": correct_adv / n}


def lr_of_epoch(args: argparse.Namespace, epoch: int) -> float:
    """Learning rate used during ``epoch`` (1-based), as TRADES' ``adjust_learning_rate``."""
    return args.lr * 0.1 ** sum(epoch >= e for e in args.lr_schedule)


def check_resume_config(out: Path, args: argparse.Namespace) -> None:
    path = out / CONFIG
    if not path.exists():
        return
    old = json.loads(path.read_text())
    diff = {
        k: (old.get(k), v) for k, v in vars(args).items() if k not in RESUMABLE_CHANGES and k in old and old.get(k) != v
    }
    if diff:
        raise SystemExit(f"--resume: these flags differ from {path}: {diff}")


# ----------------------------------------------------------------------------- the run
class Run:
    """One training run (see the module docstring); attributes the loops use:

    ``model`` (DDP-wrapped under ``torchrun``), ``attack_model`` (the bare network: attacks need no
    gradient synchronisation), ``got`` (the regulariser, or ``no_got`` for the baseline, which returns
    zero; either way its last value is logged as ``loss_got``),
    ``optimizer``, ``scheduler``, ``meter``; ``last`` holds the last epoch's metrics (rank 0).
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.ckpt_path = self.out / CHECKPOINT
        self.last: dict[str, Any] = {}
        self._stack = ExitStack()

    # -- set-up ---------------------------------------------------------------------------
    def __enter__(self) -> Run:
        args, stack = self.args, self._stack
        self.d = Dist()
        self.device = pick_device(args.device, self.d.local_rank, self.d.enabled)  # before anything is created
        self.d.init(self.device)
        stack.callback(self.d.close)
        stack.enter_context(restored_rng())
        stack.enter_context(deterministic_algorithms(args.deterministic))
        stack.enter_context(num_threads(args.threads))
        try:
            self._prepare_directory()
            # The same seed on every rank: DDP broadcasts rank 0's weights anyway, and anything else
            # initialised from the global RNG (e.g. a lazily built dual potential) must agree across
            # ranks.  Ranks then draw the same attack noise and dropout masks, applied to different images.
            seed_all(args.seed)
            self._build_data()
            self._build_model()
            self.start_epoch = 1
            self.rows: list[dict[str, Any]] = self._resume() if self.resuming else []
            if self.d.is_main:
                write_json(self.out / CONFIG, {**vars(args), "data": asdict(self.info)})
        except BaseException:
            self._stack.close()
            raise
        self.last = self.rows[-1] if self.rows else {}
        return self

    def _prepare_directory(self) -> None:
        args = self.args
        if self.d.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.ckpt_path.exists() and not (args.resume or args.overwrite):
                raise SystemExit(
                    f"{self.ckpt_path} exists: pass --resume to continue it or --overwrite to start afresh"
                )
            remove_stale_temp_files(self.out)
        self.d.barrier()
        self.resuming = args.resume and self.ckpt_path.exists()
        if self.resuming:  # every rank checks, so none is left waiting in a collective if it fails
            check_resume_config(self.out, args)

    def _build_data(self) -> None:
        args, d = self.args, self.d
        train_set, test_set, self.info = load_datasets(args.dataset, args.data_dir, args.train_subset, args.test_subset)
        self.loader_gen = torch.Generator().manual_seed(args.seed)
        if d.enabled:
            self.sampler = DistributedSampler(train_set, d.world_size, d.rank, shuffle=True, seed=args.seed)
            self.loader = DataLoader(
                train_set, batch_size=args.batch_size, sampler=self.sampler, num_workers=args.num_workers
            )
        else:
            self.sampler = None
            self.loader = DataLoader(
                train_set,
                batch_size=args.batch_size,
                shuffle=True,
                generator=self.loader_gen,
                num_workers=args.num_workers,
            )
        self.test_x, self.test_y = dataset_tensors(test_set)

    def _build_model(self) -> None:
        args, info, device = self.args, self.info, self.device
        model = build_model(args.model, info.num_classes, info.in_channels, info.image_size).to(device)
        if args.init_weights and not self.resuming:  # a resumed run's checkpoint already holds the fine-tuned weights
            model.load_state_dict(load_model_weights(args.init_weights, device))
        self.attack_model = model
        self.model = model
        if self.d.enabled:
            ids = [device.index] if device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.regularizer = make_got(args, model, self.d.world_size)
        if self.regularizer is not None:
            self.regularizer.to(device)
        self.got = LastValue(self.regularizer if self.regularizer is not None else no_got)
        self.meter = Meter(self.regularizer, self.got)
        self.optimizer = torch.optim.SGD(
            model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
        )
        # TRADES' adjust_learning_rate uses lr*0.1 for `epoch >= e` (1-based); MultiStepLR stepped
        # after each epoch reaches that with milestone e-1.
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, [e - 1 for e in args.lr_schedule], gamma=0.1
        )

    def _resume(self) -> list[dict[str, Any]]:
        ckpt = load_checkpoint(self.ckpt_path, self.device)
        self.attack_model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.regularizer is not None and ckpt.get("got") is not None:
            self.regularizer.load_state_dict(ckpt["got"])
        states = ckpt["rng"]
        set_rng_state(states[self.d.rank] if self.d.rank < len(states) else states[0], self.loader_gen)
        self.start_epoch = int(ckpt["epoch"]) + 1
        if self.d.is_main and not self.args.quiet:
            print(f"resumed from {self.ckpt_path} after epoch {ckpt['epoch']}", flush=True)
        # Epochs after the checkpoint (written just before a crash) are re-run, so drop them.
        return [r for r in read_metrics(self.out) if r["epoch"] < self.start_epoch]

    # -- the epoch loop -------------------------------------------------------------------
    def epochs(self) -> Iterator[int]:
        for epoch in range(self.start_epoch, self.args.epochs + 1):
            self._t0 = time.time()
            self.meter.reset()
            yield epoch

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's training batches on the run's device (with a progress bar on a terminal)."""
        from tqdm.auto import tqdm

        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        hide = self.args.quiet or not sys.stderr.isatty() or not self.d.is_main
        for x, y in tqdm(self.loader, desc=f"epoch {epoch}/{self.args.epochs}", disable=hide, leave=False):
            yield x.to(self.device), y.to(self.device)

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        """Metrics row (all ranks' averages; test accuracy on rank 0), metrics files and checkpoint."""
        d = self.d
        if self.regularizer is not None:
            self.regularizer.check()  # the epoch's last call, where its flags are read at the next (deferred_checks)
        row: dict[str, Any] = {"epoch": epoch, "lr": lr_of_epoch(self.args, epoch), **self.meter.averages(d)}
        # The training loop's own time (averages() has waited for the device): without the test below.
        row["train_time_s"] = round(time.time() - self._t0, 3)
        if d.is_main:
            row.update(test_accuracy(self.attack_model, self.test_x, self.test_y, self.args, epoch, self.device))
        row["epoch_time_s"] = round(time.time() - self._t0, 3)
        rng = d.gather_objects(rng_state(self.loader_gen))
        if d.is_main:
            self.rows.append(row)
            write_metrics(self.out, self.rows)
            atomic_torch_save(self._checkpoint(epoch, rng), self.ckpt_path)
            self._print(row)
        d.barrier()
        self.last = row
        return row

    def _checkpoint(self, epoch: int, rng: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "model": self.attack_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "got": self.regularizer.state_dict() if self.regularizer is not None else None,
            "rng": rng,
            "args": dict(vars(self.args)),
        }

    def _print(self, row: dict[str, Any]) -> None:
        if not self.args.quiet:
            shown = ", ".join(
                f"{k}={v:.4g}"
                for k, v in row.items()
                if k != "epoch" and isinstance(v, float) and not k.startswith("got_")
            )
            print(f"epoch {row['epoch']}: {shown}", flush=True)

    # -- tear-down ------------------------------------------------------------------------
    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                if self.d.is_main:
                    atomic_torch_save(self.attack_model.state_dict(), self.out / FINAL_MODEL)
                if self.regularizer is not None:
                    self.regularizer.remove()
                self.d.barrier()
            elif self.regularizer is not None:
                self.regularizer.remove()
            if not self.d.is_main:
                self.last = {}
        finally:
            self._stack.close()
