"""Shared helpers for the benchmark scripts: machine description, timing, memory, data, a float64 reference."""
from __future__ import annotations

import math
import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Optional

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


def load() -> str:
    """1/5/15-minute load averages (other jobs on a shared machine inflate and spread the timings)."""
    try:
        return "load average " + " / ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "load average unknown"


def set_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def times(fn: Callable[[], object], repeats: int, device: torch.device, warmup: int = 1) -> List[float]:
    """Wall times of ``fn`` in seconds over ``repeats`` runs, after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    out: List[float] = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t)
    return out


def median_time(fn: Callable[[], object], repeats: int, device: torch.device, warmup: int = 1) -> float:
    return statistics.median(times(fn, repeats, device, warmup))


# -- memory (CPU: torch's allocations are invisible to tracemalloc; read the kernel's RSS high-water mark) --
def _status() -> Dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                k, v = line.split(":", 1)
                out[k] = int(v.split()[0])  # kB
    return out


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0: write 5 to clear_refs); False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_extra_mb(fn: Callable[[], object]) -> float:
    """Peak resident memory of ``fn`` above the RSS just before it, in MB (run in a fresh process)."""
    reset = reset_peak_rss()
    before = _status()
    fn()
    after = _status()
    base = before["VmRSS"] if reset else before["VmHWM"]
    return (after["VmHWM"] - base) / 1024


# -- data --------------------------------------------------------------------------------------------
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


# -- float64 reference -----------------------------------------------------------------------------
@torch.no_grad()
def newton_reference(cost: torch.Tensor, theta: float, mask: Optional[torch.Tensor] = None,
                     tol: float = 1e-13, max_newton: int = 60):
    r"""W_θ and its plan in float64 to ~machine precision: Newton's method on the semi-dual.

    Sinkhorn converges sublinearly-looking on near-diagonal plans (θ = 0.1 against a cost spread ~ 20:
    ~60 000 iterations for an L1 marginal error of 1e-6 at B = 128), so a "tight Sinkhorn" reference is
    out of reach at large B. With scaled potentials u (rows) and their c-transform
    g_j = −log Σ_i a_i exp(u_i − C_ij/θ), the semi-dual S(u) = <a, u> + <b, g> is concave with gradient
    a − P1 and Hessian −(diag(P1) − P diag(1/b) Pᵀ), P_ij = a_i b_j exp(u_i + g_j − C_ij/θ). Newton steps
    (dense solve, a 1e-12/B ridge for the constant direction of each label block) with backtracking,
    from a Sinkhorn start at tol 1e-3, reach an L1 marginal error ~1e-15 in 3–10 steps.
    Returns (value, plan, newton_steps, l1_marginal_error).
    """
    from got_reg.solvers import solve_sinkhorn

    C = cost.detach().double()
    if mask is not None:
        C = C.masked_fill(~mask, math.inf)
    B, Bp = C.shape
    la, lb = -math.log(B), -math.log(Bp)
    M = -C / theta
    v = solve_sinkhorn(cost.detach().double(), theta, mask, tol=1e-3, warn=False).log_v
    u = -torch.logsumexp(M + v[None, :], 1) - lb

    def objective(u):
        g = -torch.logsumexp(M + u[:, None], 0) - la
        return float(u.mean() + g.mean()), g

    S, g = objective(u)
    a = torch.full((B,), 1.0 / B, dtype=C.dtype, device=C.device)
    k = 0
    for k in range(max_newton):
        P = torch.exp(M + u[:, None] + g[None, :] + (la + lb))
        r = P.sum(1)
        grad = a - r
        if float(grad.abs().sum()) <= tol:
            break
        H = torch.diag(r) - (P * Bp) @ P.T
        H.diagonal().add_(1e-12 / B)
        d = torch.linalg.solve(H, grad)
        t = 1.0
        while True:
            S2, g2 = objective(u + t * d)
            if S2 >= S - 1e-15 or t < 1e-6:
                break
            t *= 0.5
        u, S, g = u + t * d, S2, g2
    P = torch.exp(M + u[:, None] + g[None, :] + (la + lb))
    err = float(torch.maximum((P.sum(1) - 1.0 / B).abs().sum(), (P.sum(0) - 1.0 / Bp).abs().sum()))
    return theta * S, P, k, err
