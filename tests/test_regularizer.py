"""GOTRegularizer: the functional twin on the hooked layer's output, the envelope gradient through the
model, the dual potential's state (training, eval, inference mode, state_dict), removal and copies,
and the collapse monitor."""

import copy
import io
import math
import warnings

import pytest
import torch
from ot_reference import newton_ot, semidual_formula
from torch import nn

import got_reg.regularizer as regularizer
from got_reg import GOTCollapseWarning, GOTConvergenceWarning, GOTRegularizer
from got_reg.functional import got_loss, joint_cost, label_mask
from got_reg.hooks import resolve_layer

# Tight solves need float64 models and a θ at which the plans are not near-permutations.
THETA, TIGHT = 0.5, dict(tol=1e-10, max_iter=20000)


class Net(nn.Module):
    """A small CNN with nested names (features.block.0) and BatchNorm."""

    def __init__(self, bn=True):
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module(
            "block", nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4) if bn else nn.Identity(), nn.ReLU())
        )
        self.features.add_module("pool", nn.AdaptiveAvgPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))
        self.n_forward = 0

    def forward(self, x):
        self.n_forward += 1
        return self.classifier(self.features(x))


def data(B=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, 1, 6, 6, generator=g, dtype=dtype)
    return x, (x + 0.05 * torch.randn(B, 1, 6, 6, generator=g, dtype=dtype)).clamp(0, 1), torch.arange(B) % 3


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Net()


def manual_features(model, x):
    return model.classifier[2](model.classifier[1](model.classifier[0](model.features(x))))


def mlp(width=16, out=4, dtype=torch.float32):
    torch.manual_seed(0)
    layers = [nn.Linear(10, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, out)]
    return nn.Sequential(*layers).to(dtype)


def batch(B=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 10, generator=g, dtype=dtype)
    return x, x + 0.05 * torch.randn(B, 10, generator=g, dtype=dtype), torch.arange(B) % 4


# -- the twin of got_loss, and the gradient --------------------------------------------------------


@pytest.mark.parametrize("lm", [False, True])
def test_value_and_diagnostics_equal_the_functional_twin_on_the_layer_output(model, lm):
    """Same options (defaults included, whatever they are) → the functional value on the hooked layer's output."""
    model.double().eval()
    x, xa, y = data(dtype=torch.float64)
    got = GOTRegularizer(model, "classifier.2", beta=10.0, theta=THETA, label_matching=lm, **TIGHT)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GOTConvergenceWarning)
        loss = got(model(x), model(xa), y)
        with torch.no_grad():
            ref = got_loss(
                manual_features(model, x),
                manual_features(model, xa),
                model(x),
                model(xa),
                y,
                beta=10.0,
                theta=THETA,
                label_matching=lm,
                **TIGHT,
            )
    assert float(loss.detach()) == pytest.approx(float(ref), rel=1e-12, abs=1e-15)
    d = got.diagnostics.as_dict()
    assert d["value"] == pytest.approx(float(ref) / 10.0, rel=1e-12, abs=1e-15)
    assert d["loss"] == pytest.approx(float(ref), rel=1e-12, abs=1e-15) and d["batch"] == 16.0
    if lm:
        assert d["same_label_mass"] == 1.0


@pytest.mark.parametrize("anchor", ["none", "clean"])
def test_model_gradient_is_the_envelope_gradient(model, anchor):
    """d(βW)/dθ_model = d(β<P*, C>)/dθ_model with the exact plan P* held fixed (envelope theorem); with
    anchor="clean" the clean forward's features and logits are constants in C."""
    model.double().eval()
    x, xa, y = data(dtype=torch.float64)
    got = GOTRegularizer(model, "classifier.2", beta=2.0, theta=THETA, anchor=anchor, debias=False, **TIGHT)
    params = list(model.parameters())
    grads = torch.autograd.grad(got(model(x), model(xa), y), params)
    assert float(grads[0].abs().sum()) > 0  # reaches the first layer, below the hooked one
    zc, za, lc, la = manual_features(model, x), manual_features(model, xa), model(x), model(xa)
    P = newton_ot(joint_cost(zc, za, lc, la), THETA).plan
    if anchor == "clean":
        zc, lc = zc.detach(), lc.detach()
    ref = torch.autograd.grad(2.0 * (P * joint_cost(zc, za, lc, la)).sum(), params)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-7)


def test_label_matching_puts_no_mass_between_labels(model):
    x, xa, y = data()
    mask = label_mask(y)
    got = GOTRegularizer(model, "classifier.2", label_matching=True)
    got(model(x), model(xa), y)
    plan = got.diagnostics.result.plan
    assert float(plan[~mask].abs().max()) == 0.0 and got.diagnostics.as_dict()["same_label_mass"] == 1.0
    plain = GOTRegularizer(model, "classifier.2")
    plain(model(x), model(xa), y)
    plan = plain.diagnostics.result.plan
    assert float(plan[~mask].sum()) > 0.01
    same = float(plan[mask].sum() / plan.sum())
    assert plain.diagnostics.as_dict()["same_label_mass"] == pytest.approx(same, rel=1e-6)


# -- hook semantics (to move to tests/test_hooks.py) -----------------------------------------------


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
    v_two = float(got(model(x), model(xa), y).detach())
    lc, la = model(torch.cat([x, xa])).chunk(2)
    v_cat = float(got(lc, la, y).detach())
    assert v_cat == pytest.approx(v_two, rel=1e-5)
    # In train mode BatchNorm statistics differ between the two layouts; the split uses the joint forward's.
    model.train()
    lc, la = model(torch.cat([x, xa])).split([16, 16])
    v = got(lc, la, y)
    with torch.no_grad():
        z = model.features(torch.cat([x, xa])).flatten(1)  # the same batch statistics
        ref = got_loss(z[:16], z[16:], lc, la, y, label_matching=True)
    assert float(v.detach()) == pytest.approx(float(ref), rel=1e-5)


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
        v = got(w(x), w(xa), y)
    with GOTRegularizer(net, "features.block.2") as direct:
        assert float(v.detach()) == float(direct(net(x), net(xa), y).detach())


def test_remove_and_context_manager_take_the_hooks_off(model):
    n_model, n_layer = len(model._forward_hooks), len(model.classifier[2]._forward_hooks)
    x, xa, y = data()
    with GOTRegularizer(model, "classifier.2") as got:
        assert len(model._forward_hooks) == n_model + 1 and len(model._forward_pre_hooks) == 1
        assert len(model.classifier[2]._forward_hooks) == n_layer + 1
        got(model(x), model(xa), y)
    assert len(model._forward_hooks) == n_model and len(model._forward_pre_hooks) == 0
    assert len(model.classifier[2]._forward_hooks) == n_layer
    got.remove()  # idempotent
    with pytest.raises(RuntimeError, match="removed"):
        got(model(x), model(xa), y)


def test_deepcopy_of_the_model_pairs_each_logits_with_its_own_model():
    """An EMA copy made after the hooks were on: its forwards are read with its own features.

    (That the copy's hooks go inert after ``remove()`` is FeatureCapture's, in test_hooks.py.)
    """
    model = mlp()
    x, xa, y = batch()
    got = GOTRegularizer(model, "2")
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.9)
    v_twin = got(twin(x), twin(xa), y)
    lc, la = model(x), twin(xa)
    v_mixed = got(lc, la, y)  # clean from one, adversarial from the other
    with torch.no_grad():
        ref_mixed = got_loss(model[:3](x), twin[:3](xa), lc, la, y)
    assert float(v_mixed.detach()) == pytest.approx(float(ref_mixed), rel=1e-6)
    twin2 = copy.deepcopy(twin)
    ref = GOTRegularizer(twin2, "2")  # an independent regulariser on a copy of the copy
    assert float(ref(twin2(x), twin2(xa), y).detach()) == float(v_twin.detach())
    got.remove()
    ref.remove()


# -- module state ------------------------------------------------------------------------------------


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
    assert set(got.state_dict()) == {"potential.weight", "potential._extra_state"}
    assert GOTRegularizer(model, "classifier.2").state_dict() == {}  # Sinkhorn: no state


@pytest.mark.parametrize("backend", ["torch", "pot", "geomloss"])
def test_train_eval_switches_and_grad_mode_are_left_alone(backend):
    model = mlp()
    x, xa, y = batch()
    got = GOTRegularizer(model, "2", backend=backend, debias=False)
    ref = GOTRegularizer(model, "2", backend="torch", debias=False, tol=1e-6)
    for mode in (True, False, True):
        model.train(mode)
        with torch.no_grad():
            lc, la = model(x), model(xa)
            v = got(lc, la, y)
            assert not torch.is_grad_enabled()  # GeomLoss switches it on globally; got-reg restores it
            assert float(v) == pytest.approx(float(ref(lc, la, y)), rel=1e-3)
        assert model.training == mode
    assert torch.is_grad_enabled()


def test_bad_arguments_have_clear_messages(model):
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
    with pytest.raises(ValueError, match="unknown nan_policy"):
        GOTRegularizer(model, "classifier.2", nan_policy="ignore")
    with pytest.raises(ValueError, match="dual_lr must be finite and > 0"):
        GOTRegularizer(model, "classifier.2", solver="dual", dual_lr=0.0)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        GOTRegularizer(lambda x: x, "0")
    with pytest.raises(TypeError, match="DataParallel"):
        GOTRegularizer(nn.DataParallel(model), "classifier.2")
    got = GOTRegularizer(model, "classifier.2")
    lc = model(x)
    with pytest.raises(ValueError, match=r"logits_adv must have the shape of logits \(16, 3\).*\(8, 3\)"):
        got(lc, model(xa[:8]), y)
    with pytest.raises(LookupError, match="no features recorded for logits_adv"):
        got(lc, model(xa).float() * 1.0, y)


# -- the dual potential ------------------------------------------------------------------------------


def test_dual_trains_phi_in_training_mode_and_round_trips_through_state_dict():
    model = mlp()
    x, xa, y = batch(16)
    got = GOTRegularizer(model, "2", solver="dual", dual_lr=0.05, debias=False)
    lc, la = model(x), model(xa)
    values = []
    for _ in range(30):
        got(lc, la, y)
        values.append(float(got.diagnostics.value))
    assert values[-1] > values[0] + 1e-4  # φ ascends the semi-dual (measured: +4.3e-4)
    assert got.potential.num_updates == 30
    # Weak duality against the exact value of the same batch.
    C = joint_cost(model[:3](x), model[:3](xa), lc, la).detach()
    assert max(values) <= newton_ot(C, 0.1).value + 1e-5
    # The model receives the gradient of the value at the current φ; φ's own grad stays untouched.
    got(lc, la, y).backward(retain_graph=True)
    assert float(model[2].weight.grad.abs().sum()) > 0 and got.potential.weight.grad is None
    # state_dict → bytes → weights_only load into a fresh regulariser: weight, Adam state and count.
    buf = io.BytesIO()
    torch.save(got.state_dict(), buf)
    buf.seek(0)
    fresh = GOTRegularizer(model, "2", solver="dual", dual_lr=0.05, debias=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same lr: no warning
        fresh.load_state_dict(torch.load(buf, weights_only=True))
    torch.testing.assert_close(fresh.potential.weight, got.potential.weight, rtol=0, atol=0)
    a, b = got.potential.optimizer.state_dict()["state"], fresh.potential.optimizer.state_dict()["state"]
    assert a.keys() == b.keys() and len(a) == 1
    for k in a:
        for field in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(a[k][field], b[k][field], rtol=0, atol=0)
    assert fresh.potential.num_updates == got.potential.num_updates == 31
    lc, la = model(x), model(xa)
    assert float(fresh(lc, la, y).detach()) == float(got(lc, la, y).detach())  # the same next step
    torch.testing.assert_close(fresh.potential.weight, got.potential.weight, rtol=0, atol=0)


def test_issue13_7_load_state_dict_keeps_the_configured_dual_lr():
    model = mlp()
    x, xa, y = batch()
    got = GOTRegularizer(model, "2", solver="dual", dual_lr=0.05)
    got(model(x), model(xa), y)
    fresh = GOTRegularizer(model, "2", solver="dual", dual_lr=0.2)
    with pytest.warns(UserWarning, match="loaded dual optimiser state had lr 0.05; the configured dual_lr=0.2 is kept"):
        fresh.load_state_dict(got.state_dict())
    assert [g["lr"] for g in fresh.potential.optimizer.param_groups] == [0.2]
    # The next step is taken at 0.2: Adam's first steps move each weight by about lr.
    w0 = fresh.potential.weight.detach().clone()
    fresh(model(x), model(xa), y)
    w1 = fresh.potential.weight.detach()
    assert float((w1 - w0).abs().max()) == pytest.approx(0.2, rel=0.25)


def dual_value_formula(model, x, xa, weight, theta=0.1):
    """The semi-dual of the batch at φ(e) = e·w, e = unit clean features of layer "2" (dual_input="embedded")."""
    with torch.no_grad():
        z, za, lc, la = model[:3](x), model[:3](xa), model(x), model(xa)
        e = z / z.norm(dim=1, keepdim=True)
        return float(semidual_formula(joint_cost(z, za, lc, la).double(), (e @ weight).double(), theta))


def test_issue13_8_inference_mode_calls_do_not_crash_and_do_not_train_phi():
    """Forwards under torch.inference_mode(), the regulariser called inside it or outside it: the value is
    the semi-dual at the current φ (no crash), φ is not trained, and a first call there still builds a φ
    that a later training call can update in place (regression: it was an inference tensor)."""
    model = mlp()
    x, xa, y = batch()
    got = GOTRegularizer(model, "2", solver="dual", beta=1.0, debias=False)
    with torch.inference_mode():
        v_in = got(model(x), model(xa), y)  # inside, and the first call: builds φ = 0
    assert got.potential.num_updates == 0 and not got.potential.weight.is_inference()
    assert float(v_in) == pytest.approx(dual_value_formula(model, x, xa, got.potential.weight.detach()), rel=1e-5)
    got(model(x), model(xa), y)  # a training call outside: φ takes its step
    assert got.potential.num_updates == 1
    w = got.potential.weight.detach().clone()
    with torch.inference_mode():
        lc, la = model(x), model(xa)
        got(lc, la, y)
    v_out = got(lc, la, y)  # inference-mode outputs, called outside it
    assert got.potential.num_updates == 1
    torch.testing.assert_close(got.potential.weight.detach(), w, rtol=0, atol=0)
    assert float(v_out) == pytest.approx(dual_value_formula(model, x, xa, w), rel=1e-5)


def test_issue13_9_phi_trains_only_when_model_and_regulariser_train_with_grad():
    model = mlp()
    x, xa, y = batch()
    got = GOTRegularizer(model, "2", solver="dual")
    updates = []
    for model_mode, got_mode, grad in (
        (True, True, True),
        (False, True, True),
        (True, False, True),
        (True, True, False),
        (True, True, True),
    ):
        model.train(model_mode)
        got.train(got_mode)
        with torch.set_grad_enabled(grad):
            got(model(x), model(xa), y)
        updates.append(got.potential.num_updates)
    assert updates == [1, 1, 1, 1, 2]  # model.eval() alone stops φ too


def test_dual_with_anchor_none_backpropagates_through_phi_after_its_step():
    """anchor="none": the model's gradient also flows through φ(e(z)) on the clean side, and φ takes its
    Adam step in place during the same call. The gradient is that of the formula at the pre-step φ.
    (Regression: the forward saved w itself for the backward, which the step then invalidated.)"""
    model = mlp(dtype=torch.float64)
    x, xa, y = batch(dtype=torch.float64)
    got = GOTRegularizer(model, "2", solver="dual", anchor="none", beta=1.0, debias=False)
    got(model(x), model(xa), y)  # builds φ and moves it off 0
    w0 = got.potential.weight.detach().clone()
    params = list(model.parameters())
    grads = torch.autograd.grad(got(model(x), model(xa), y), params)
    assert not torch.equal(got.potential.weight.detach(), w0)  # the step happened in the call
    z, za, lc, la = model[:3](x), model[:3](xa), model(x), model(xa)
    ref = semidual_formula(joint_cost(z, za, lc, la), (z / z.norm(dim=1, keepdim=True)) @ w0, 0.1)
    for g, r in zip(grads, torch.autograd.grad(ref, params)):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)


def test_dual_steps_ascend_several_times_per_call():
    model = mlp()
    x, xa, y = batch()
    got = GOTRegularizer(model, "2", solver="dual", dual_steps=3)
    got(model(x), model(xa), y)
    assert got.potential.num_updates == 3


def test_repeated_training_calls_drive_the_dual_value_to_the_exact_value_when_dim_ge_batch():
    """A fixed batch, B = 12 ≤ D = 32: the linear potential on unit features can reach the optimum, and the
    semi-dual (the cross term w_xy) rises to the exact entropic OT value from below."""
    model = mlp(width=32, dtype=torch.float64)
    x, _, y = batch(12, dtype=torch.float64)
    xa = x + torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = GOTRegularizer(model, "2", solver="dual", dual_lr=0.05, dual_steps=10, debias=False)
    lc, la = model(x), model(xa)
    C = joint_cost(model[:3](x), model[:3](xa), lc, la).detach()
    ref = newton_ot(C, 0.1).value
    values = []
    for _ in range(150):
        got(lc, la, y)
        values.append(float(got.diagnostics.w_xy))
    assert max(values) <= ref + 1e-12
    assert ref - values[-1] < 0.05 * (ref - values[0]) and ref - values[-1] < 5e-3 * abs(ref)


def test_building_the_dual_potential_does_not_draw_from_the_global_rng(model):
    x, xa, y = data()
    got = GOTRegularizer(model, "classifier.2", solver="dual")
    lc, la = model(x), model(xa)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    got(lc, la, y)  # first call builds φ
    torch.testing.assert_close(torch.rand(3), expected)


# -- the collapse monitor ----------------------------------------------------------------------------


def constant_mlp():
    """An MLP whose logits are constant (zero last layer): its clean cross-entropy is ln K, chance."""
    model = mlp()
    with torch.no_grad():
        model[4].weight.zero_()
        model[4].bias.zero_()
    return model


@pytest.fixture
def short_monitor(monkeypatch):
    monkeypatch.setattr(regularizer, "_WARMUP", 6)
    monkeypatch.setattr(regularizer, "_WINDOW", 3)


def test_a_collapsed_model_warns_once_after_the_warm_up(short_monitor):
    """Constant logits: the clean cross-entropy is ln K exactly, the chance level."""
    model = constant_mlp()
    x, xa, y = batch()
    got = GOTRegularizer(model, "2")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for call in range(1, 13):
            got(model(x), model(xa), y)
            collapse = [w for w in caught if issubclass(w.category, GOTCollapseWarning)]
            assert len(collapse) == (call >= 6), call  # at the end of the first window after warm-up, once
    message = str(collapse[0].message)
    assert f"averaged {math.log(4):.3f}" in message and f"ln(4) = {math.log(4):.3f}" in message


def test_the_monitor_samples_every_few_calls_and_reads_once_per_window(monkeypatch):
    """Past the warm-up, the cross-entropy is computed on every _SAMPLE-th call of a window (its last call
    always) and read at the window's end: 5 sampled calls in a window of 10 at _SAMPLE = 2, a warning at the
    first window's end for a collapsed model, with the sampled mean."""
    monkeypatch.setattr(regularizer, "_WARMUP", 20)
    monkeypatch.setattr(regularizer, "_WINDOW", 10)
    monkeypatch.setattr(regularizer, "_SAMPLE", 2)
    computed = []
    cross_entropy = regularizer.F.cross_entropy
    monkeypatch.setattr(regularizer.F, "cross_entropy", lambda *a, **k: computed.append(1) or cross_entropy(*a, **k))
    model = constant_mlp()
    x, xa, y = batch()
    got = GOTRegularizer(model, "2")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for call in range(1, 21):
            got(model(x), model(xa), y)
            collapse = [w for w in caught if issubclass(w.category, GOTCollapseWarning)]
            # calls 11-20 form the window after the warm-up; of those, 12, 14, ..., 20 are sampled
            assert len(computed) == max(0, (call - 10) // 2), call
            assert len(collapse) == (call == 20), call
    assert f"averaged {math.log(4):.3f} over 5 of the last 10 training calls" in str(collapse[0].message)


def test_calls_outside_training_are_not_monitored(short_monitor):
    """Evaluation calls, no-grad calls and calls without labels neither warn nor count towards the warm-up."""
    model = constant_mlp()
    x, xa, y = batch()
    got = GOTRegularizer(model, "2")
    with warnings.catch_warnings():
        warnings.simplefilter("error", GOTCollapseWarning)
        got.eval()
        for _ in range(12):
            got(model(x), model(xa), y)
        got.train()
        with torch.no_grad():
            for _ in range(12):
                got(model(x), model(xa), y)
        for _ in range(12):
            got(model(x), model(xa))  # no labels: no cross-entropy to watch
        for _ in range(5):  # the same collapsed model in training: the warm-up starts only now
            got(model(x), model(xa), y)
    with pytest.warns(GOTCollapseWarning):
        got(model(x), model(xa), y)


@pytest.mark.parametrize("chance", [None, 0.0])
def test_a_healthy_training_does_not_warn(short_monitor, monkeypatch, chance):
    """A short training on separable data with CE + GOT: the clean CE falls well below ln K, no warning.
    With the threshold at 0 (chance=0.0) the same run must warn: the monitor did read its windows."""
    monkeypatch.setattr(regularizer, "_WARMUP", 20)  # past the first steps, at chance level for any model
    monkeypatch.setattr(regularizer, "_WINDOW", 5)
    if chance is not None:
        monkeypatch.setattr(regularizer, "_CHANCE", chance)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    g = torch.Generator().manual_seed(1)
    y = torch.arange(32) % 4
    centres = torch.tensor([[2.0, 2.0], [-2.0, 2.0], [2.0, -2.0], [-2.0, -2.0]])
    x = centres[y] + 0.3 * torch.randn(32, 2, generator=g)
    xa = x + 0.1 * torch.randn(32, 2, generator=g)
    got = GOTRegularizer(model, "2", beta=1.0)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(30):
            lc, la = model(x), model(xa)
            loss = nn.functional.cross_entropy(la, y) + got(lc, la, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    warned = any(issubclass(w.category, GOTCollapseWarning) for w in caught)
    assert warned == (chance is not None)
    assert float(nn.functional.cross_entropy(model(x), y)) < 0.3 * math.log(4)


def test_readme_signature_is_the_modules():
    """README's API line lists every keyword argument of GOTRegularizer with its real default, in order."""
    import ast
    import inspect
    from pathlib import Path

    text = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    start = text.index("`GOTRegularizer(model, layer, *, ") + len("`GOTRegularizer(model, layer, *, ")
    listed = [a.split("=", 1) for a in text[start : text.index(")`, an `nn.Module`", start)].split(", ")]
    params = [p for p in inspect.signature(GOTRegularizer).parameters.values() if p.kind is p.KEYWORD_ONLY]
    assert [name for name, _ in listed] == [p.name for p in params]
    for (name, value), p in zip(listed, params):
        assert ast.literal_eval(value) == p.default, name
