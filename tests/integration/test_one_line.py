"""README's one line on a model and a loop that are not in this repository (issue 11, "done means").

An MLP on scikit-learn's digits, adversarially trained with a 5-step PGD written here, with
``loss = loss + got(logits, logits_adv, y)`` added. The defaults must train with both solvers and stay
silent; the paper's exact form at β = 10 must collapse, and the collapse guard must say so. (The defaults
at β = 10 were measured here too: 23% test accuracy after these 320 steps, the reason β = 10 is not the
default; README.)
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from got_reg import GOTCollapseWarning, GOTRegularizer

pytestmark = pytest.mark.integration


def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    return x[perm[:1400]], y[perm[:1400]], x[perm[1400:]], y[perm[1400:]]


def pgd(model, x, y, eps=0.1, step=0.03, steps=5):
    x_adv = (x + eps * (2 * torch.rand_like(x) - 1)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + step * grad.sign(), x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


def train(steps=320, batch_seed=1, **got_kwargs):
    torch.manual_seed(0)
    x, y, xt, yt = digits()
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    got = GOTRegularizer(model, "3", label_matching=True, **got_kwargs) if got_kwargs is not None else None
    g = torch.Generator().manual_seed(batch_seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", GOTCollapseWarning)
        for _ in range(steps):
            idx = torch.randint(0, len(x), (64,), generator=g)
            xb, yb = x[idx], y[idx]
            model.eval()
            xa = pgd(model, xb, yb)
            model.train()
            logits, logits_adv = model(xb), model(xa)
            loss = 0.5 * (F.cross_entropy(logits, yb) + F.cross_entropy(logits_adv, yb))
            loss = loss + got(logits, logits_adv, yb)  # the one line
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = float((model(xt).argmax(1) == yt).float().mean())
    return acc, [w for w in caught if issubclass(w.category, GOTCollapseWarning)]


@pytest.mark.parametrize("kwargs", [{}, {"solver": "dual"}], ids=["sinkhorn", "dual"])
def test_the_defaults_train_without_collapse(kwargs):
    """Seven batch orders, the median held to 0.85 (an MLP on digits; chance is 0.10, the collapsed paper's
    form below 0.3). One run says little: 320 steps of adversarial training are chaotic, so the accuracy of
    one order moves by ±0.1 with the CPU's vector width and the thread count alone. Measured on an AMD EPYC
    (orders 1-7, torch 2.13.0): Sinkhorn 0.92 0.88 0.84 0.89 0.92 0.93 0.91 with AVX-512 and 2 threads,
    0.83 0.83 0.85 0.92 0.92 0.90 0.90 with AVX2, 0.70 0.84 0.91 0.84 0.95 0.95 0.93 with 1 thread (medians
    0.91, 0.90, 0.91); the dual 0.79 0.83 0.95 0.90 0.96 0.88 0.93, 0.90 0.95 0.84 0.87 0.90 0.93 0.87 and
    0.92 0.94 0.94 0.94 0.91 0.90 0.86 (medians 0.90, 0.90, 0.92). Three orders, as before, gave medians
    from 0.83 to 0.94 for the same code."""
    runs = [train(batch_seed=seed, **kwargs) for seed in range(1, 8)]
    accs = sorted(acc for acc, _ in runs)
    assert accs[3] > 0.85, accs
    assert not any(collapse for _, collapse in runs)


def test_the_papers_form_at_beta_10_collapses_and_the_guard_warns():
    acc, collapse = train(beta=10.0, anchor="none", debias=False)
    assert acc < 0.3, acc
    assert len(collapse) == 1 and "collapsed" in str(collapse[0].message)
