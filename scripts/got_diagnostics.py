r"""Issue #5's "investigate before concluding": what the GOT term does inside a TRADES step.

For each run directory (and, with ``--init``, a freshly initialised SmallCNN), on the same ``--batches``
MNIST training batches of 128, it crafts the TRADES training attack (KL-PGD at the run's epsilon /
step / steps, eval mode; PGD-AT runs are measured in the same TRADES step, with beta_trades = 1) and then, in
train mode as in training, measures:

* the terms: CE(clean), KL(adv || clean) and W_theta for label matching (LM) and without (S);
* where the plan's mass goes: to each point's own adversarial example (trace of P), to same-label pairs,
  and how W splits into lam * <P, C_x> (features), <P, C_y> (predictions) and theta * KL(P || ab^T);
* whether W's gradient reaches the network: its norm on the hooked features z and on the convolutional
  layers (``feature_extractor``), beside the TRADES loss's, and the cosine between the two parameter
  gradients (negative: GOT pulls against TRADES);
* the "collapse" floor: W of a batch whose features and predictions are all equal is exactly 0, so a
  large beta can lower the loss by shrinking the representation rather than by aligning the two clouds.

Writes ``<out>.json`` and ``<out>.md`` and prints the table.

    .venv/bin/python scripts/got_diagnostics.py runs/mnist_pilot/{trades-s0,got-trades-lm-s0,got-trades-lm-b10-s0,got-trades-s-s0} \
        --init --out results/mnist/diagnostics
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from attacks import trades_kl_attack  # noqa: E402
from data import load_datasets, dataset_tensors  # noqa: E402
from evaluate import load_run, method_name  # noqa: E402
from models import build_model, default_layer  # noqa: E402

from got_reg.costs import CosineCost, KLCost  # noqa: E402
from got_reg.functional import joint_cost, label_mask  # noqa: E402
from got_reg.solvers import entropic_ot  # noqa: E402


def _flat_norm(grads) -> float:
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads if g is not None)))


def _cos(a, b) -> float:
    va = torch.cat([g.flatten() for g in a]).double()
    vb = torch.cat([g.flatten() for g in b]).double()
    return float(va @ vb / (va.norm() * vb.norm()).clamp_min(1e-30))


def measure(model: torch.nn.Module, layer: str, batches, cfg: Dict, theta: float, lam: float, seed: int) -> Dict:
    """Averages over ``batches`` of the quantities in the module docstring."""
    params = [p for p in model.parameters() if p.requires_grad]
    conv = [p for n, p in model.named_parameters() if n.startswith("feature_extractor")]
    captured: List[torch.Tensor] = []
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: captured.append(o))
    acc: Dict[str, List[float]] = {}
    torch.manual_seed(seed)
    try:
        for x, y in batches:
            x_adv = trades_kl_attack(model, x, cfg["epsilon"], cfg["step_size"], cfg["num_steps"])
            model.train()
            captured.clear()
            logits, logits_adv = model(x), model(x_adv)
            # Gradients are taken at the layer's own outputs: the loss depends on them, not on a reshaped copy.
            out, out_adv = captured[0], captured[1]
            z, z_adv = out.flatten(1), out_adv.flatten(1)
            ce = F.cross_entropy(logits, y)
            kl = F.kl_div(F.log_softmax(logits_adv, 1), F.softmax(logits, 1), reduction="sum") / len(y)
            trades = ce + cfg.get("beta_trades", 1.0) * kl  # PGD-AT runs: the MNIST TRADES weight, 1
            cx = lam * CosineCost().pairwise(z, z_adv)
            cy = KLCost().pairwise(logits, logits_adv)
            cost = cx + cy
            # The library's fused cost (one addmm) must be the same matrix: the diagnostics measure what trains.
            torch.testing.assert_close(cost, joint_cost(z, z_adv, logits, logits_adv, lam=lam), atol=1e-5, rtol=1e-5)
            row: Dict[str, float] = {"ce": ce.item(), "kl": kl.item()}
            g_trades = torch.autograd.grad(trades, params + [out, out_adv], retain_graph=True, allow_unused=True)
            np_ = len(params)
            row["grad_trades_params"] = _flat_norm(g_trades[:np_])
            row["grad_trades_z"] = _flat_norm(g_trades[np_:])
            row["grad_trades_conv"] = _flat_norm(torch.autograd.grad(trades, conv, retain_graph=True))
            for tag, mask in (("lm", label_mask(y)), ("s", None)):
                w, res = entropic_ot(cost, theta, mask, warn=False)
                plan = res.plan
                same = label_mask(y).to(plan.dtype)
                row[f"w_{tag}"] = w.item()
                row[f"trace_{tag}"] = float(plan.diagonal().sum())
                row[f"same_label_{tag}"] = float((plan * same).sum())
                row[f"feat_part_{tag}"] = float((plan * cx.detach()).sum())
                row[f"pred_part_{tag}"] = float((plan * cy.detach()).sum())
                row[f"entropic_part_{tag}"] = row[f"w_{tag}"] - row[f"feat_part_{tag}"] - row[f"pred_part_{tag}"]
                row[f"iters_{tag}"] = float(res.iterations)
                g_w = torch.autograd.grad(w, params + [out, out_adv], retain_graph=True, allow_unused=True)
                row[f"grad_w_{tag}_params"] = _flat_norm(g_w[:np_])
                row[f"grad_w_{tag}_z"] = _flat_norm(g_w[np_:])
                row[f"grad_w_{tag}_conv"] = _flat_norm(torch.autograd.grad(w, conv, retain_graph=True))
                row[f"cos_w_{tag}_trades"] = _cos([g if g is not None else torch.zeros_like(p)
                                                   for g, p in zip(g_w[:np_], params)],
                                                  [g if g is not None else torch.zeros_like(p)
                                                   for g, p in zip(g_trades[:np_], params)])
            for k, v in row.items():
                acc.setdefault(k, []).append(v)
    finally:
        handle.remove()
        model.eval()
    return {k: sum(v) / len(v) for k, v in acc.items()}


def main(argv=None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="*", type=Path)
    p.add_argument("--init", action="store_true", help="also a freshly initialised SmallCNN (seed 0)")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--theta", type=float, default=0.1)
    p.add_argument("--lam", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    train_set, _, _ = load_datasets("mnist", None, None, None)
    xs, ys = dataset_tensors(train_set)
    gen = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(len(xs), generator=gen)[: 128 * args.batches].view(args.batches, 128)
    batches = [(xs[i], ys[i]) for i in idx]

    models = []
    for run in args.runs:
        model, cfg = load_run(run, torch.device("cpu"))
        models.append((run.name, method_name(cfg) + (f" (β = {cfg['got_beta']:g})" if cfg["got"] != "none" else ""),
                       model, cfg))
    if args.init:
        torch.manual_seed(args.seed)
        base = models[0][3] if models else {"epsilon": 0.3, "step_size": 0.04, "num_steps": 10, "beta_trades": 1.0}
        models.append(("init", "untrained SmallCNN", build_model("smallcnn", 10, 1, 28),
                       {**base, "got_layer": default_layer("smallcnn")}))

    results = {}
    for name, label, model, cfg in models:
        results[name] = {"label": label, **measure(model, cfg["got_layer"], batches, cfg, args.theta, args.lam, args.seed)}
        print(f"{name}: done", flush=True)

    cols = [("CE", "ce"), ("KL", "kl"), ("W LM", "w_lm"), ("W S", "w_s"),
            ("LM: feat / pred / entropic part of W", None), ("LM trace(P)", "trace_lm"),
            ("S trace(P)", "trace_s"), ("S same-label mass", "same_label_s"),
            ("‖∇z W_LM‖ / ‖∇z TRADES‖", None), ("‖∇conv W_LM‖ / ‖∇conv TRADES‖", None),
            ("cos(∇θ W_LM, ∇θ TRADES)", "cos_w_lm_trades"), ("cos(∇θ W_S, ∇θ TRADES)", "cos_w_s_trades")]
    lines = ["| run | " + " | ".join(c for c, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in results.items():
        cells = []
        for c, k in cols:
            if k is not None:
                cells.append(f"{r[k]:.3g}")
            elif c.startswith("LM: feat"):
                cells.append(f"{r['feat_part_lm']:.3g} / {r['pred_part_lm']:.3g} / {r['entropic_part_lm']:.3g}")
            else:  # a ratio; n/a where TRADES has no gradient (the untrained net's zero last layer)
                part = "z" if c.startswith("‖∇z") else "conv"
                den = r[f"grad_trades_{part}"]
                cells.append(f"{r[f'grad_w_lm_{part}'] / den:.3g}" if den > 1e-8 else
                             f"n/a (‖∇W‖ = {r[f'grad_w_lm_{part}']:.3g})")
        lines.append(f"| {name}: {r['label']} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"batches": args.batches, "theta": args.theta, "lam": args.lam,
                                                         "seed": args.seed, "results": results}, indent=1))
    args.out.with_suffix(".md").write_text(table + "\n")
    return results


if __name__ == "__main__":
    main()
