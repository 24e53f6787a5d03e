"""Where the time of one got(...) call goes when it is host-bound: wall time per call, with the joint cost's
Triton kernels on and off, and the profiler's tables.

    python -m benchmarks.bench_host --device cuda --out DIR     # on a GPU: ~40 s
    python -m benchmarks.bench_host --quick --out /tmp/h        # smoke run (CPU, B = 16)

At B = 128 a GOT call is tens of microseconds of GPU arithmetic, and its time is the host's: Python, the
dispatcher, the autograd engine and one launch per kernel (``bench_launches`` counts them). This script shows
that, and which parts cost what:

* wall time per call with its backward (``perf_counter`` over 30 back-to-back calls, one synchronisation
  after them: 'host' is before it, 'drained' after it; equal numbers mean the GPU waits for the host), for
  the joint cost alone, GOT-S, GOT-LM and the dual eagerly, and all three with ``cuda_graphs=True``; each
  with the cosine + KL Triton kernels of the joint cost on and off (``_cosine_kl._KERNEL_DEVICES``), 5 rounds
  interleaved, medians. On CPU the kernels never run, so one column;
* ``torch.profiler`` tables of 10 calls (by self device time on a GPU, and by self CPU time);
* ``cProfile`` of 20 calls, the Python functions by own time.

Writes ``host_<gpu|cpu>[_quick].md``. B, D, classes and options as in ``bench_launches`` (D = 4·B).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks._common import adversarial_batch, describe, environment, load, set_threads, sync
from benchmarks.bench_launches import CLASSES, GRAPH_VARIANTS, VARIANTS, cost_call, leaves_and_call
from got_reg.costs import _cosine_kl

CALLS = ["joint cost alone", "+GOT-S", "+GOT-LM", "+GOT-LM dual", *GRAPH_VARIANTS]


def closures(data, device: torch.device, names: list[str]) -> dict:
    configs = {**VARIANTS, **GRAPH_VARIANTS}
    return {n: cost_call(data) if n == "joint cost alone" else leaves_and_call(configs[n], data, device) for n in names}


def wall(forward, device: torch.device, calls: int) -> tuple[float, float]:
    """ms per call (with its backward): before the final synchronisation, and after it."""
    sync(device)
    t = time.perf_counter()
    for _ in range(calls):
        forward().backward()
    host = (time.perf_counter() - t) / calls * 1e3
    sync(device)
    return host, (time.perf_counter() - t) / calls * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--batch", type=int, default=128, help="B (default 128; D = 4·B)")
    p.add_argument("--quick", action="store_true", help="B = 16, 2 rounds of 3 calls: the smoke test")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--out", default="benchmarks/results", help="folder for host_<gpu|cpu>[_quick].md")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    set_threads(a.threads)
    cuda = device.type == "cuda"
    B = 16 if a.quick else a.batch
    rounds, calls, prof_calls = (2, 3, 2) if a.quick else (5, 30, 10)
    names = CALLS if cuda else [n for n in CALLS if "cuda_graphs" not in n]  # graphs: CUDA only
    switch = (True, False) if cuda else (False,)  # the cost kernels exist on CUDA only
    env = environment(device)
    data = adversarial_batch(B, 4 * B, CLASSES, device)

    # One set of closures per setting, each warmed (and, with graphs, captured) under that setting.
    sets = {}
    for on in switch:
        _cosine_kl._KERNEL_DEVICES = ("cuda",) if on else ()
        sets[on] = closures(data, device, names)
        for f in sets[on].values():
            for _ in range(3):
                f().backward()
    times: dict = {(n, on): [] for n in names for on in switch}
    for r in range(rounds):
        for n in names:
            for on in switch if r % 2 == 0 else switch[::-1]:
                _cosine_kl._KERNEL_DEVICES = ("cuda",) if on else ()
                times[(n, on)].append(wall(sets[on][n], device, calls))
    _cosine_kl._KERNEL_DEVICES = ("cuda",)

    env["load_end"] = load()

    def med(xs: list[float]) -> str:
        return f"{sorted(xs)[len(xs) // 2]:.3f}"

    head = ["call"] + [
        f"{'kernels on' if on else 'kernels off' if cuda else 'CPU'}: {what} ms"
        for on in switch
        for what in ("host", "drained")
    ]
    md = [
        "# Where the host time of one got(...) call goes",
        "",
        f"Machine: {describe(env)}.",
        "",
        f"B = {B}, D = {4 * B}, {CLASSES} classes, options as in bench_launches. Wall time per call with its "
        f"backward: median over {rounds} interleaved rounds of {calls} back-to-back calls; 'host' before the final "
        "synchronisation, 'drained' after it. 'kernels on/off': the joint cost's cosine + KL Triton kernels "
        "(CUDA only). `python -m benchmarks.bench_host` (benchmarks/README.md).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for n in names:
        cells = [c for on in switch for c in (med([t[0] for t in times[(n, on)]]), med([t[1] for t in times[(n, on)]]))]
        md.append(f"| {n} | " + " | ".join(cells) + " |")
    print("\n".join(md[-len(names) - 2 :]), flush=True)

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    on = switch[0]
    for n in [x for x in ("joint cost alone", "+GOT-LM", "+GOT-LM cuda_graphs") if x in names]:
        f = sets[on][n]
        with profile(activities=acts) as prof:
            for _ in range(prof_calls):
                f().backward()
            sync(device)
        table = prof.key_averages()
        md += ["", f"## {n}: torch.profiler over {prof_calls} calls", ""]
        for title, key, rows in ([("device", "self_device_time_total", 20)] if cuda else []) + [
            ("CPU", "self_cpu_time_total", 25)
        ]:
            md += [
                f"By self {title} time:",
                "",
                "```",
                table.table(sort_by=key, row_limit=rows, max_name_column_width=60),
                "```",
                "",
            ]
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(2 * prof_calls):
            f().backward()
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25)
        md += ["", f"## {n}: cProfile over {2 * prof_calls} calls, by own time", "", "```", s.getvalue().strip(), "```"]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"host_{'gpu' if cuda else 'cpu'}{'_quick' if a.quick else ''}.md"
    (out / name).write_text("\n".join(md) + "\n")
    print(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
