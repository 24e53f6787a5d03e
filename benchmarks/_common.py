"""Shared helpers for the benchmark scripts: machine description, timing, adversarial-like data."""
from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable, List

import torch


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"{dev}, Python {platform.python_version()}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], repeats: int, device: torch.device, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in seconds over ``repeats`` runs, after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: List[float] = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def adversarial_batch(B: int, D: int, M: int, device: torch.device, seed: int = 0, near: bool = True):
    """Clean features/logits and an adversarial-like copy (near-diagonal plan), or an unrelated cloud."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    z = torch.randn(B, D, generator=g).abs()  # post-ReLU-like
    lg = 3 * torch.randn(B, M, generator=g)
    if near:
        za = (z + 0.3 * torch.randn(B, D, generator=g)).clamp_min(0)
        lga = lg + 0.5 * torch.randn(B, M, generator=g)
    else:
        za, lga = torch.randn(B, D, generator=g).abs(), 3 * torch.randn(B, M, generator=g)
    y = torch.randint(0, M, (B,), generator=g)
    return [t.to(device) for t in (z, za, lg, lga, y)]
