"""FeatureCapture: each output is paired with the features of its own forward, or a clear error comes.

Every reference below is computed independently of the hooks: by calling the submodules by hand, or
on a twin model without in-place operations.
"""

import copy
import dataclasses
import gc
import io
import pickle
import random
import threading
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from got_reg import FeatureCapture, GOTConvergenceWarning, GOTRegularizer
from got_reg import hooks as got_hooks
from got_reg.hooks import FeaturesOverwritten


def got_value_and_grads(model, got, x, xa, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GOTConvergenceWarning)
        loss = got(model(x), model(xa), y)
    return float(loss.detach()), torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)


def assert_same_value_and_grads(a, b):
    assert a[0] == pytest.approx(b[0], rel=1e-5, abs=1e-7)
    for ga, gb in zip(a[1], b[1]):
        assert (ga is None) == (gb is None)
        if ga is not None:
            torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)


# -- 1. in-place operations after the hooked layer ----------------------------------------------------
def test_in_place_relu_after_the_layer_does_not_change_its_features():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(inplace=True), nn.Linear(12, 3))
    twin = copy.deepcopy(model)
    twin[1].inplace = False  # the reference: the same network without the in-place op
    x, xa, y = torch.randn(16, 6), torch.randn(16, 6), torch.arange(16) % 3
    with torch.no_grad():
        true = model[0](x)  # the layer's own output, by hand
        assert (true < 0).any()  # so ReLU changes it: a capture that kept the reference would see that
    cap = FeatureCapture(model, "0")
    out = model(x)
    torch.testing.assert_close(cap.lookup(out), true)
    cap.remove()

    got = GOTRegularizer(model, "0", lam=5.0, debias=False)
    ref = GOTRegularizer(twin, "0", lam=5.0, debias=False)
    assert_same_value_and_grads(got_value_and_grads(model, got, x, xa, y), got_value_and_grads(twin, ref, x, xa, y))


class _Switch(nn.Module):
    """Linear → (ReLU in place, when ``in_place`` is set) → Linear: a model whose in-place change of the hooked
    layer's output comes and goes, and a hook of its own that records the layer's output object."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.head = nn.Linear(6, 12), nn.Linear(12, 3)
        self.in_place = False
        self.outputs: list[torch.Tensor] = []
        self.lin.register_forward_hook(lambda m, i, o: self.outputs.append(o))

    def forward(self, x):
        h = self.lin(x)
        return self.head(F.relu_(h) if self.in_place else F.relu(h))


@pytest.fixture
def two_clean_forwards(monkeypatch):
    """The hooks learn a mode from 2 forwards instead of got_reg.hooks.CLEAN_FORWARDS."""
    monkeypatch.setattr(got_hooks, "CLEAN_FORWARDS", 2)


def test_output_is_copied_only_in_modes_where_the_model_changes_it(two_clean_forwards):
    """Eval forwards that leave the layer's output alone file the output itself (no copy) after the first
    two, which are copied while the mode is learned; train forwards with an in-place ReLU copy throughout,
    so every filed feature is the layer's true output (the TRADES order: attack in eval, then training)."""
    torch.manual_seed(0)
    model = _Switch()
    cap = FeatureCapture(model, "lin")
    x = torch.randn(8, 6)
    true = model.lin(x).detach()
    model.outputs.clear()
    model.eval()
    for k in range(4):
        out = model(x)
        z = cap.lookup(out)
        torch.testing.assert_close(z, true)
        shares = z.data_ptr() == model.outputs[-1].data_ptr()
        assert shares == (k >= 2)  # the first forwards in a mode copy
    model.train()
    model.in_place = True
    for _ in range(4):
        out = model(x)
        z = cap.lookup(out)
        torch.testing.assert_close(z, true)
        assert z.data_ptr() != model.outputs[-1].data_ptr()
        assert (model.outputs[-1] >= 0).all()  # the ReLU did change the output itself
    cap.remove()


def test_a_hooked_last_layer_is_filed_as_a_copy_and_reaped_with_its_output():
    """Hooking the layer whose output the model returns: filed uncopied, the feature would be the output
    itself and keep its own entry alive."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Flatten())
    cap = FeatureCapture(model, "1")
    for _ in range(3):
        out = model(torch.randn(4, 6))
        z = cap.lookup(out)
        assert torch.equal(z, out) and z.data_ptr() != out.data_ptr()
        del out, z
        assert len(cap) == 0
    cap.remove()


def test_an_in_place_change_in_a_mode_that_had_none_is_refused_then_copied(two_clean_forwards):
    """The lookup raises FeaturesOverwritten for that forward; the regulariser skips its term with a warning;
    both work from the next forward on."""
    torch.manual_seed(0)
    model = _Switch()
    cap = FeatureCapture(model, "lin")
    x, xa, y = torch.randn(8, 6), torch.randn(8, 6), torch.arange(8) % 3
    true = model.lin(x).detach()
    assert (true < 0).any()
    for _ in range(2):
        torch.testing.assert_close(cap.lookup(model(x)), true)  # learned: no in-place change in training mode
    model.in_place = True
    out = model(x)
    with pytest.raises(
        FeaturesOverwritten,
        match=r"output of layer 'lin' was changed in place later in the forward that produced logits, which the "
        r"first 2 forwards in training mode did not do",
    ):
        cap.lookup(out)
    for _ in range(2):  # copied from now on
        torch.testing.assert_close(cap.lookup(model(x)), true)
    cap.remove()

    model.in_place = False
    got, ref = GOTRegularizer(model, "lin", debias=False), GOTRegularizer(model, "lin", debias=False)
    for _ in range(2):
        got(model(x), model(xa), y)
    model.in_place = True
    with pytest.warns(RuntimeWarning, match=r"GOT term skipped for this step: the output of layer 'lin' was changed"):
        skipped = got(model(x), model(xa), y)
    assert float(skipped) == 0.0 and got.diagnostics is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        value = got(model(x), model(xa), y)
    model.in_place = False  # the reference: the layer's true output, through the other regulariser's copies
    torch.testing.assert_close(value, ref(model(x), model(xa), y))


class Block(nn.Module):
    """A ResNet BasicBlock with a projection shortcut and a linear head; ``in_place`` as torchvision has it."""

    def __init__(self, in_place=True):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.shortcut = nn.Sequential(nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.fc = nn.Linear(8, 4)
        self.in_place = in_place

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.in_place:
            out += self.shortcut(x)
            out = F.relu_(out)
        else:
            out = F.relu(out + self.shortcut(x))
        return self.fc(out.mean((2, 3)))

    def bn2_by_hand(self, x):
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))


@pytest.mark.parametrize("train", [True, False])
def test_resnet_block_hooked_at_bn2_gives_the_bn2_output(train):
    torch.manual_seed(0)
    model = Block(in_place=True)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    twin = copy.deepcopy(model)
    twin.in_place = False
    model.train(train), twin.train(train)
    g = torch.Generator().manual_seed(1)
    x, xa, y = torch.rand(8, 3, 6, 6, generator=g), torch.rand(8, 3, 6, 6, generator=g), torch.arange(8) % 4

    cap = FeatureCapture(model, "bn2")
    out = model(x)
    with torch.no_grad():
        true = model.bn2_by_hand(x)
    torch.testing.assert_close(cap.lookup(out), true.flatten(1))
    cap.remove()

    got = GOTRegularizer(model, "bn2", lam=5.0, debias=False)
    ref = GOTRegularizer(twin, "bn2", lam=5.0, debias=False)
    assert_same_value_and_grads(got_value_and_grads(model, got, x, xa, y), got_value_and_grads(twin, ref, x, xa, y))


def test_features_changed_in_place_after_lookup_are_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Linear(12, 3))
    cap = FeatureCapture(model, "0")
    out = model(torch.randn(4, 6))
    with torch.no_grad():
        cap.lookup(out).mul_(2.0)  # the caller changes the tensor it was given
    with pytest.raises(RuntimeError, match=r"layer '0' filed for logits were changed in place"):
        cap.lookup(out)


class _Reuse(nn.Module):
    """A layer that writes its output into one buffer in every forward."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("out", torch.zeros(4, 3))

    def forward(self, x):
        return torch.mul(x, 2.0, out=self.out)


def test_a_layer_reusing_its_output_memory_is_refused_and_select_clone_works(two_clean_forwards):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3), _Reuse(), nn.Linear(3, 2))
    x1, x2 = torch.randn(4, 6), torch.randn(4, 6)
    with torch.no_grad():
        cap = FeatureCapture(model, "1")
        for _ in range(2):  # the second pair: after two forwards, the output is filed uncopied
            a, b = model(x1), model(x2)
        with pytest.raises(RuntimeError, match=r"writes its output into the same memory.*out\.clone\(\)"):
            cap.lookup(a)
        cap.remove()
        cap = FeatureCapture(model, "1", select=lambda out: out.clone())
        a, b = model(x1), model(x2)
        torch.testing.assert_close(cap.lookup(a), 2.0 * model[0](x1))
        torch.testing.assert_close(cap.lookup(b), 2.0 * model[0](x2))
        cap.remove()


def test_features_stay_alive_only_with_their_output():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(inplace=True), nn.Linear(12, 3))
    cap = FeatureCapture(model, "0")
    out = model(torch.randn(4, 6))
    feature = cap.lookup(out)
    ref = __import__("weakref").ref(feature._base if feature._base is not None else feature)
    del feature
    assert ref() is not None and len(cap) == 1
    del out
    assert ref() is None and len(cap) == 0


# -- 2. threads ----------------------------------------------------------------------------------------
class Jitter(nn.Module):
    """Sleeps a random moment after the hooked layer, so that other threads' forwards run in between."""

    @torch.compiler.disable  # a graph break under compile, on purpose
    def forward(self, x):
        time.sleep(random.random() * 2e-3)
        return x


def _hammer(runs, cap, n_iter=25):
    """Run ``(forward, layer by hand)`` pairs in one thread each; every lookup must equal the by-hand features."""
    barrier = threading.Barrier(len(runs))
    failures, done = [], []

    def work(i, forward, by_hand):
        g = torch.Generator().manual_seed(i)
        barrier.wait()
        try:
            for _ in range(n_iter):
                x = torch.randn(5, 6, generator=g)
                out = forward(x)
                time.sleep(random.random() * 1e-3)
                z = cap.lookup(out)
                with torch.no_grad():
                    if not torch.equal(z, by_hand(x)):
                        failures.append(i)
        except Exception as e:  # noqa: BLE001 - reported below, with the thread it came from
            failures.append((i, repr(e)[:300]))
        done.append(i)

    threads = [threading.Thread(target=work, args=(i, *run)) for i, run in enumerate(runs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert failures == [] and sorted(done) == list(range(len(runs)))


def jittery():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), Jitter(), nn.ReLU(), nn.Linear(12, 3))


def test_threads_running_forwards_of_one_model_and_of_its_copy_get_their_own_features():
    model = jittery()
    cap = FeatureCapture(model, "0")
    ema = copy.deepcopy(model)  # shares the capture, as an EMA copy does
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(0.5)
    _hammer([(model, model[0]), (model, model[0]), (ema, ema[0])], cap)
    assert len(cap) == 0  # every output is gone, and its features with it


def test_threads_running_a_compiled_model_get_their_own_features():
    """The layer hook is traced by dynamo: its per-thread record must still be the running thread's."""
    model = jittery()
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend="eager")
        cap = FeatureCapture(compiled, "_orig_mod.0")
        compiled(torch.randn(5, 6))  # compile once, before the threads
        _hammer([(compiled, model[0]), (compiled, model[0])], cap, n_iter=10)
    finally:
        torch._dynamo.reset()


def test_a_forward_that_raises_leaves_nothing_behind():
    class Fails(nn.Module):
        def __init__(self):
            super().__init__()
            self.fail = False

        def forward(self, h):
            if self.fail:
                raise KeyError("boom")
            return h

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), Fails(), nn.Linear(12, 3))
    cap = FeatureCapture(model, "0")
    model[1].fail = True
    with pytest.raises(KeyError):
        model(torch.randn(4, 6))
    assert cap._state.rec.depth == 0 and cap._state.rec.feature is None  # no copy kept
    model[1].fail = False
    x = torch.randn(4, 6)
    out = model(x)
    with torch.no_grad():
        torch.testing.assert_close(cap.lookup(out), model[0](x))


def test_layer_run_by_hand_and_nested_forwards_do_not_mix():
    class Outer(nn.Module):
        """Runs a copy of itself (sharing the hooks) between its hooked layer and its head."""

        def __init__(self):
            super().__init__()
            self.body, self.head, self.inner = nn.Linear(6, 12), nn.Linear(12, 3), None

        def forward(self, x):
            h = self.body(x)
            if self.inner is not None:
                self.inner_out = self.inner(x.flip(0))
            return self.head(h)

    torch.manual_seed(0)
    model = Outer()
    cap = FeatureCapture(model, "body")
    inner = copy.deepcopy(model)
    with torch.no_grad():
        for p in inner.parameters():
            p.add_(1.0)
    model.inner = inner
    x = torch.randn(4, 6)
    out = model(x)
    model.body(torch.randn(4, 6))  # by hand, outside any forward: not recorded
    with torch.no_grad():
        torch.testing.assert_close(cap.lookup(out), model.body(x))
        torch.testing.assert_close(cap.lookup(model.inner_out), inner.body(x.flip(0)))


# -- 3. pickling ---------------------------------------------------------------------------------------
def small():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(inplace=True), nn.Linear(12, 3))


def data(B=8):
    g = torch.Generator().manual_seed(3)
    return torch.randn(B, 6, generator=g), torch.randn(B, 6, generator=g), torch.arange(B) % 3


def _roundtrip(obj, how):
    if how == "pickle":
        return pickle.loads(pickle.dumps(obj))
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _live_hooks(module):
    hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
    for m in module.modules():
        hooks += list(m._forward_hooks.values())
    captures = [getattr(h, "_ref", lambda: None)() for h in hooks]
    return [c for c in captures if c is not None and c.active]


@pytest.mark.parametrize("how", ["pickle", "torch"])
def test_whole_model_save_while_logits_are_alive(how):
    model = small()
    x, xa, y = data()
    got = GOTRegularizer(model, "0")
    lc, la = model(x), model(xa)  # alive while saving
    loaded = _roundtrip(model, how)
    gc.collect()
    assert _live_hooks(loaded) == []  # the loaded model's hooks are inert
    torch.testing.assert_close(loaded(x), lc)
    # The original keeps working with the outputs it had before the save.
    with torch.no_grad():
        torch.testing.assert_close(got._capture.lookup(lc), model[0](x))
    assert torch.isfinite(got(lc, la, y))


@pytest.mark.parametrize("how", ["pickle", "torch"])
def test_regulariser_pickled_alone_says_how_to_rebuild(how):
    model = small()
    x, xa, y = data()
    got = GOTRegularizer(model, "0")
    lc, la = model(x), model(xa)
    back = _roundtrip(got, how)
    other = _roundtrip(model, how)
    with pytest.raises(LookupError, match=r"was unpickled.*GOTRegularizer\(model, '0', \.\.\.\)"):
        back(other(x), other(xa), y)
    with pytest.raises(LookupError, match=r"was unpickled"):
        back(lc, la, y)


@pytest.mark.parametrize("how", ["pickle", "torch"])
def test_model_and_regulariser_pickled_together_work_on_the_unpickled_model(how):
    model = small()
    x, xa, y = data()
    got = GOTRegularizer(model, "0")
    lc, la = model(x), model(xa)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GOTConvergenceWarning)
        v = float(got(lc, la, y).detach())
        pair = _roundtrip({"model": model, "got": got}, how)
        m2, g2 = pair["model"], pair["got"]
        with torch.no_grad():
            for p in m2.parameters():
                p.mul_(0.5)  # so that features of the original model would give another value
        out = m2(x)
        with torch.no_grad():
            torch.testing.assert_close(g2._capture.lookup(out), m2[0](x))
        fresh = GOTRegularizer(m2, "0")
        v2, v_ref = g2(m2(x), m2(xa), y), fresh(m2(x), m2(xa), y)
    assert float(v2.detach()) == pytest.approx(float(v_ref.detach()), rel=1e-6)
    assert float(v2.detach()) != pytest.approx(v, rel=1e-3)
    g2.remove()
    fresh.remove()
    assert _live_hooks(m2) == []


def test_a_select_callable_that_cannot_be_pickled():
    torch.manual_seed(0)
    model = Seq(batch_first=True)
    cap = FeatureCapture(model, "rnn", select=lambda out: out[0])
    x = torch.randn(4, 3, 6)
    out = model(x)
    loaded = _roundtrip(model, "torch")  # a whole-model save still works
    torch.testing.assert_close(loaded(x), out)
    pair = _roundtrip({"model": model, "cap": cap}, "torch")
    with pytest.raises(RuntimeError, match="select= callable .*<lambda> could not be pickled"):
        pair["cap"].lookup(pair["model"](x))


def test_dropping_the_regulariser_takes_its_hooks_off():
    model = small()
    got = GOTRegularizer(model, "0")
    assert len(model._forward_hooks) == 1 and len(model[0]._forward_hooks) == 1
    del got
    gc.collect()
    assert len(model._forward_hooks) == len(model._forward_pre_hooks) == len(model[0]._forward_hooks) == 0


# -- 4. the contract on the layer's output -------------------------------------------------------------
class Seq(nn.Module):
    def __init__(self, batch_first, T_equals_B=True):
        super().__init__()
        self.rnn = nn.LSTM(6, 5, batch_first=batch_first)
        self.head = nn.Linear(5, 3)
        self.batch_first = batch_first

    def forward(self, x):  # x is (B, T, 6)
        seq = x if self.batch_first else x.transpose(0, 1)
        out, _ = self.rnn(seq)
        last = out[:, -1] if self.batch_first else out[-1]
        return self.head(last)


def test_sequence_first_modules_are_refused_unless_select_makes_them_batch_first():
    torch.manual_seed(0)
    model = Seq(batch_first=False)
    with pytest.raises(ValueError, match=r"'rnn' is a LSTM built with batch_first=False.*\(T, B, \.\.\.\)"):
        FeatureCapture(model, "rnn")
    with pytest.raises(ValueError, match="batch_first=False"):
        FeatureCapture(model, "rnn", select=0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(4, 2), 1, enable_nested_tensor=False)
    for layer in (nn.MultiheadAttention(4, 2), encoder):
        with pytest.raises(ValueError, match="batch_first=False"):
            FeatureCapture(nn.Sequential(layer), "0")
    x = torch.randn(4, 4, 6)  # T == B: a wrong layout would pass every shape check
    got = GOTRegularizer(model, "rnn", select=lambda out: out[0].transpose(0, 1))
    out = model(x)
    with torch.no_grad():
        true = model.rnn(x.transpose(0, 1))[0].transpose(0, 1).reshape(4, -1)
    torch.testing.assert_close(got._capture.lookup(out), true)


def test_several_tensors_in_the_layer_output_need_select():
    torch.manual_seed(0)
    model = Seq(batch_first=True)
    x = torch.randn(4, 3, 6)
    cap = FeatureCapture(model, "rnn")
    with pytest.raises(
        ValueError,
        match=r"'rnn' returned a tuple holding 3 tensors of shapes \(4, 3, 5\), "
        r"\(1, 4, 5\), \(1, 4, 5\); say which one .*select=",
    ):
        cap.lookup(model(x))
    cap.remove()
    got = GOTRegularizer(model, "rnn", select=0)
    out = model(x)
    with torch.no_grad():
        torch.testing.assert_close(got._capture.lookup(out), model.rnn(x)[0].reshape(4, -1))


@dataclasses.dataclass
class Parts:
    feat: torch.Tensor
    aux: torch.Tensor


class Multi(nn.Module):
    """A layer with a dict, dataclass or (tensor, None) output."""

    def __init__(self, kind):
        super().__init__()
        self.lin, self.kind = nn.Linear(6, 12), kind

    def forward(self, x):
        h = self.lin(x)
        if self.kind == "dict":
            return {"feat": h, "aux": h.sum(1)}
        if self.kind == "dataclass":
            return Parts(h, h.sum(1))
        return h, None


class Head(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.body, self.head = Multi(kind), nn.Linear(12, 3)

    def forward(self, x):
        o = self.body(x)
        h = o["feat"] if isinstance(o, dict) else o.feat if isinstance(o, Parts) else o[0]
        return self.head(h)


@pytest.mark.parametrize("kind,select", [("dict", "feat"), ("dataclass", "feat"), ("tuple", None)])
def test_select_by_key_or_attribute_and_a_single_tensor_container(kind, select):
    torch.manual_seed(0)
    model = Head(kind)
    cap = FeatureCapture(model, "body", select=select)
    x = torch.randn(4, 6)
    out = model(x)
    with torch.no_grad():
        torch.testing.assert_close(cap.lookup(out), model.body.lin(x))


def test_bad_select_and_batch_mismatch_are_named():
    torch.manual_seed(0)
    with pytest.raises(TypeError, match="select must be an index.*got float"):
        FeatureCapture(small(), "0", select=0.5)
    model = small()
    cap = FeatureCapture(model, "0", select=0)
    with pytest.raises(TypeError, match=r"select=0 picks a part .* returned a tensor of shape \(4, 12\)"):
        cap.lookup(model(torch.randn(4, 6)))
    cap.remove()
    model = Head("dict")
    cap = FeatureCapture(model, "body", select="missing")
    with pytest.raises(TypeError, match=r"select='missing' took NoneType, not a tensor"):
        cap.lookup(model(torch.randn(4, 6)))

    class Transposed(nn.Module):
        def forward(self, h):
            return h.t()

    model = nn.Sequential(nn.Linear(6, 5), Transposed(), nn.Flatten(0), nn.Unflatten(0, (4, 5)), nn.Linear(5, 3))
    cap = FeatureCapture(model, "1")
    with pytest.raises(
        ValueError,
        match=r"layer '1' returned a tensor of shape \(5, 4\) .* of shape \(4, 3\): "
        r"the layer's output must be batch-first, with 4 rows",
    ):
        cap.lookup(model(torch.randn(4, 6)))


def test_layer_name_errors_keep_close_matches():
    with pytest.raises(ValueError, match=r"layer '00' is not a submodule of Sequential\. Close matches: '0'"):
        FeatureCapture(small(), "00")


# -- 5. outputs in containers, and copies of the regulariser --------------------------------------------
@dataclasses.dataclass
class Out:
    logits: torch.Tensor
    extra: tuple


class Wrapped(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.net, self.kind = small(), kind

    def forward(self, x):
        logits = self.net(x)
        if self.kind == "dataclass":
            return Out(logits, (logits.sum(),))
        if self.kind == "nested":
            return logits.sum(), (logits, [logits.exp()])
        return Opaque(logits)


class Opaque:
    def __init__(self, logits):
        self.logits = logits


@pytest.mark.parametrize("kind", ["dataclass", "nested"])
def test_outputs_in_dataclasses_and_nested_containers_are_filed(kind):
    model = Wrapped(kind)
    x, xa, y = data()
    got = GOTRegularizer(model, "net.0")
    pick = (lambda o: o.logits) if kind == "dataclass" else (lambda o: o[1][0])
    lc, la = pick(model(x)), pick(model(xa))
    with torch.no_grad():
        torch.testing.assert_close(got._capture.lookup(lc), model.net[0](x))
    ref = GOTRegularizer(model.net, "0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GOTConvergenceWarning)
        v, v_ref = got(lc, la, y), ref(model.net(x), model.net(xa), y)
    assert float(v.detach()) == pytest.approx(float(v_ref.detach()), rel=1e-6)


def test_an_output_object_without_tensors_found_is_named():
    model = Wrapped("opaque")
    cap = FeatureCapture(model, "net.0")
    out = model(torch.randn(4, 6))
    with pytest.raises(LookupError, match="last forward in this thread returned Opaque, in which no tensor was found"):
        cap.lookup(out.logits)


def test_deep_copy_of_the_regulariser_shares_the_hooks():
    model = small()
    x, xa, y = data()
    got = GOTRegularizer(model, "0")
    twin = copy.deepcopy(got)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GOTConvergenceWarning)
        lc, la = model(x), model(xa)
        assert float(twin(lc, la, y).detach()) == float(got(lc, la, y).detach())
    with torch.no_grad():
        torch.testing.assert_close(twin._capture.lookup(lc), model[0](x))
    twin.remove()
    with pytest.raises(RuntimeError, match="removed"):
        got(model(x), model(xa), y)


def test_deep_copy_of_a_container_with_model_and_regulariser():
    model = small()
    x, xa, y = data()
    got = GOTRegularizer(model, "0")
    lc = model(x)  # alive during the copy
    state = copy.deepcopy({"model": model, "got": got})
    m2, g2 = state["model"], state["got"]
    with torch.no_grad():
        for p in m2.parameters():
            p.mul_(0.5)
    out = m2(x)
    with torch.no_grad():
        torch.testing.assert_close(g2._capture.lookup(out), m2[0](x))
        torch.testing.assert_close(got._capture.lookup(lc), model[0](x))
    fresh = GOTRegularizer(m2, "0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GOTConvergenceWarning)
        v2, v_ref = g2(m2(x), m2(xa), y), fresh(m2(x), m2(xa), y)
    assert float(v2.detach()) == pytest.approx(float(v_ref.detach()), rel=1e-6)


def test_inference_mode_forwards_are_filed():
    model = small()
    cap = FeatureCapture(model, "0")
    x = torch.randn(4, 6)
    with torch.inference_mode():
        out = model(x)
        torch.testing.assert_close(cap.lookup(out), model[0](x))


# -- life cycle: row slices, copies of the model, remove ------------------------------------------------
def test_row_slices_of_one_concatenated_forward():
    model = small()
    x, xa, _ = data()
    cap = FeatureCapture(model, "0")
    out = model(torch.cat([x, xa]))
    lc, la = out.chunk(2)
    head, tail = out.split([3, 13])
    with torch.no_grad():
        torch.testing.assert_close(cap.lookup(lc), model[0](x))
        torch.testing.assert_close(cap.lookup(la), model[0](xa))
        torch.testing.assert_close(cap.lookup(tail), model[0](torch.cat([x, xa]))[3:])
    with pytest.raises(LookupError, match=r"is a view of the model's output but not a row slice of it"):
        cap.lookup(out[:, :2])
    with pytest.raises(LookupError, match=r"no features recorded for logits: pass the tensor returned"):
        cap.lookup(lc * 1.0)


def test_copies_of_the_model_share_the_capture_until_remove():
    model = small()
    x, _, _ = data()
    cap = FeatureCapture(model, "0")
    twin = copy.deepcopy(model)  # an EMA copy, made after the hooks were on
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.9)
    a, b = model(x), twin(x)
    with torch.no_grad():
        torch.testing.assert_close(cap.lookup(a), model[0](x))
        torch.testing.assert_close(cap.lookup(b), twin[0](x))  # the copy's own features
        assert not torch.allclose(cap.lookup(a), cap.lookup(b))
    cap.remove()
    assert len(model._forward_hooks) == len(model._forward_pre_hooks) == len(model[0]._forward_hooks) == 0
    out = twin(x)  # the copy's hooks are inert after remove()
    assert len(cap) == 0 and _live_hooks(twin) == []
    with pytest.raises(LookupError):
        cap.lookup(out)
    cap.remove()  # idempotent


def test_context_manager_takes_the_hooks_off_even_on_error():
    model = small()
    with FeatureCapture(model, "0") as cap:
        assert len(model._forward_hooks) == len(model._forward_pre_hooks) == len(model[0]._forward_hooks) == 1
        assert len(cap.lookup(model(torch.randn(2, 6)))) == 2
    assert len(model._forward_hooks) == len(model._forward_pre_hooks) == len(model[0]._forward_hooks) == 0
    with pytest.raises(KeyError):
        with FeatureCapture(model, "0"):
            raise KeyError("boom")
    assert len(model._forward_hooks) == len(model._forward_pre_hooks) == len(model[0]._forward_hooks) == 0
