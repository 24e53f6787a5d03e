"""Kernel launches and host reads of one got(...) call and its backward: what a launch-bound GPU step pays.

    python -m benchmarks.bench_launches                       # counts (CUDA path, see below) + CPU times; ~1 min
    python -m benchmarks.bench_launches --device cuda --out DIR   # counts and CUDA-event times on a GPU
    python -m benchmarks.bench_launches --quick --out /tmp/l      # smoke run

At B = 128 a GOT call is microseconds of arithmetic on a GPU: its time there is one host dispatch and one
kernel launch per ATen operator, plus a stall at every host read. Both counts are properties of the code,
not of the machine, so they can be measured without a GPU:

* kernels: ATen operators dispatched by got(...) (the regulariser module in training mode past its warm-up,
  on features and logits held as leaves, as in bench_overhead's isolated call) and by its share of
  ``loss.backward()``, per call: the mean over 5 consecutive calls, one of which the collapse monitor samples
  (its cross-entropy: 4 kernels); counted with a
  ``TorchDispatchMode``; views, metadata and allocations (``empty``) launch nothing and are not counted. A
  Triton kernel counts as one launch.
* host reads: ``bool``/``float``/``int``/``item``/``tolist``/``numpy``/``nonzero``/boolean indexing on a tensor,
  counted with a ``TorchFunctionMode``: each is one host synchronisation on a GPU.

On a CPU the counts follow the CUDA path of the default solver at B ≤ 256, where every Sinkhorn solve of a
call runs in one launch of the fused Triton kernel: the same kernel runs here through Triton's interpreter
(``TRITON_INTERPRET=1``, set by this script), called through the solver's own CUDA glue
(``got_reg.solvers.sinkhorn._fused_many``); the joint cost takes its Triton kernels the same way
(``got_reg.costs._triton_cosine_kl``, its gate widened to CPU tensors while counting); and the exponent
floor of ``got_reg.solvers.lse`` (a CPU speed measure, which adds operators to each plan) is switched off
while counting, as on a GPU. Without Triton the CPU counts follow the torch loop (which scales with the
iterations) and the table says so.

Times (median of ``--repeats`` calls after warm-up; perf_counter on CPU, CUDA events on a GPU): got(...) with
its backward on the real path of the device (the torch loop on CPU), and the joint cost of the debiased call
alone (the stacked 2B × 2B cost of cosine + KL, forward and backward), at the ``--batch`` sizes. On CPU the
smallest size (B = 16, D = 64) is dispatch-bound like a GPU at B = 128: its time is mostly the host's.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections import Counter
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks._common import (
    Span,
    adversarial_batch,
    describe,
    environment,
    fmt,
    load,
    md_table,
    median,
    set_threads,
    sync,
    write_outputs,
)
from got_reg import hooks, regularizer

BETA, THETA, CLASSES = 10.0, 0.1, 10
VARIANTS: dict[str, dict[str, Any]] = {
    "+GOT-S": dict(),
    "+GOT-LM": dict(label_matching=True),
    "+GOT-LM dual": dict(label_matching=True, solver="dual"),
    "+GOT-LM debias=False": dict(label_matching=True, debias=False),
}
# Timed on CUDA only (on CPU they would run eagerly); not counted: a replay launches one graph, whose kernels
# the dispatch mode would see only while capturing.
GRAPH_VARIANTS: dict[str, dict[str, Any]] = {
    "+GOT-S cuda_graphs": dict(cuda_graphs=True),
    "+GOT-LM cuda_graphs": dict(label_matching=True, cuda_graphs=True),
    "+GOT-LM dual cuda_graphs": dict(label_matching=True, solver="dual", cuda_graphs=True),
}
# ATen operators that launch no kernel: views, metadata, allocations.
NO_KERNEL = {
    "view", "_unsafe_view", "t", "transpose", "expand", "select", "slice", "alias", "unsqueeze", "squeeze",
    "detach", "as_strided", "permute", "reshape", "_reshape_alias", "unbind", "split", "chunk", "lift_fresh",
    "diagonal", "empty", "empty_like", "empty_strided", "promote_types", "scalar_tensor", "result_type",
    "is_nonzero", "_record_function_enter_new", "_record_function_exit", "sym_size", "sym_stride", "sym_numel",
    "sym_storage_offset", "_has_compatible_shallow_copy_type",
}  # fmt: skip
READS = {"__bool__", "__float__", "__int__", "__index__", "item", "tolist", "numpy", "nonzero", "masked_select"}


class Kernels(TorchDispatchMode):
    """Counts ATen operators that launch a kernel, by name; ``paused`` skips the ones inside a Triton launch."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.paused and name not in NO_KERNEL:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


class Reads(TorchFunctionMode):
    """Counts the Python-level calls that read a tensor on the host (one synchronisation each on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0
        self.paused = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if not self.paused:
            if name in READS:
                self.n += 1
            elif name == "__getitem__" and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool
                for i in (args[1] if isinstance(args[1], tuple) else (args[1],))
            ):
                self.n += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counting():
    """Both counters, with got-reg's Triton entry points wrapped so that each call counts as one launch."""
    from got_reg.costs import _cosine_kl
    from got_reg.solvers import lse
    from got_reg.solvers.lse import triton_module

    kernels, reads = Kernels(), Reads()
    tri = triton_module()
    saved: list[tuple[Any, str, Any]] = []

    def patch(module: Any, name: str, value: Any) -> None:
        saved.append((module, name, getattr(module, name)))
        setattr(module, name, value)

    # The GPU branches of exp_plan and the dual's row softmax: no exponent floor (a CPU speed measure only;
    # the values are the same).
    patch(lse, "exp_floor", lambda x: None)
    entries = []
    if tri is not None:
        from got_reg.costs import _triton_cosine_kl as cost_kernels

        entries = [(tri, "sinkhorn_fused"), (tri, "row_lse"), (cost_kernels, "prep"), (cost_kernels, "post")]
        if cost_kernels.INTERPRET:
            # The cost's CUDA branch on CPU tensors (its kernels under the interpreter), as for the solve.
            patch(_cosine_kl, "_KERNEL_DEVICES", ("cuda", "cpu"))
    for module, name in entries:
        fn = getattr(module, name)

        def launch(*args, _fn=fn, **kw):
            kernels.paused = reads.paused = True
            try:
                return _fn(*args, **kw)
            finally:
                kernels.paused = reads.paused = False
                kernels.ops["<triton>"] += 1

        patch(module, name, launch)
    try:
        with kernels, reads:
            yield kernels, reads
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)


def interpreted_fused_backend():
    """The default backend with the CUDA branch taken on CPU tensors (the fused kernel under the interpreter)."""
    from got_reg.solvers import sinkhorn as S
    from got_reg.solvers.lse import triton_module

    tri = triton_module()
    if tri is None or not getattr(tri, "INTERPRET", False):
        return None

    class InterpretedFused(S.TorchSinkhorn):
        name = "torch"

        def solve(self, cost, theta, mask, *, max_iter, tol):
            return self.solve_many(cost[None], theta, mask, max_iter=max_iter, tol=tol)[0]

        @torch.no_grad()
        def solve_many(self, costs, theta, mask, *, max_iter, tol):
            return S._fused_many(tri, S._masked(costs, mask), theta, max_iter, tol)

    return InterpretedFused()


def leaves_and_call(variant: dict[str, Any], data, device, backend=None):
    """A closure running got(...) on held leaves and backpropagating, through the regulariser module."""
    from benchmarks.bench_overhead import Replay
    from got_reg import GOTRegularizer

    z, za, lg, lga, y = data
    replay = Replay().to(device)
    kw = dict(variant)
    if backend is not None:
        kw["backend"] = backend
    got = GOTRegularizer(replay, "feat", beta=BETA, theta=THETA, **kw)
    # As in training after the warm-up: the collapse monitor adds its cross-entropy to one call in _SAMPLE
    # (and one host read per window of calls, which the calls here do not reach).
    got._calls = regularizer._WARMUP
    leaves = [t.clone().requires_grad_(True) for t in (z, za, lg, lga)]
    # Past the hooks' learning too: after CLEAN_FORWARDS forwards per mode they stop copying the layer output
    # of a model that leaves it alone (a training run gets there within its first ten TRADES steps).
    with torch.no_grad():
        for _ in range(hooks.CLEAN_FORWARDS):
            replay(z, lg)

    def forward():
        for t in leaves:
            t.grad = None
        oc, oa = replay(leaves[0], leaves[2]), replay(leaves[1], leaves[3])
        return got(oc, oa, y)

    return forward


def cost_call(data):
    """The debiased call's joint cost alone: the stacked 2B × 2B cosine + KL cost, forward and backward."""
    from got_reg.costs import JointCost

    z, za, lg, lga, _ = data
    cost = JointCost()
    za, lga = za.clone().requires_grad_(True), lga.clone().requires_grad_(True)
    w = torch.rand(2 * z.shape[0], 2 * z.shape[0], device=z.device)

    def forward():
        za.grad = lga.grad = None
        zs, ls = torch.cat([z, za]), torch.cat([lg, lga])
        return (cost(zs, zs, ls, ls) * w).sum()

    return forward


def count(forward, calls: int = 1) -> dict[str, Any]:
    """Kernels and host reads per call, the mean over ``calls`` consecutive calls (each with its backward)."""
    forward().backward()  # warm-up: lazy builds (the dual's φ), kernel compilation
    fwd: Counter = Counter()
    fwd_reads = 0
    with counting() as (kernels, reads):
        for _ in range(calls):
            before, reads_before = Counter(kernels.ops), reads.n
            loss = forward()
            fwd += kernels.ops - before
            fwd_reads += reads.n - reads_before
            loss.backward()
    total = kernels.ops
    mean = lambda c: round(sum(c.values()) / calls, 2)  # noqa: E731
    return dict(
        calls=calls,
        kernels_fwd=mean(fwd),
        kernels_bwd=mean(total - fwd),
        kernels=mean(total),
        triton=total["<triton>"] / calls,
        reads_fwd=fwd_reads / calls,
        reads=reads.n / calls,
        ops={k: round(v / calls, 2) for k, v in total.most_common()},
    )


def timed(forward, device, repeats: int, warmup: int) -> float:
    span = Span(device)
    times = []
    for i in range(warmup + repeats):
        sync(device)
        span.start()
        forward().backward()
        span.stop()
        if i >= warmup:
            times.append(span.ms())
    return median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--quick", action="store_true", help="B = 16 only, 3 repeats: the smoke test")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1; 0: torch's default)")
    p.add_argument("--batch", type=int, nargs="+", default=[16, 128], help="B of the timed calls (D = 4·B)")
    p.add_argument("--count-batch", type=int, default=128, help="B of the counted call (≤ 256: the fused path)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per cell (default 50 GPU, 20 CPU)")
    p.add_argument("--out", default="benchmarks/results", help="folder for NAME.md and NAME.json")
    p.add_argument("--name", default=None, help="file name (default launches_gpu / launches_cpu, _quick with --quick)")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cpu" and "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported: the kernels decorate for it
    set_threads(a.threads)
    batches = [16] if a.quick else a.batch
    count_batch = 16 if a.quick else a.count_batch
    repeats = a.repeats or (3 if a.quick else 50 if device.type == "cuda" else 20)
    warmup = 1 if a.quick else 3
    name = a.name or f"launches_{'gpu' if device.type == 'cuda' else 'cpu'}{'_quick' if a.quick else ''}"
    env = environment(device)
    t0 = time.perf_counter()

    backend = interpreted_fused_backend() if device.type == "cpu" else None
    path = (
        "the CUDA path: every Sinkhorn solve of a call in one fused launch (here through Triton's interpreter)"
        if device.type == "cuda" or backend is not None
        else "the torch loop (Triton not installed: the counts grow with the iterations, unlike a GPU's)"
    )
    data = adversarial_batch(count_batch, 4 * count_batch, CLASSES, device)
    # Over one cycle of the collapse monitor, which samples one training call in regularizer._SAMPLE.
    cycle = regularizer._SAMPLE
    counts = {v: count(leaves_and_call(cfg, data, device, backend), cycle) for v, cfg in VARIANTS.items()}
    counts["joint cost alone"] = count(cost_call(data))

    timed_variants = {**VARIANTS, **(GRAPH_VARIANTS if device.type == "cuda" else {})}
    times: dict[str, dict[int, float]] = {v: {} for v in [*timed_variants, "joint cost alone"]}
    for B in batches:
        data = adversarial_batch(B, 4 * B, CLASSES, device)
        for v, cfg in timed_variants.items():
            times[v][B] = timed(leaves_and_call(cfg, data, device), device, repeats, warmup)
        times["joint cost alone"][B] = timed(cost_call(data), device, repeats, warmup)
        print(f"B = {B}: " + ", ".join(f"{v} {t[B]:.3g} ms" for v, t in times.items()), flush=True)

    env["load_end"] = load()
    elapsed = (time.perf_counter() - t0) / 60
    md = [
        "# Kernel launches and host reads of got(...) with its backward",
        "",
        f"Machine: {describe(env)}; {elapsed:.1f} min.",
        "",
        f"Counted at B = {count_batch}, D = {4 * count_batch}, {CLASSES} classes (β = {BETA:g}, θ = {THETA:g}, "
        f"every other option at its default), on {path}. Per call with its backward: the mean over {cycle} "
        "consecutive training calls past the warm-up, one of which the collapse monitor samples. 'kernels': ATen "
        "operators that launch a kernel (views and allocations excluded) plus Triton launches; 'host reads': calls "
        "that synchronise with the device on a GPU. `python -m benchmarks.bench_launches` (benchmarks/README.md).",
        "",
    ]
    rows = [
        [v, c["kernels_fwd"], c["kernels_bwd"], c["kernels"], c["triton"], c["reads_fwd"], c["reads"]]
        for v, c in counts.items()
    ]
    md += md_table(
        ["call", "kernels fwd", "kernels bwd", "kernels", "of which Triton", "host reads fwd", "host reads"], rows
    )
    clock = "CUDA events" if device.type == "cuda" else "perf_counter"
    md += [
        "",
        f"## Time of one call with its backward ({clock}, median of {repeats}, D = 4·B, {device.type}'s own path)",
        "",
    ]
    md += md_table(
        ["call"] + [f"B = {B} ms" for B in batches], [[v] + [fmt(t[B]) for B in batches] for v, t in times.items()]
    )
    md += ["", "## Operators per call", ""]
    md += md_table(
        ["call", "operators (count)"],
        [[v, ", ".join(f"{k} {n}" for k, n in c["ops"].items())] for v, c in counts.items()],
    )
    path_md = write_outputs(
        a.out,
        name,
        md,
        dict(env=env, args=vars(a), path=path, counts=counts, times_ms={v: t for v, t in times.items()}),
    )
    print("\n".join(md))
    print(f"wrote {path_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
