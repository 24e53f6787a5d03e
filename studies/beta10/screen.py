"""Short screening runs of the beta = 10 investigation (issue 11): TRADES + one GOT variant on MNIST.

Logs the loss terms, W, the mean feature norm and the train accuracy per step, and every ``--eval-every``
steps the clean accuracy on the first 1000 test points and the PGD-10 accuracy (step 0.04) on the
first 500. The data sit on the device and batches are drawn there, so a GPU run is not input-bound.

    .venv/bin/python -m studies.beta10.screen --name paper --got '{"beta": 10, "label_matching": true}'
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from examples.attacks import accuracy, pgd_linf, trades_kl_attack
from examples.data import dataset_tensors, load_datasets
from examples.models import build_model, default_layer
from got_reg import FeatureCapture, GOTRegularizer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--name", required=True)
    p.add_argument("--got", default=None, help="JSON kwargs of GOTRegularizer; omit for TRADES")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=0, help="steps of plain TRADES before GOT is switched on")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default="runs/screen")
    args = p.parse_args()
    dev = torch.device(args.device)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    train, test, _ = load_datasets("mnist", args.data_dir)
    x_all, y_all = (t.to(dev) for t in dataset_tensors(train))
    tx, ty = (t[:1000].to(dev) for t in dataset_tensors(test))
    model = build_model("smallcnn", 10, 1, 28).to(dev)
    layer = default_layer("smallcnn")
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    got = GOTRegularizer(model, layer, **json.loads(args.got)) if args.got else None
    capture = FeatureCapture(model, layer)
    stem = args.name if args.name.endswith(f"-s{args.seed}") else f"{args.name}-s{args.seed}"
    out = Path(args.out) / f"{stem}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    eval_gen = torch.Generator(device=dev).manual_seed(1234)
    rows, logs = [], []
    t0 = time.time()
    perm, pos = torch.randperm(len(x_all), generator=gen, device=dev), 0
    for step in range(1, args.steps + 1):
        if pos + 128 > len(perm):
            perm, pos = torch.randperm(len(x_all), generator=gen, device=dev), 0
        idx = perm[pos : pos + 128]
        pos += 128
        x, y = x_all[idx], y_all[idx]
        model.train()
        x_adv = trades_kl_attack(model, x, 0.3, 0.04, 10)
        opt.zero_grad()
        lc, la = model(x), model(x_adv)
        ce = F.cross_entropy(lc, y)
        kl = F.kl_div(F.log_softmax(la, 1), F.softmax(lc, 1), reduction="batchmean")
        loss = ce + kl
        # Per-step values stay tensors (stacked below) so that a GPU step is not a host round trip.
        z = capture.lookup(lc)
        vals = [ce.detach(), kl.detach(), z.detach().norm(dim=1).mean(), (lc.argmax(1) == y).float().mean()]
        if got is not None and step > args.warmup:
            try:
                g = got(lc, la, y)
            except FloatingPointError as e:  # the paper's dual diverges: record where, and stop
                rows.append({"step": step, "error": str(e)[:300]})
                break
            loss = loss + g
            d = got.diagnostics
            vals += [d.value, d.w_xy, d.marginal_error.float()]
        loss.backward()
        opt.step()
        logs.append(torch.stack([v.float() for v in vals]))
        if step % args.eval_every == 0 or step == args.steps:
            keys = ["ce", "kl", "znorm", "train_acc", "value", "w_xy", "marginal_error"]
            for k, v in enumerate(logs):
                rows.append({"step": step - len(logs) + 1 + k, **dict(zip(keys, v.tolist()))})
            logs = []
            xa = pgd_linf(model, tx[:500], ty[:500], 0.3, 0.04, 10, generator=eval_gen)
            rows[-1].update(
                test_clean=accuracy(model, tx, ty),
                test_pgd10=accuracy(model, xa, ty[:500]),
                time_s=round(time.time() - t0, 1),
            )
            print(args.name, {k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
            if not all(torch.isfinite(torch.tensor([v for v in rows[-1].values() if isinstance(v, float)]))):
                break
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
