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
    """Puts a NaN/inf into its input's first entry on request (in a fresh tensor: autograd stays valid)."""

    def __init__(self):
        super().__init__()
        self.value = None

    def forward(self, h):
        if self.value is not None:
            h = h.clone()
            h[0, 0] = self.value
        return h


def poisoned_model():
    torch.manual_seed(0)
    feat, logit = Poison(), Poison()
    return nn.Sequential(nn.Linear(10, 16), feat, nn.ReLU(), nn.Linear(16, 4), logit), feat, logit


NAMES = {
    ("features", "clean"): r"features of logits_clean \(layer '1'\) holds",
    ("features", "adv"): r"features of logits_adv \(layer '1'\) holds",
    ("logits", "clean"): r"logits_clean holds",
    ("logits", "adv"): r"logits_adv holds",
}


@pytest.mark.parametrize("where", ["features", "logits"])
@pytest.mark.parametrize("side", ["clean", "adv"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_raises_naming_the_tensor_or_skips(where, side, bad):
    model, feat, logit = poisoned_model()
    x, xa, y = batch()
    poison = feat if where == "features" else logit
    got = GOTRegularizer(model, "1", label_matching=True)
    skip = GOTRegularizer(model, "1", label_matching=True, nan_policy="skip")
    poison.value = bad if side == "clean" else None
    lc = model(x)
    poison.value = bad if side == "adv" else None
    la = model(xa)
    with pytest.raises(FloatingPointError, match=NAMES[where, side]):
        got(lc, la, y)
    with pytest.warns(RuntimeWarning, match="skipped"):
        out = skip(lc, la, y)
    assert float(out) == 0.0 and skip.diagnostics["skipped"] and skip.diagnostics["loss"] == 0.0
    # The zero can be added to the step's loss, which then backpropagates as usual.
    poison.value = None
    ce = nn.functional.cross_entropy(model(x), y)
    (ce + out).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    # The next clean step works again with the same regulariser.
    assert torch.isfinite(skip(model(x), model(xa), y)) and not skip.diagnostics["skipped"]


def test_non_finite_logits_in_place_raise():
    model = mlp()
    got = GOTRegularizer(model, "2")
    x, xa, y = batch()
    lc = model(x)
    la = model(xa)
    with torch.no_grad():
        la[1, 2] = float("nan")  # in place on the model's own output
    with pytest.raises(FloatingPointError, match="logits_adv holds 1 NaN and 0 inf"):
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
    assert float(v.detach()) == pytest.approx(10 * (float(C.detach().diagonal().mean()) + 0.1 * math.log(8)), rel=1e-6)
    assert got.diagnostics["same_label_mass"] == 1.0


def test_wrong_labels():
    model = mlp()
    got = GOTRegularizer(model, "2", label_matching=True)
    x, xa, y = batch()
    lc, la = model(x), model(xa)
    with pytest.raises(ValueError, match=r"shape \(8,\), got \(4,\)"):
        got(lc, la, y[:4])
    with pytest.raises(ValueError, match=r"shape \(8,\), got \(8, 1\)"):
        got(lc, la, y[:, None])
    with pytest.raises(TypeError, match="integer class indices"):
        got(lc, la, y.bool())
    with pytest.raises(TypeError, match="integer class indices"):
        got(lc, la, y.float())
    with pytest.raises(TypeError, match="y must be a torch.Tensor"):
        got(lc, la, y.tolist())
    with pytest.raises(ValueError, match="needs the labels"):
        got(lc, la)


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
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: thread hand-offs would dominate on a shared machine
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
        # theta=1: few Sinkhorn sweeps, so 10k calls stay fast; the book-keeping tested is the same.
        got = GOTRegularizer(model, "1", label_matching=True, theta=1.0)
        x, y = torch.randn(8, 16), torch.arange(8) % 4
        rss = {}
        for i in range(10_000):
            xa = (x + 0.01 * torch.randn_like(x)).requires_grad_(True)
            # an attack step: a forward whose output is dropped after the input gradient
            torch.autograd.grad(model(xa).sum(), xa)
            lc, la = model(x), model(xa.detach())
            got(lc, la, y).backward()
            if i in (1_000, 9_999):
                rss[i] = _rss_kb()
            assert got.num_captured <= 2
        del lc, la
        assert got.num_captured == 0
        assert rss[9_999] - rss[1_000] < 4_000  # kB over 9,000 calls: flat
    finally:
        torch.set_num_threads(threads)


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
    torch.testing.assert_close(fresh.potential.linear.bias, got.potential.linear.bias)
    assert a.keys() == b.keys() and len(a) == 2
    for k in a:
        for field in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(a[k][field], b[k][field])
    assert fresh.potential.num_updates == got.potential.num_updates == 5
    lc, la = model(x), model(xa)
    assert float(fresh(lc, la, y).detach()) == float(got(lc, la, y).detach())  # same next step


def test_deepcopy_and_remove():
    model = mlp()
    x, xa, y = batch()
    got = GOTRegularizer(model, "2")
    twin = copy.deepcopy(model)  # an EMA copy, made after the hooks were on
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.9)
    v_twin = got(twin(x), twin(xa), y)
    v_mixed = got(model(x), twin(xa), y)  # clean from one, adversarial from the other
    v_model = got(model(x), model(xa), y)
    assert torch.isfinite(v_twin) and torch.isfinite(v_mixed) and torch.isfinite(v_model)
    assert float(v_twin.detach()) != float(v_model.detach())  # the copy's own features were used
    twin2 = copy.deepcopy(twin)
    ref = GOTRegularizer(twin2, "2")  # an independent regulariser on a copy of the copy
    assert float(ref(twin2(x), twin2(xa), y).detach()) == float(v_twin.detach())
    got.remove()
    assert len(model._forward_hooks) == len(model._forward_pre_hooks) == len(model[2]._forward_hooks) == 0
    out = twin(x)  # the copy's hooks are inert after remove()
    assert got.num_captured == 0 and torch.isfinite(out).all()
    with pytest.raises(RuntimeError, match="removed"):
        got(model(x), model(xa), y)
    ref.remove()


def test_context_manager_removes_the_hooks():
    model = mlp()
    x, xa, y = batch()
    with GOTRegularizer(model, "2", label_matching=True) as got:
        assert len(model._forward_hooks) == 1 and len(model[2]._forward_hooks) == 1
        assert torch.isfinite(got(model(x), model(xa), y))
    assert len(model._forward_hooks) == len(model._forward_pre_hooks) == len(model[2]._forward_hooks) == 0
    with pytest.raises(RuntimeError, match="removed"):
        got(model(x), model(xa), y)
    got.remove()  # idempotent
    # An exception inside the block removes them too.
    with pytest.raises(KeyError):
        with GOTRegularizer(model, "2"):
            raise KeyError("boom")
    assert len(model._forward_hooks) == len(model[2]._forward_hooks) == 0
