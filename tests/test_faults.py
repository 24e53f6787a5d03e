"""Bad input and faults: each case gives a clear error or a defined behaviour, never a silent NaN."""

import math

import nets
import pytest
import torch
from nets import mlp
from torch import nn

from got_reg import GOTRegularizer
from got_reg.functional import joint_cost


def batch(B=8, seed=0):
    return nets.batch(B, seed, noise=0.05)


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
@pytest.mark.parametrize("solver", ["sinkhorn", "dual"])
def test_non_finite_input_raises_naming_the_tensor_or_skips(where, side, bad, solver):
    model, feat, logit = poisoned_model()
    x, xa, y = batch()
    poison = feat if where == "features" else logit
    got = GOTRegularizer(model, "1", label_matching=True, solver=solver)
    skip = GOTRegularizer(model, "1", label_matching=True, solver=solver, nan_policy="skip")
    poison.value = bad if side == "clean" else None
    lc = model(x)
    poison.value = bad if side == "adv" else None
    la = model(xa)
    with pytest.raises(FloatingPointError, match=NAMES[where, side]):
        got(lc, la, y)
    with pytest.warns(RuntimeWarning, match="GOT term skipped for this step: non-finite values in"):
        out = skip(lc, la, y)
    # A zero loss, and no diagnostics for the step (a skipped step has none).
    assert float(out) == 0.0 and out.dtype == torch.float32 and skip.diagnostics is None
    if solver == "dual":
        assert bool(torch.isfinite(skip.potential.weight).all())  # φ never saw the NaN
    # The zero can be added to the step's loss, which then backpropagates as usual.
    poison.value = None
    ce = nn.functional.cross_entropy(model(x), y)
    (ce + out).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    # The next clean step works again with the same regulariser, with the value of a fresh one.
    fresh = GOTRegularizer(model, "1", label_matching=True)
    lc, la = model(x), model(xa)
    if solver == "sinkhorn":
        assert float(skip(lc, la, y).detach()) == float(fresh(lc, la, y).detach())
    else:
        assert math.isfinite(float(skip(lc, la, y).detach())) and skip.diagnostics is not None


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
    got = GOTRegularizer(model, "2", beta=10.0, anchor="none", debias=False)
    x, xa, y = batch()
    with pytest.raises(ValueError, match=r"\(8, 4\).*\(5, 4\)"):
        got(model(x), model(xa[:5]), y)
    # B = 1: the only plan is P = 1 and W = C[0, 0] exactly.
    lc, la = model(x[:1]), model(xa[:1])
    v = got(lc, la, y[:1])
    C = joint_cost(model[:3](x[:1]), model[:3](xa[:1]), lc, la)
    assert float(v.detach()) == pytest.approx(10 * float(C[0, 0].detach()), rel=1e-6)


def test_label_matching_with_all_distinct_labels_is_the_mean_diagonal_cost():
    """1×1 blocks force P = I/B: W = mean_i C_ii + θ·KL(I/B ‖ 1/B²) = mean diag + θ log B."""
    model = mlp()
    got = GOTRegularizer(model, "2", beta=10.0, label_matching=True, anchor="none", debias=False)
    x, xa, _ = batch()
    y = torch.arange(8)  # every class on its own: 1×1 blocks
    lc, la = model(x), model(xa)
    v = got(lc, la, y)
    C = joint_cost(model[:3](x), model[:3](xa), lc, la)
    assert float(v.detach()) == pytest.approx(10 * (float(C.detach().diagonal().mean()) + 0.1 * math.log(8)), rel=1e-6)
    assert got.diagnostics.as_dict()["same_label_mass"] == 1.0


def test_wrong_labels():
    model = mlp()
    got = GOTRegularizer(model, "2", label_matching=True)
    x, xa, y = batch()
    lc, la = model(x), model(xa)
    with pytest.raises(ValueError, match=r"y must hold one label per example, shape \(8,\), got \(4,\)"):
        got(lc, la, y[:4])
    with pytest.raises(ValueError, match=r"y must be 1-D, got shape \(8, 1\)"):
        got(lc, la, y[:, None])
    with pytest.raises(TypeError, match="integer class indices"):
        got(lc, la, y.bool())
    with pytest.raises(TypeError, match="integer class indices"):
        got(lc, la, y.float())
    with pytest.raises(TypeError, match="y must be a torch.Tensor"):
        got(lc, la, y.tolist())
    with pytest.raises(ValueError, match="needs the labels"):
        got(lc, la)
    # Issue 13 (10): labels on another device ("meta" stands in for a second device): our message, not torch's.
    with pytest.raises(ValueError, match="y must be on the logits' device cpu, got meta"):
        got(lc, la, y.to("meta"))


def _rss_kb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4


@pytest.mark.slow  # 10,000 training calls: ~30 s on an idle 2-core CPU
@pytest.mark.filterwarnings("ignore::got_reg.GOTCollapseWarning")  # an untrained model at chance level
def test_ten_thousand_calls_keep_memory_flat():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: thread hand-offs would dominate on a shared machine
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
        # theta=1, no self-terms: few Sinkhorn sweeps, so 10k calls stay fast; the book-keeping tested is the same.
        got = GOTRegularizer(model, "1", label_matching=True, theta=1.0, debias=False)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_the_finite_flag_equals_isfinite_on_every_input(dtype):
    """all_finite (one aminmax per tensor) against isfinite(t).all(): one poisoned entry anywhere in any of
    the tensors, the largest finite values (whose sum would overflow), 0-d and empty tensors."""
    from got_reg._checks import all_finite

    big = torch.finfo(dtype).max
    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        ts = [torch.randn(5, 7, generator=g).to(dtype), torch.randn(3, generator=g).to(dtype), torch.tensor(1.5)]
        ts[0][0, 0] = big  # finite; a sum of the extremes would be inf
        ts[0][1, 1] = -big
        if trial % 4:
            k = trial % 2
            flat = ts[k].view(-1)
            flat[int(torch.randint(flat.numel(), (1,), generator=g))] = [math.nan, math.inf, -math.inf][trial % 3]
        ts.append(torch.empty(0, 4, dtype=dtype))
        expected = all(bool(torch.isfinite(t).all()) for t in ts)
        got = all_finite(*ts)
        assert got.dtype == torch.bool and got.ndim == 0
        assert bool(got) == expected, (trial, ts)
