"""Shared helpers of the benchmark scripts: environment, timing, host-sync counting, data, the SmallCNN
setup, a float64 reference solve, and the table/JSON writers."""

from __future__ import annotations

import importlib
import json
import math
import os
import platform
import statistics
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

# -- environment -------------------------------------------------------------------------------------


def optional_version(module: str) -> str | None:
    """The version of an optional package, or None if it does not import (missing or broken)."""
    try:
        mod = importlib.import_module(module)
    except Exception:  # ImportError, or a broken install
        return None
    return str(getattr(mod, "__version__", "unknown version"))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load() -> str:
    """1/5/15-minute load averages (other jobs on a shared machine inflate and spread the timings)."""
    try:
        return " / ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "unknown"


def environment(device: torch.device) -> dict[str, Any]:
    """What the numbers depend on: device, versions, and whether got-reg's Triton kernels are in use."""
    import got_reg
    from got_reg.solvers.lse import triton_module

    cuda = device.type == "cuda"
    return dict(
        device=torch.cuda.get_device_name(device) if cuda else "cpu",
        device_type=device.type,
        cpu=cpu_name(),
        cores=os.cpu_count(),
        threads=torch.get_num_threads(),
        python=platform.python_version(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        triton=optional_version("triton"),
        triton_kernels=bool(cuda and triton_module() is not None),
        got_reg=got_reg.__version__,
        pot=optional_version("ot"),
        geomloss=optional_version("geomloss"),
        load_start=load(),
    )


def describe(env: dict[str, Any]) -> str:
    """One line for the head of a table."""
    dev = env["device"] if env["device_type"] == "cuda" else f"CPU only ({env['cpu']}, {env['cores']} cores)"
    tri = "used" if env["triton_kernels"] else "not used"
    return (
        f"{dev}; torch {env['torch']} ({env['threads']} CPU threads), CUDA {env['cuda']}, triton {env['triton']} "
        f"(got-reg's Triton kernels {tri}), POT {env['pot'] or 'not installed'}, GeomLoss "
        f"{env['geomloss'] or 'not installed'}, Python {env['python']}, got-reg {env['got_reg']}; load average "
        f"{env['load_start']} at the start, {env.get('load_end', '?')} at the end"
    )


def set_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- timing ------------------------------------------------------------------------------------------


class Span:
    """Elapsed time of a region, in ms: CUDA events on a GPU (read after a synchronisation), else perf_counter.

    ``start()``/``stop()`` enqueue events and never synchronise, so a span can sit inside a training step.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._t0 = self._t1 = 0.0
        if self.cuda:
            self._e0 = torch.cuda.Event(enable_timing=True)
            self._e1 = torch.cuda.Event(enable_timing=True)

    def start(self) -> None:
        if self.cuda:
            self._e0.record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            self._e1.record()
        else:
            self._t1 = time.perf_counter()

    def ms(self) -> float:
        if self.cuda:
            self._e1.synchronize()
            return float(self._e0.elapsed_time(self._e1))
        return 1e3 * (self._t1 - self._t0)


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """One call in ms, from an idle device: synchronise, then events (GPU) or perf_counter (CPU) around it."""
    sync(device)
    span = Span(device)
    span.start()
    fn()
    span.stop()
    return span.ms()


def time_calls(
    fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1, budget_s: float = math.inf
) -> list[float]:
    """Times (ms) of up to ``repeats`` calls after ``warmup`` untimed ones; stops early (after at least one
    timed call) once the timed calls have taken ``budget_s`` seconds."""
    for _ in range(warmup):
        fn()
    out: list[float] = []
    for _ in range(max(1, repeats)):
        out.append(time_once(fn, device))
        if sum(out) / 1e3 > budget_s:
            break
    return out


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def quartiles(v: Sequence[float]) -> tuple[float, float]:
    if len(v) < 2:
        return v[0], v[0]
    q = statistics.quantiles(v, n=4)
    return q[0], q[2]


class Deadline:
    """A soft time limit for a whole script: work not started by then is reported as skipped."""

    def __init__(self, seconds: float) -> None:
        self.t0 = time.perf_counter()
        self.seconds = seconds if seconds and seconds > 0 else math.inf

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def passed(self) -> bool:
        return self.elapsed() > self.seconds


# -- host synchronisations -------------------------------------------------------------------------


class SyncCount:
    """Counts host synchronisations on CUDA inside a ``with`` block, through torch's sync debug mode.

    ``torch.cuda.set_sync_debug_mode("warn")`` makes every synchronising CUDA call (``.item()``,
    ``float(t)``, ``.tolist()``, blocking copies between host and device, ``nonzero``, ...) warn; the
    warnings are recorded and counted, with the Python line that made each one, and the previous mode is
    restored on exit. On CPU ``n`` stays None ("n/a").
    """

    MESSAGE = "synchronizing CUDA operation"

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.n: int | None = None
        self.where: Counter = Counter()

    def __enter__(self) -> SyncCount:
        if self.cuda:
            self._prev = torch.cuda.get_sync_debug_mode()
            self._rec = warnings.catch_warnings(record=True)
            self._log = self._rec.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self.cuda:
            return
        torch.cuda.set_sync_debug_mode(self._prev)
        self._rec.__exit__(*exc)
        hits = [w for w in self._log if self.MESSAGE in str(w.message)]
        self.n = len(hits)
        root = str(Path(__file__).resolve().parents[1]) + os.sep
        self.where = Counter(f"{str(w.filename).replace(root, '')}:{w.lineno}" for w in hits)

    def top(self, k: int = 3) -> str:
        return ", ".join(f"{loc} ×{n}" for loc, n in self.where.most_common(k))


# -- data ------------------------------------------------------------------------------------------


def adversarial_batch(B: int, D: int, M: int, device: torch.device, seed: int = 0, near: bool = True):
    """Clean features/logits and an adversarial-like copy (near-diagonal plan), or an unrelated cloud.

    Returns z, z_adv (B, D), logits, logits_adv (B, M), y (B,) on ``device``.
    """
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


# -- the MNIST SmallCNN of the overhead and relaxation benchmarks ----------------------------------


def smallcnn(device: torch.device):
    """TRADES' MNIST SmallCNN from ``examples.models`` and the layer GOT hooks on it."""
    from examples.models import build_model, default_layer

    return build_model("smallcnn", 10, in_channels=1, image_size=28).to(device), default_layer("smallcnn")


def mnist_or_random(data_dir: str | None):
    """("MNIST", tensors) from the examples' loader, or ("random", ...) images of the same shape when the
    files are missing (default place: ``../shared/data/mnist`` beside the checkout)."""
    from examples.data import load_mnist_tensors

    try:
        return "MNIST", load_mnist_tensors(Path(data_dir) if data_dir else None)
    except (FileNotFoundError, OSError, ValueError) as e:
        print(f"no MNIST ({e}); timing on random 28×28 inputs", flush=True)
        g = torch.Generator().manual_seed(0)
        x, y = torch.rand(2048, 1, 28, 28, generator=g), torch.randint(0, 10, (2048,), generator=g)
        return "random 28×28 inputs (MNIST files not found)", (x, y, x, y)


def pretrain(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, device: torch.device, batch=128):
    """Clean cross-entropy Adam steps, so that the features separate the classes as in a real run (an
    untrained network maps every input to nearly the same features: an easy transport problem)."""
    import torch.nn.functional as F

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x[idx].to(device)), y[idx].to(device)).backward()
        opt.step()


def got_problems(device: torch.device, batch_sizes: Sequence[int], batches: int, data_dir: str | None, steps: int):
    """(data name, generator) of the GOT transport problems of a briefly trained SmallCNN.

    The SmallCNN is trained for ``steps`` clean Adam steps; then for each B and each of ``batches`` test
    batches, TRADES' attack (PGD-10, ε = 0.3) gives the adversarial batch and ``FeatureCapture`` the
    features of the default layer. Yields (B, k, costs, y), ``costs`` the cosine + KL costs
    {"cross", "clean-clean", "adv-adv"} of one GOT call with debias=True, y the clean labels.
    """
    from examples.attacks import trades_kl_attack
    from got_reg import FeatureCapture
    from got_reg.functional import joint_cost

    torch.manual_seed(0)
    model, layer = smallcnn(device)
    data, (xtr, ytr, xte, yte) = mnist_or_random(data_dir)
    pretrain(model, xtr, ytr, steps, device)
    model.eval()

    def gen():
        with FeatureCapture(model, layer) as capture:
            for B in batch_sizes:
                for k in range(batches):
                    x, y = xte[k * B : (k + 1) * B].to(device), yte[k * B : (k + 1) * B].to(device)
                    xa = trades_kl_attack(model, x, 0.3, 0.01, 10)
                    with torch.no_grad():
                        lg, lga = model(x), model(xa)
                        z, za = capture.lookup(lg), capture.lookup(lga)
                    costs = {
                        "cross": joint_cost(z, za, lg, lga),
                        "clean-clean": joint_cost(z, z, lg, lg),
                        "adv-adv": joint_cost(za, za, lga, lga),
                    }
                    yield B, k, costs, y

    return data, gen()


# -- float64 reference -----------------------------------------------------------------------------


@torch.no_grad()
def newton_reference(
    cost: torch.Tensor, theta: float, mask: torch.Tensor | None = None, tol: float = 1e-13, max_newton: int = 60
):
    r"""W_θ and its plan in float64 to ~machine precision: Newton's method on the semi-dual, on cost's device.

    Sinkhorn converges slowly on the near-diagonal plans of adversarial pairs (θ = 0.1 against a cost
    spread ~ 20: tens of thousands of plain sweeps for an L1 marginal error of 1e-6 at B = 128), so a
    "tight Sinkhorn" reference is out of reach at large B. With scaled potentials u (rows) and their
    c-transform g_j = −log Σ_i a_i exp(u_i − C_ij/θ), the semi-dual S(u) = <a, u> + <b, g> is concave with
    gradient a − P1 and Hessian −(diag(P1) − P diag(1/b) Pᵀ), P_ij = a_i b_j exp(u_i + g_j − C_ij/θ).
    Newton steps (dense solve, a 1e-12/B ridge for the constant direction of each label block) with
    backtracking, from got-reg's Sinkhorn at tol 1e-3, reach an L1 marginal error ~1e-15 in 3–10 steps.
    Returns (value, plan, newton_steps, l1_marginal_error).
    """
    from got_reg.solvers import solve_sinkhorn

    C = cost.detach().double()
    if mask is not None:
        C = C.masked_fill(~mask, math.inf)
    B, Bp = C.shape
    la, lb = -math.log(B), -math.log(Bp)
    M = -C / theta
    start = solve_sinkhorn(cost.detach().double(), theta, mask, tol=1e-3, warn=False)
    v = start.potentials[1] / theta  # type: ignore[index]
    u = -torch.logsumexp(M + v[None, :], 1) - lb

    def objective(u):
        g = -torch.logsumexp(M + u[:, None], 0) - la
        return float(u.mean() + g.mean()), g

    S, g = objective(u)
    a = torch.full((B,), 1.0 / B, dtype=C.dtype, device=C.device)
    k = 0
    for k in range(max_newton):  # noqa: B007 (k is reported)
        P = torch.exp(M + u[:, None] + g[None, :] + (la + lb))
        r = P.sum(1)
        grad = a - r
        if float(grad.abs().sum()) <= tol:
            break
        H = torch.diag(r) - (P * Bp) @ P.T
        del P
        H.diagonal().add_(1e-12 / B)
        d = torch.linalg.solve(H, grad)
        del H
        if not bool(torch.isfinite(d).all()):
            break  # the caller sees the marginal error it reached
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


# -- output ----------------------------------------------------------------------------------------


def fmt(x: Any, spec: str = ".3g") -> str:
    """A table cell: '' for None, floats with ``spec``, anything else as str."""
    if x is None:
        return ""
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return format(x, spec) if math.isfinite(x) else str(x)
    return str(x)


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(c if isinstance(c, str) else fmt(c) for c in r) + " |" for r in rows]
    return lines


def write_outputs(out_dir: str, name: str, markdown: list[str], data: dict[str, Any]) -> Path:
    """``out_dir/name.md`` and ``out_dir/name.json``; returns the .md path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    md = out / f"{name}.md"
    md.write_text("\n".join(markdown) + "\n")
    return md
