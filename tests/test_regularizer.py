"""GOTRegularizer: hook semantics, agreement with the functional API, and bad input."""
import copy
import warnings

import pytest
import torch
from torch import nn

from got_reg import GOTConvergenceWarning, GOTRegularizer, resolve_layer
from got_reg.functional import got_loss, joint_cost, label_mask, ot_loss


class Net(nn.Module):
    """A small CNN with nested names (features.block.0) and BatchNorm."""

    def __init__(self, bn=True):
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module("block", nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4) if bn else nn.Identity(), nn.ReLU()))
        self.features.add_module("pool", nn.AdaptiveAvgPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))
        self.n_forward = 0

    def forward(self, x):
        self.n_forward += 1
        return self.classifier(self.features(x))


def data(B=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, 1, 6, 6, generator=g)
    return x, (x + 0.05 * torch.randn(B, 1, 6, 6, generator=g)).clamp(0, 1), torch.arange(B) % 3


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Net()


def manual_features(model, x):
    return model.classifier[2](model.classifier[1](model.classifier[0](model.features(x))))


@pytest.mark.parametrize("lm", [False, True])
def test_value_equals_functional_on_the_layer_output(model, lm):
    model.eval()
    x, xa, y = data()
    got = GOTRegularizer(model, "classifier.2", beta=10.0, label_matching=lm, tol=1e-8, max_iter=20000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GOTConvergenceWarning)
        loss = got(model(x), model(xa), y)
        with torch.no_grad():
            ref = got_loss(manual_features(model, x), manual_features(model, xa), model(x), model(xa), y,
                           label_matching=lm, tol=1e-8, max_iter=20000)
    assert float(loss.detach()) == pytest.approx(10.0 * float(ref), rel=1e-5)
    assert got.diagnostics["value"] == pytest.approx(float(ref), rel=1e-5)
    if lm:
        assert got.diagnostics["same_label_mass"] == pytest.approx(1.0)


def test_gradient_reaches_features_and_matches_envelope(model):
    """d(βW)/dθ_model equals the gradient of β<P*, C> with the plan held fixed (envelope theorem)."""
    model.eval()
    x, xa, y = data()
    got = GOTRegularizer(model, "classifier.2", beta=2.0, tol=1e-9, max_iter=50000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GOTConvergenceWarning)
        loss = got(model(x), model(xa), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)
    conv_grad = grads[0]
    assert conv_grad.abs().sum() > 0  # reaches the first layer, below the hooked one
    zc, za = manual_features(model, x), manual_features(model, xa)
    C = joint_cost(zc, za, model(x), model(xa))
    from got_reg.solvers import solve_sinkhorn
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GOTConvergenceWarning)
        P = solve_sinkhorn(C.detach(), 0.1, tol=1e-9, max_iter=50000).plan
    ref = torch.autograd.grad(2.0 * (P * C).sum(), list(model.parameters()))
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-3)


def test_no_extra_forward_and_attack_forwards_not_retained(model):
    x, xa, y = data()
    got = GOTRegularizer(model, "classifier.2")
    before = model.n_forward
    for _ in range(30):  # an attack: many forwards whose outputs are dropped
        xadv = xa.clone().requires_grad_(True)
        model(xadv).sum().backward()
    assert got.num_captured == 0
    lc, la = model(x), model(xa)
    got(lc, la, y)
    assert model.n_forward - before == 32  # the loop's forwards only
    assert got.num_captured == 2
    del lc, la
    assert got.num_captured == 0


def test_concatenated_forward_equals_two_forwards_in_eval_mode(model):
    model.eval()
    x, xa, y = data()
    got = GOTRegularizer(model, "features.pool", label_matching=True)
    v_two = float(got(model(x), model(xa), y))
    lc, la = model(torch.cat([x, xa])).chunk(2)
    v_cat = float(got(lc, la, y))
    assert v_cat == pytest.approx(v_two, rel=1e-5)
    # In train mode BatchNorm statistics differ between the two layouts, but both work.
    model.train()
    lc, la = model(torch.cat([x, xa])).split([16, 16])
    assert torch.isfinite(got(lc, la, y))


def test_nested_names_wrappers_and_modules():
    torch.manual_seed(0)
    net = Net()
    assert resolve_layer(net, "features.block.0")[1] is net.features.block[0]
    assert resolve_layer(net, "module.features.block.0")[1] is net.features.block[0]

    class Wrapper(nn.Module):  # the shape of DDP (.module) and torch.compile (._orig_mod)
        def __init__(self, m):
            super().__init__()
            self._orig_mod = m

        def forward(self, x):
            return self._orig_mod(x)

    w = Wrapper(net)
    assert resolve_layer(w, "_orig_mod.classifier.1")[1] is net.classifier[1]
    assert resolve_layer(w, net.classifier[3]) == ("classifier.3", net.classifier[3])
    x, xa, y = data()
    with GOTRegularizer(w, "features.block.2") as got:
        assert torch.isfinite(got(w(x), w(xa), y))


def test_remove_and_context_manager_take_hooks_off(model):
    n_model, n_layer = len(model._forward_hooks), len(model.classifier[2]._forward_hooks)
    with GOTRegularizer(model, "classifier.2") as got:
        assert len(model._forward_hooks) == n_model + 1
        assert len(model.classifier[2]._forward_hooks) == n_layer + 1
    assert len(model._forward_hooks) == n_model and len(model._forward_pre_hooks) == 0
    assert len(model.classifier[2]._forward_hooks) == n_layer
    got.remove()  # idempotent
    x, xa, y = data()
    with pytest.raises(RuntimeError, match="removed"):
        got(model(x), model(xa), y)


def test_state_is_not_changed_behind_the_users_back(model):
    x, xa, y = data()
    got = GOTRegularizer(model, "classifier.2", solver="dual")
    model.train()
    got(model(x), model(xa), y)
    assert model.training and torch.is_grad_enabled()
    model.eval()
    with torch.no_grad():
        got(model(x), model(xa), y)
        assert not torch.is_grad_enabled()
    assert not model.training
    assert not any(n.startswith(("features", "classifier")) for n in got.state_dict())


def test_dual_solver_trains_phi_only_in_training_mode_and_saves_it(model):
    model.eval()
    x, xa, y = data()
    got = GOTRegularizer(model, "classifier.2", solver="dual", dual_lr=0.05)
    sk = GOTRegularizer(model, "classifier.2", tol=1e-8, max_iter=20000)  # before the forwards it reads
    lc, la = model(x), model(xa)
    values = [got.diagnostics.get("value")]
    for _ in range(50):
        got(lc, la, y)
        values.append(got.diagnostics["value"])
    assert values[-1] > values[1]  # φ ascends the semi-dual
    w = got.potential.linear.weight.detach().clone()
    got.eval()
    got(lc, la, y)
    torch.testing.assert_close(got.potential.linear.weight, w)  # eval: φ frozen
    sd = got.state_dict()
    assert "potential.linear.weight" in sd and "potential._extra_state" in sd
    fresh = GOTRegularizer(model, "classifier.2", solver="dual")
    fresh.load_state_dict(sd)
    torch.testing.assert_close(fresh.potential.linear.weight, w)
    # The model receives the gradient of the value at the current φ; φ's own grads stay untouched.
    loss = got(lc, la, y)
    loss.backward()
    assert model.classifier[1].weight.grad.abs().sum() > 0
    assert got.potential.linear.weight.grad is None
    # Weak duality against the Sinkhorn value of the same batch.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GOTConvergenceWarning)
        assert float(loss.detach()) <= float(sk(lc, la, y).detach()) + 1e-5


def test_bad_inputs_have_clear_messages(model):
    x, xa, y = data()
    with pytest.raises(ValueError, match=r"'classifier\.5'.*Close matches: 'classifier\.[0-9]'"):
        GOTRegularizer(model, "classifier.5")
    with pytest.raises(ValueError, match="unknown solver 'sinkorn'.*'sinkhorn'"):
        GOTRegularizer(model, "classifier.2", solver="sinkorn")
    with pytest.raises(ValueError, match="unknown backend"):
        GOTRegularizer(model, "classifier.2", backend="keops")
    with pytest.raises(ValueError, match="unknown prob_cost"):
        GOTRegularizer(model, "classifier.2", prob_cost="js")
    with pytest.raises(ValueError, match="theta must be"):
        GOTRegularizer(model, "classifier.2", theta=-1)
    with pytest.raises(TypeError, match="DataParallel"):
        GOTRegularizer(nn.DataParallel(model), "classifier.2")
    got = GOTRegularizer(model, "classifier.2", label_matching=True)
    lc = model(x)
    with pytest.raises(ValueError, match=r"logits_adv must have the shape of logits_clean \(16, 3\).*\(8, 3\)"):
        got(lc, model(xa[:8]), y)
    with pytest.raises(ValueError, match=r"y must hold one label per example, shape \(16,\), got \(16, 1\)"):
        got(lc, model(xa), y[:, None])
    with pytest.raises(TypeError, match="integer class indices"):
        got(lc, model(xa), y.float())
    with pytest.raises(ValueError, match="needs the labels"):
        got(lc, model(xa))
    with pytest.raises(LookupError, match="no features recorded for logits_adv"):
        got(lc, model(xa).float() * 1.0, y)
    with pytest.raises(FloatingPointError, match="features of logits_adv.*NaN"):
        got(lc, model(xa * float("nan")), y)


def test_label_matching_mask_never_nans_and_blocks_cross_label_mass(model):
    x, xa, y = data()
    got = GOTRegularizer(model, "classifier.2", label_matching=True)
    loss = got(model(x), model(xa), y)
    assert torch.isfinite(loss)
    assert got.diagnostics["same_label_mass"] == pytest.approx(1.0, abs=1e-12)
    plain = GOTRegularizer(model, "classifier.2")
    plain(model(x), model(xa), y)
    assert plain.diagnostics["same_label_mass"] < 1.0


def test_float64_and_bf16_autocast():
    torch.manual_seed(0)
    net = Net().double()
    x, xa, y = data()
    got = GOTRegularizer(net, "classifier.2")
    assert got(net(x.double()), net(xa.double()), y).dtype == torch.float64
    net32 = Net()
    got32 = GOTRegularizer(net32, "classifier.2")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lc, la = net32(x), net32(xa)
        loss = got32(lc, la, y)
    assert lc.dtype == torch.bfloat16 and loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in net32.parameters() if p.grad is not None)


def test_deepcopy_of_model_shares_the_capture(model):
    x, xa, y = data()
    got = GOTRegularizer(model, "classifier.2")
    ema = copy.deepcopy(model)
    assert torch.isfinite(got(ema(x), ema(xa), y))
    got.remove()
    ema(x)  # inert hooks
    assert got.num_captured == 0


def test_building_the_dual_potential_does_not_draw_from_the_global_rng(model):
    x, xa, y = data()
    got = GOTRegularizer(model, "classifier.2", solver="dual")
    lc, la = model(x), model(xa)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    got(lc, la, y)  # first call builds φ
    torch.testing.assert_close(torch.rand(3), expected)
