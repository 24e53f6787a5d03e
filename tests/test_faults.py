"""Bad input and faults: each case gives a clear error or a defined behaviour, never a silent NaN."""
import copy
import io
import math
import warnings

import numpy as np
import ot
import pytest
import torch
from torch import nn

from got_reg import GOTConvergenceWarning, GOTRegularizer
from got_reg.functional import joint_cost, ot_loss


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def batch(B=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 10, generator=g)
    return x, x + 0.05 * torch.randn(B, 10, generator=g), torch.arange(B) % 4


class Poison(nn.Module):
    """Puts a NaN/inf into the hooked layer's output on request."""

    def __init__(self):
        super().__init__()
        self.value = None

    def forward(self, h):
        if self.value is not None:
            h = h.clone()
            h[0, 0] = self.value
        return h


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_features_raise_or_skip(bad):
    torch.manual_seed(0)
    poison = Poison()
    model = nn.Sequential(nn.Linear(10, 16), poison, nn.ReLU(), nn.Linear(16, 4))
    x, xa, y = batch()
    got = GOTRegularizer(model, "1")
    skip = GOTRegularizer(model, "1", nan_policy="skip")
    lc = model(x)
    poison.value = bad
    la = model(xa)
    with pytest.raises(FloatingPointError, match="features of logits_adv \\(layer '1'\\) holds"):
        got(lc, la, y)
    with pytest.warns(RuntimeWarning, match="skipped"):
        out = skip(lc, la, y)
    assert float(out) == 0.0 and skip.diagnostics["skipped"]


def test_non_finite_logits_raise():
    model = mlp()
    got = GOTRegularizer(model, "2")
    x, xa, y = batch()
    lc = model(x)
    la = model(xa)
    with torch.no_grad():
        la[1, 2] = float("nan")  # in place on the model's own output
    with pytest.raises(FloatingPointError, match="logits_adv holds 1 NaN"):
        got(lc, la, y)


def test_batch_mismatch_and_single_example():
    model = mlp()
    got = GOTRegularizer(model, "2")
    x, xa, y = batch()
    with pytest.raises(ValueError, match=r"\(8, 4\).*\(5, 4\)"):
        got(model(x), model(xa[:5]), y)
    # B = 1: the only plan is P = 1 and W = C[0, 0] exactly.
    lc, la = model(x[:1]), model(xa[:1])
    v = got(lc, la, y[:1])
    z, za = model[:3](x[:1]), model[:3](xa[:1])
    C = joint_cost(z, za, lc, la)
    assert float(v.detach()) == pytest.approx(10 * float(C[0, 0].detach()), rel=1e-6)


def test_label_matching_with_all_distinct_labels_is_the_mean_diagonal_cost():
    """1×1 blocks force P = I/B: W = mean_i C_ii + θ·KL(I/B ‖ 1/B²) = mean diag + θ log B."""
    model = mlp()
    got = GOTRegularizer(model, "2", label_matching=True)
    x, xa, _ = batch()
    y = torch.arange(8)  # every class on its own: 1×1 blocks
    lc, la = model(x), model(xa)
    v = got(lc, la, y)
    C = joint_cost(model[:3](x), model[:3](xa), lc, la)
    assert float(v.detach()) == pytest.approx(10 * (float(C.diagonal().mean()) + 0.1 * math.log(8)), rel=1e-6)


def test_wrong_labels():
    model = mlp()
    got = GOTRegularizer(model, "2", label_matching=True)
    x, xa, y = batch()
    lc, la = model(x), model(xa)
    with pytest.raises(ValueError, match=r"shape \(8,\), got \(4,\)"):
        got(lc, la, y[:4])
    with pytest.raises(TypeError, match="integer class indices"):
        got(lc, la, y.bool())


@pytest.mark.parametrize("theta", [1e-3, 1e-2])
def test_small_theta_and_large_costs_in_fp32(theta):
    g = torch.Generator().manual_seed(0)
    C = torch.rand(32, 32, generator=g) * 1e3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GOTConvergenceWarning)
        v = ot_loss(C.requires_grad_(True), theta=theta, max_iter=3000)
    (grad,) = torch.autograd.grad(v, C)
    assert torch.isfinite(v) and torch.isfinite(grad).all()
    exact = ot.emd2(np.full(32, 1 / 32), np.full(32, 1 / 32), C.detach().double().numpy())
    # |W_θ − W_0| ≤ θ log B² at convergence; leave 1e-3 relative for fp32 and an unconverged dual.
    assert abs(float(v) - exact) <= theta * math.log(32**2) + 1e-3 * exact


def _rss_kb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4


def test_ten_thousand_calls_keep_memory_flat():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    got = GOTRegularizer(model, "1", label_matching=True)
    x, y = torch.randn(8, 16), torch.arange(8) % 4
    rss = []
    for i in range(10_000):
        xa = (x + 0.01 * torch.randn_like(x)).requires_grad_(True)
        model(xa).sum().backward()  # an attack step whose output is dropped
        lc, la = model(x), model(xa.detach())
        got(lc, la, y).backward()
        if i in (500, 9_999):
            rss.append(_rss_kb())
        assert got.num_captured <= 2
    del lc, la
    assert got.num_captured == 0
    assert rss[1] - rss[0] < 8_000  # kB: no growth with the number of calls


def test_train_eval_switches_and_global_state_are_left_alone():
    model = mlp()
    x, xa, y = batch()
    for backend in ("torch", "pot", "geomloss"):
        got = GOTRegularizer(model, "2", backend=backend)
        for mode in (True, False, True):
            model.train(mode)
            with torch.no_grad():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", GOTConvergenceWarning)
                    got(model(x), model(xa), y)
                assert not torch.is_grad_enabled()  # GeomLoss switches it on globally; got-reg restores it
            assert model.training == mode
        assert torch.is_grad_enabled()
        got.remove()


def test_dual_state_dict_round_trip_with_weights_only():
    model = mlp()
    x, xa, y = batch(16)
    got = GOTRegularizer(model, "2", solver="dual")
    lc, la = model(x), model(xa)
    for _ in range(5):
        got(lc, la, y)
    buf = io.BytesIO()
    torch.save(got.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = GOTRegularizer(model, "2", solver="dual")
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.potential.linear.weight, got.potential.linear.weight)
    a = got.potential.optimizer.state_dict()["state"]
    b = fresh.potential.optimizer.state_dict()["state"]
    for k in a:
        torch.testing.assert_close(a[k]["exp_avg"], b[k]["exp_avg"])
    assert fresh.potential.num_updates == got.potential.num_updates == 5
    lc, la = model(x), model(xa)
    assert float(fresh(lc, la, y).detach()) == float(got(lc, la, y).detach())  # same next step


def test_deepcopy_and_remove():
    model = mlp()
    x, xa, y = batch()
    got = GOTRegularizer(model, "2")
    twin = copy.deepcopy(model)
    assert torch.isfinite(got(twin(x), twin(xa), y))
    got.remove()
    assert len(model._forward_hooks) == 0 and len(model[2]._forward_hooks) == 0
    twin(x)  # the copy's hooks are inert after remove()
    assert got.num_captured == 0
    with pytest.raises(RuntimeError, match="removed"):
        got(model(x), model(xa), y)
