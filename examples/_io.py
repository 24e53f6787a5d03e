"""Files of a run directory: crash-safe writes, metrics files, and checkpoints that say what is wrong.

A run directory (``--out``) holds ``config.json`` (all flags), ``metrics.jsonl`` / ``metrics.csv``
(one row per epoch), ``checkpoint.pt`` (every epoch) and ``model_final.pt`` (the state dict).
Everything ``torch.save``-d here holds tensors and plain types only, so it loads with
``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from contextlib import suppress
from pathlib import Path
from typing import Any

import torch

CHECKPOINT = "checkpoint.pt"
FINAL_MODEL = "model_final.pt"
CONFIG = "config.json"
CHECKPOINT_KEYS = ("epoch", "model", "optimizer", "scheduler", "rng")

PathLike = str | Path


# ----------------------------------------------------------------------------- atomic writes
def _fsync_dir(path: Path) -> None:
    with suppress(OSError):  # not supported on every platform / filesystem
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
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


def remove_stale_temp_files(out: Path) -> None:
    """Half-written temp files of a killed run (the complete files they were replacing are intact)."""
    for stale in Path(out).glob(".*.tmp"):
        stale.unlink()


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def write_json(path: PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


# ----------------------------------------------------------------------------- metrics
def write_metrics(out: PathLike, rows: list[dict[str, Any]]) -> None:
    """Rewrite ``metrics.jsonl`` and ``metrics.csv`` from ``rows`` (one dict per epoch)."""
    out = Path(out)
    atomic_write_bytes(out / "metrics.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(out / "metrics.csv", buf.getvalue().encode())


def read_metrics(out: PathLike) -> list[dict[str, Any]]:
    path = Path(out) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- checkpoints
def _unreadable(path: Path, what: str, recover: str) -> SystemExit:
    return SystemExit(f"{path} is not a checkpoint written by examples.train_trades / train_pgd: {what}. {recover}")


def load_checkpoint(path: PathLike, device: torch.device, recover: str = "") -> dict[str, Any]:
    """The dict in ``checkpoint.pt``, or a ``SystemExit`` naming the file and what is wrong with it.

    A file cut short (disk full, copied while written), something else saved under that name, or a
    checkpoint without the keys a resume needs all end here instead of as a bare ``EOFError`` /
    ``KeyError`` deep inside the run.  ``recover`` says what the caller can do about it.
    """
    path = Path(path)
    recover = recover or (
        f"Delete it (rm {path}) and run again: --resume then starts afresh; "
        "or pass --overwrite instead of --resume to start afresh in the same directory."
    )
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # EOFError, RuntimeError (zip), UnpicklingError (weights_only): all "unreadable"
        raise _unreadable(path, f"torch.load failed with {type(exc).__name__}: {exc}".rstrip(": "), recover) from exc
    if not isinstance(ckpt, dict):
        raise _unreadable(
            path, f"it holds a {type(ckpt).__name__}, expected a dict with keys {', '.join(CHECKPOINT_KEYS)}", recover
        )
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise _unreadable(
            path,
            f"it lacks {', '.join(missing)} (has: {', '.join(map(str, ckpt)) or 'nothing'}); "
            f"expected {', '.join(CHECKPOINT_KEYS)}",
            recover,
        )
    return ckpt


def load_model_weights(path: PathLike, device: torch.device, flag: str = "--init-weights") -> dict[str, torch.Tensor]:
    """The model state dict in ``path``: a ``model_final.pt`` (a state dict) or a ``checkpoint.pt``."""
    path = Path(path)
    expected = f"expected an earlier run's {FINAL_MODEL} or {CHECKPOINT}"
    if not path.is_file():
        raise SystemExit(f"{flag}: no file {path} ({expected})")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise SystemExit(f"{flag}: cannot read {path} ({type(exc).__name__}: {exc}); {expected}") from exc
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SystemExit(f"{flag}: {path} holds no model state dict ({expected})")
    return state
