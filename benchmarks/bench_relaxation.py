"""Over-relaxed vs plain Sinkhorn on the transport problems of a real network.

    python -m benchmarks.bench_relaxation --threads 1                      # B = 128 and 512, 5 batches each
    python -m benchmarks.bench_relaxation --device cpu --quick --out /tmp/r  # smoke run

The MNIST SmallCNN of ``bench_overhead`` is trained briefly on clean data; for each test batch, TRADES'
attack (PGD-10, ε = 0.3) gives the adversarial batch, got_reg.FeatureCapture the features of the default
layer, and the GOT cost (cosine + KL) is solved by got-reg's log-domain Sinkhorn
(got_reg.solvers.sinkhorn_log) at the default tol = 1e-3 with over-relaxation (relax=1.8, the default) and
without (relax=1), with and without the label mask. The table gives the median iterations and solve times
and the largest value and plan (L1) differences between the two solves.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from typing import Any

import torch

from benchmarks._common import (
    describe,
    environment,
    fmt,
    load,
    md_table,
    mnist_or_random,
    pretrain,
    set_threads,
    smallcnn,
    time_once,
    write_outputs,
)
from examples.attacks import trades_kl_attack
from got_reg import FeatureCapture, GOTConvergenceWarning
from got_reg.functional import joint_cost, label_mask
from got_reg.solvers import sinkhorn_log

TOL, THETA, MAX_ITER = 1e-3, 0.1, 1000  # the library's defaults


def timed_solve(C: torch.Tensor, mask, relax: float, device: torch.device):
    """(result, ms) of one sinkhorn_log solve at the library's defaults and over-relaxation factor ``relax``."""
    out = {}

    def solve() -> None:
        out["res"] = sinkhorn_log(C, THETA, mask, tol=TOL, max_iter=MAX_ITER, relax=relax)

    ms = time_once(solve, device)
    return out["res"], ms


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="B = 32, one batch, 5 pretraining steps")
    p.add_argument("--batch", type=int, nargs="+", default=[128, 512])
    p.add_argument("--batches", type=int, default=5, help="test batches per batch size")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="MNIST idx files (default: ../shared/data/mnist)")
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--out", default="benchmarks/results", help="folder for NAME.md and NAME.json")
    p.add_argument("--name", default=None, help="file name (default: relaxation_cpu / _gpu, _quick with --quick)")
    a = p.parse_args(argv)
    if a.quick:
        a.batch, a.batches, a.pretrain_steps, a.threads = [32], 1, 5, a.threads or 1
    device = torch.device(a.device)
    name = a.name or ("relaxation_gpu" if device.type == "cuda" else "relaxation_cpu") + ("_quick" if a.quick else "")
    set_threads(a.threads)
    warnings.simplefilter("ignore", GOTConvergenceWarning)
    env = environment(device)
    torch.manual_seed(0)
    model, layer = smallcnn(device)
    data, (xtr, ytr, xte, yte) = mnist_or_random(a.data_dir)
    pretrain(model, xtr, ytr, a.pretrain_steps, device)
    model.eval()
    rows: list[dict[str, Any]] = []
    with FeatureCapture(model, layer) as capture:
        for B in a.batch:
            for k in range(a.batches):
                x, y = xte[k * B : (k + 1) * B].to(device), yte[k * B : (k + 1) * B].to(device)
                xa = trades_kl_attack(model, x, 0.3, 0.01, 10)
                with torch.no_grad():
                    lg, lga = model(x), model(xa)
                    z, za = capture.lookup(lg), capture.lookup(lga)
                C = joint_cost(z, za, lg, lga)
                for masked in (False, True):
                    mask = label_mask(y) if masked else None
                    (r18, ms18), (r1, ms1) = (timed_solve(C, mask, relax, device) for relax in (1.8, 1.0))
                    rows.append(
                        dict(
                            B=B,
                            batch=k,
                            mask=masked,
                            it_relax=int(r18.iterations),
                            it_plain=int(r1.iterations),
                            ms_relax=ms18,
                            ms_plain=ms1,
                            err_relax=float(r18.marginal_error),
                            err_plain=float(r1.marginal_error),
                            value_diff=abs(float(r18.value - r1.value)),
                            plan_diff_l1=float((r18.plan - r1.plan).abs().sum()),
                        )
                    )
                    print(rows[-1], flush=True)
    env["load_end"] = load()
    md = render(a, env, data, rows)
    path = write_outputs(a.out, name, md, dict(env=env, args=vars(a), data=data, rows=rows))
    print("\n".join(md))
    print(f"wrote {path}")
    return 0


def render(a, env, data: str, rows: list[dict[str, Any]]) -> list[str]:
    L = [
        "# Over-relaxed vs plain Sinkhorn on a trained SmallCNN's GOT costs\n",
        f"Machine: {describe(env)}.\n",
        f"Data: {data}; SmallCNN after {a.pretrain_steps} clean Adam steps; TRADES PGD-10 (ε = 0.3) adversarial "
        f"batches; cosine + KL cost, θ = {THETA}, tol = {TOL:g} (L1 marginal error), max_iter = {MAX_ITER}. Medians "
        f"over {a.batches} batches; the differences are the largest over them (a solve that hit max_iter counts as "
        "not converged).\n",
    ]
    body = []
    for B in a.batch:
        for masked in (False, True):
            sel = [r for r in rows if r["B"] == B and r["mask"] == masked]
            if not sel:
                continue
            med = {k: statistics.median(r[k] for r in sel) for k in ("it_relax", "it_plain", "ms_relax", "ms_plain")}
            n = len(sel)
            conv = f"{sum(r['err_relax'] <= TOL for r in sel)}/{n} / {sum(r['err_plain'] <= TOL for r in sel)}/{n}"
            errs = f"{max(r['err_relax'] for r in sel):.1e} / {max(r['err_plain'] for r in sel):.1e}"
            body.append(
                [
                    B,
                    fmt(masked),
                    f"{med['it_relax']:.0f}",
                    f"{med['it_plain']:.0f}",
                    conv,
                    f"{med['ms_relax']:.1f}",
                    f"{med['ms_plain']:.1f}",
                    errs,
                    f"{max(r['value_diff'] for r in sel):.1e}",
                    f"{max(r['plan_diff_l1'] for r in sel):.1e}",
                ]
            )
    L += md_table(
        [
            "B",
            "mask",
            "iterations relax=1.8",
            "iterations relax=1",
            "converged (1.8 / 1)",
            "ms relax=1.8",
            "ms relax=1",
            "max marginal err (1.8 / 1)",
            "max value diff",
            "max plan diff (L1)",
        ],
        body,
    )
    return L


if __name__ == "__main__":
    sys.exit(main())
