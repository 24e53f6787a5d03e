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

    .venv/bin/python -m studies.mnist_1epoch.diagnostics \
        runs/mnist_pilot/{trades-s0,got-trades-lm-s0,got-trades-lm-b10-s0,got-trades-s-s0} \
        --init --out studies/mnist_1epoch/results/diagnostics
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from examples.attacks import trades_kl_attack
from examples.data import dataset_tensors, load_datasets
from examples.evaluate import load_run
from examples.models import build_model, default_layer
from examples.report import method_name, table
from got_reg import FeatureCapture
from got_reg.costs import CosineCost, KLCost
from got_reg.functional import joint_cost, label_mask
from got_reg.solvers import solve_sinkhorn, with_grad


def _flat_norm(grads) -> float:
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads if g is not None)))


def _cos(a, b) -> float:
    va = torch.cat([g.flatten() for g in a]).double()
    vb = torch.cat([g.flatten() for g in b]).double()
    return float(va @ vb / (va.norm() * vb.norm()).clamp_min(1e-30))


def _entropic_ot(cost: torch.Tensor, theta: float, mask):
    """W_theta(C) with the envelope gradient (what GOTRegularizer trains with), and the solve's details."""
    res = solve_sinkhorn(cost, theta, mask, warn=False)
    return with_grad(cost, res), res


@contextmanager
def output_tap(model: torch.nn.Module, layer: str) -> Iterator[list[torch.Tensor]]:
    """The tensors ``layer`` returns, in forward order, for gradients *at* the layer's output.

    FeatureCapture hands out a copy of that output (what GOT reads); the TRADES loss reads the output
    itself, so its gradient at the copy would be None.  Both gradients are taken here, at the output.
    """
    outputs: list[torch.Tensor] = []
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: outputs.append(o))
    try:
        yield outputs
    finally:
        handle.remove()


def measure(model: torch.nn.Module, layer: str, batches, cfg: dict, theta: float, lam: float, seed: int) -> dict:
    """Averages over ``batches`` of the quantities in the module docstring."""
    params = [p for p in model.parameters() if p.requires_grad]
    conv = [p for n, p in model.named_parameters() if n.startswith("feature_extractor")]
    acc: dict[str, list[float]] = {}
    torch.manual_seed(seed)
    try:
        with FeatureCapture(model, layer) as capture, output_tap(model, layer) as outputs:
            for x, y in batches:
                x_adv = trades_kl_attack(model, x, cfg["epsilon"], cfg["step_size"], cfg["num_steps"])
                model.train()
                outputs.clear()
                logits, logits_adv = model(x), model(x_adv)
                z, z_adv = capture.lookup(logits), capture.lookup(logits_adv)  # the features W is computed from
                out, out_adv = outputs  # the layer's outputs in those two forwards: where the gradients are taken
                ce = F.cross_entropy(logits, y)
                kl = F.kl_div(F.log_softmax(logits_adv, 1), F.softmax(logits, 1), reduction="sum") / len(y)
                trades = ce + cfg.get("beta_trades", 1.0) * kl  # PGD-AT runs: the MNIST TRADES weight, 1
                cx = lam * CosineCost().pairwise(z, z_adv)
                cy = KLCost().pairwise(logits, logits_adv)
                cost = cx + cy
                # The library's fused cost (one addmm) must be the same matrix: the diagnostics measure what trains.
                torch.testing.assert_close(
                    cost, joint_cost(z, z_adv, logits, logits_adv, lam=lam), atol=1e-5, rtol=1e-5
                )
                row: dict[str, float] = {"ce": ce.item(), "kl": kl.item()}
                g_trades = torch.autograd.grad(trades, params + [out, out_adv], retain_graph=True, allow_unused=True)
                np_ = len(params)
                row["grad_trades_params"] = _flat_norm(g_trades[:np_])
                row["grad_trades_z"] = _flat_norm(g_trades[np_:])
                row["grad_trades_conv"] = _flat_norm(torch.autograd.grad(trades, conv, retain_graph=True))
                for tag, mask in (("lm", label_mask(y)), ("s", None)):
                    w, res = _entropic_ot(cost, theta, mask)
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
                    row[f"cos_w_{tag}_trades"] = _cos(
                        [g if g is not None else torch.zeros_like(p) for g, p in zip(g_w[:np_], params)],
                        [g if g is not None else torch.zeros_like(p) for g, p in zip(g_trades[:np_], params)],
                    )
                for k, v in row.items():
                    acc.setdefault(k, []).append(v)
    finally:
        model.eval()
    return {k: sum(v) / len(v) for k, v in acc.items()}


def diagnostics_table(results: dict[str, dict]) -> str:
    cols = [
        ("CE", "ce"),
        ("KL", "kl"),
        ("W LM", "w_lm"),
        ("W S", "w_s"),
        ("LM: feat / pred / entropic part of W", None),
        ("LM trace(P)", "trace_lm"),
        ("S trace(P)", "trace_s"),
        ("S same-label mass", "same_label_s"),
        ("‖∇z W_LM‖ / ‖∇z TRADES‖", None),
        ("‖∇conv W_LM‖ / ‖∇conv TRADES‖", None),
        ("cos(∇θ W_LM, ∇θ TRADES)", "cos_w_lm_trades"),
        ("cos(∇θ W_S, ∇θ TRADES)", "cos_w_s_trades"),
    ]
    rows = []
    for name, r in results.items():
        cells = [f"{name}: {r['label']}"]
        for c, k in cols:
            if k is not None:
                cells.append(f"{r[k]:.3g}")
            elif c.startswith("LM: feat"):
                cells.append(f"{r['feat_part_lm']:.3g} / {r['pred_part_lm']:.3g} / {r['entropic_part_lm']:.3g}")
            else:  # a ratio; n/a where TRADES has no gradient (the untrained net's zero last layer)
                part = "z" if c.startswith("‖∇z") else "conv"
                den = r[f"grad_trades_{part}"]
                cells.append(
                    f"{r[f'grad_w_lm_{part}'] / den:.3g}"
                    if den > 1e-8
                    else f"n/a (‖∇W‖ = {r[f'grad_w_lm_{part}']:.3g})"
                )
        rows.append(cells)
    return table(["run"] + [c for c, _ in cols], rows)


def main(argv=None) -> dict:
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
        models.append(
            (run.name, method_name(cfg) + (f" (β = {cfg['got_beta']:g})" if cfg["got"] != "none" else ""), model, cfg)
        )
    if args.init:
        torch.manual_seed(args.seed)
        base = models[0][3] if models else {"epsilon": 0.3, "step_size": 0.04, "num_steps": 10, "beta_trades": 1.0}
        models.append(
            (
                "init",
                "untrained SmallCNN",
                build_model("smallcnn", 10, 1, 28),
                {**base, "got_layer": default_layer("smallcnn")},
            )
        )

    results = {}
    for name, label, model, cfg in models:
        results[name] = {
            "label": label,
            **measure(model, cfg["got_layer"], batches, cfg, args.theta, args.lam, args.seed),
        }
        print(f"{name}: done", flush=True)

    text = diagnostics_table(results)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(
        json.dumps(
            {"batches": args.batches, "theta": args.theta, "lam": args.lam, "seed": args.seed, "results": results},
            indent=1,
        )
    )
    args.out.with_suffix(".md").write_text(text + "\n")
    return results


if __name__ == "__main__":
    main()
