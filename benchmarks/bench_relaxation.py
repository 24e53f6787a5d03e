"""Over-relaxed vs plain Sinkhorn on the transport problems of a real network.

    .venv/bin/python benchmarks/bench_relaxation.py --threads 1       # B = 128 and 512, 5 batches each
    .venv/bin/python benchmarks/bench_relaxation.py --quick --out /tmp/r

The MNIST SmallCNN of ``bench_overhead.py`` is trained briefly on clean MNIST; for each batch, TRADES'
attack (PGD-10, ε = 0.3) gives the adversarial batch, and the GOT cost matrix (cosine + KL on the
default layer) is solved by got-reg's torch solver at the default tol = 1e-3 with over-relaxation
(``relax=1.8``, the default) and without (``relax=1``), with and without the label mask. The table
gives the median iterations and solve times and the largest value and plan (L1) differences between
the two solves.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import machine, set_threads  # noqa: E402
from bench_overhead import get_model, mnist_or_random, pretrain, trades_attack  # noqa: E402

from got_reg import GOTConvergenceWarning  # noqa: E402
from got_reg.functional import joint_cost, label_mask  # noqa: E402
from got_reg.solvers.sinkhorn import sinkhorn_log_torch  # noqa: E402

TOL = 1e-3  # the library's default


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--batch", type=int, nargs="+", default=[128, 512])
    p.add_argument("--batches", type=int, default=5, help="test batches per batch size")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--out", default="benchmarks/results/relaxation_cpu")
    a = p.parse_args(argv)
    if a.quick:
        a.batch, a.batches, a.pretrain_steps, a.threads = [32], 1, 5, a.threads or 1
    set_threads(a.threads)
    warnings.simplefilter("ignore", GOTConvergenceWarning)
    torch.manual_seed(0)
    device = torch.device("cpu")
    model, layer = get_model(device)
    data, (xtr, ytr, xte, yte) = mnist_or_random(a.data_dir)
    pretrain(model, xtr, ytr, a.pretrain_steps, device)
    model.eval()
    feats = {}
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: feats.__setitem__("z", o.flatten(1)))
    rows = []
    try:
        for B in a.batch:
            for k in range(a.batches):
                x, y = xte[k * B : (k + 1) * B], yte[k * B : (k + 1) * B]
                xa = trades_attack(model, x)
                with torch.no_grad():
                    lg, z = model(x), feats["z"]
                    lga, za = model(xa), feats["z"]
                C = joint_cost(z, za, lg, lga)
                for masked in (False, True):
                    mask = label_mask(y) if masked else None
                    out = {}
                    for relax in (1.8, 1.0):
                        t = time.perf_counter()
                        res = sinkhorn_log_torch(C, 0.1, mask, tol=TOL, relax=relax)
                        out[relax] = (res, 1e3 * (time.perf_counter() - t))
                    (r18, t18), (r1, t1) = out[1.8], out[1.0]
                    rows.append(dict(B=B, batch=k, mask=masked, it_relax=r18.iterations, it_plain=r1.iterations,
                                     ms_relax=t18, ms_plain=t1, err_relax=r18.marginal_error, err_plain=r1.marginal_error,
                                     value_diff=abs(float(r18.value - r1.value)),
                                     plan_diff_l1=float((r18.plan - r1.plan).abs().sum())))
                    print(json.dumps(rows[-1]), flush=True)
    finally:
        handle.remove()
    write(a, data, rows)


def write(a, data, rows):
    L = ["# Over-relaxed vs plain Sinkhorn on a trained SmallCNN's GOT costs\n",
         f"Machine: {machine()}. Data: {data}; SmallCNN after {a.pretrain_steps} clean Adam steps; TRADES PGD-10 "
         f"(ε = 0.3) adversarial batches; cosine + KL cost, θ = 0.1, tol = 1e-3 (L1 marginal error). Medians over "
         f"{a.batches} batches; the differences are the largest over them (a solve that hit max_iter = 1000 counts "
         f"as not converged).\n",
         "| B | mask | iterations relax=1.8 | iterations relax=1 | converged (1.8 / 1) | ms relax=1.8 | ms relax=1 "
         "| max marginal err (1.8 / 1) | max value diff | max plan diff (L1) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for B in a.batch:
        for masked in (False, True):
            sel = [r for r in rows if r["B"] == B and r["mask"] == masked]
            med = {k: statistics.median(r[k] for r in sel) for k in ("it_relax", "it_plain", "ms_relax", "ms_plain")}
            conv = f"{sum(r['err_relax'] <= TOL for r in sel)}/{len(sel)} / {sum(r['err_plain'] <= TOL for r in sel)}/{len(sel)}"
            L.append(f"| {B} | {masked} | {med['it_relax']:.0f} | {med['it_plain']:.0f} | {conv} | {med['ms_relax']:.1f} | "
                     f"{med['ms_plain']:.1f} | {max(r['err_relax'] for r in sel):.1e} / {max(r['err_plain'] for r in sel):.1e} | "
                     f"{max(r['value_diff'] for r in sel):.1e} | {max(r['plan_diff_l1'] for r in sel):.1e} |")
    text = "\n".join(L) + "\n"
    print(text)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
