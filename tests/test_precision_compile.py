"""Mixed precision and torch.compile."""
import shutil
import warnings

import pytest
import torch
from torch import nn

from got_reg import GOTRegularizer


def setup(dtype=torch.float32):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5)).to(dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 10, generator=g, dtype=dtype)
    return model, x, x + 0.05 * torch.randn(16, 10, generator=g, dtype=dtype), torch.arange(16) % 5


@pytest.mark.parametrize("solver", ["sinkhorn", "dual"])
def test_bf16_autocast_runs_the_ot_in_fp32(solver):
    model, x, xa, y = setup()
    got = GOTRegularizer(model, "3", solver=solver, label_matching=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lc, la = model(x), model(xa)
        loss = got(lc, la, y)
    assert lc.dtype == torch.bfloat16
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert torch.is_autocast_enabled("cpu") is False


@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None, reason="torch.compile needs a C compiler")
def test_compiled_model_gives_the_eager_value():
    model, x, xa, y = setup()
    eager = GOTRegularizer(model, "3")
    v_eager = float(eager(model(x), model(xa), y).detach())
    eager.remove()
    compiled = torch.compile(model)
    got = GOTRegularizer(compiled, "_orig_mod.3")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lc, la = compiled(x), compiled(xa)
    loss = got(lc, la, y)
    assert float(loss.detach()) == pytest.approx(v_eager, rel=1e-5)
    loss.backward()
    assert model[0].weight.grad is not None and torch.isfinite(model[0].weight.grad).all()
