"""The global-batch OT under torch.distributed: 2 gloo processes on CPU against one process."""

import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from got_reg import GOTConvergenceWarning, GOTRegularizer
from got_reg.distributed import gather_with_grad, world_size

# theta=0.3: Sinkhorn reaches tol=1e-10 in ~100 sweeps here (at 0.1 it takes ~15,000), so the
# comparison can be tight and fast.
OPTS = dict(beta=3.0, theta=0.3, label_matching=True, tol=1e-10, max_iter=5000)
SHARDS = (5, 7)  # uneven on purpose: DistributedSampler without padding, or a last batch


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3)).double()


def global_batch():
    g = torch.Generator().manual_seed(1)
    n = sum(SHARDS)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    return x, x + 0.1 * torch.randn(n, 6, generator=g, dtype=torch.float64), torch.arange(n) % 3


def loss_fn(model, got, x, xa, y):
    lc, la = model(x), model(xa)
    return nn.functional.cross_entropy(la, y) + got(lc, la, y)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        model = make_model()
        ddp = nn.parallel.DistributedDataParallel(model)
        got = GOTRegularizer(ddp, "module.3", distributed_gather=True, **OPTS)
        x, xa, y = global_batch()
        lo = sum(SHARDS[:rank])
        sl = slice(lo, lo + SHARDS[rank])
        with warnings.catch_warnings():
            warnings.simplefilter("error", GOTConvergenceWarning)  # they all converge
            lc, la = ddp(x[sl]), ddp(xa[sl])
            loss = nn.functional.cross_entropy(la, y[sl]) * SHARDS[rank] * 2 / sum(SHARDS) + got(lc, la, y[sl])
        loss.backward()
        res = {}
        # nan_policy="skip" under the gather: one rank's NaN makes every rank skip (no rank left
        # waiting in all_gather).
        skip = GOTRegularizer(ddp, "module.3", distributed_gather=True, nan_policy="skip", **OPTS)
        with torch.no_grad():
            lc, la = ddp(x[sl]), ddp(xa[sl])
            if rank == 1:
                la[0, 0] = float("nan")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                zero = skip(lc, la, y[sl])
        res["skip"] = (float(zero), skip.diagnostics is None, [str(w.message) for w in caught])
        # DDP with find_unused_parameters=True returns new tensors (_DDPSink): hooks on the wrapper see them.
        ddp2 = nn.parallel.DistributedDataParallel(make_model(), find_unused_parameters=True)
        got2 = GOTRegularizer(ddp2, "3", distributed_gather=True, **OPTS)
        with warnings.catch_warnings():
            warnings.simplefilter("error", GOTConvergenceWarning)  # they all converge
            got2(ddp2(x[sl]), ddp2(xa[sl]), y[sl]).backward()
        res["unused_value"] = float(got2.diagnostics.value)
        inner = GOTRegularizer(ddp2.module, "3", distributed_gather=True, **OPTS)
        try:
            inner(ddp2(x[sl]), ddp2(xa[sl]), y[sl])
            res["inner"] = "ok"
        except Exception as e:  # recorded for the report only
            res["inner"] = f"{type(e).__name__}: {e}"
        t = torch.arange(3.0, requires_grad=True) + rank
        gathered = gather_with_grad(t[: 1 + rank])
        (gt,) = torch.autograd.grad(gathered.sum(), t)
        torch.save(
            {
                "value": float(got.diagnostics.value),
                "batch": got.diagnostics.batch,
                "grads": [p.grad for p in model.parameters()],
                "gathered": gathered.detach(),
                "gt": gt,
                **res,
            },
            os.path.join(out, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # spawns two processes that each import torch and join a gloo group
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_two_gloo_ranks_match_the_single_process_global_batch(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))

    model = make_model()
    got = GOTRegularizer(model, "3", **OPTS)
    x, xa, y = global_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error", GOTConvergenceWarning)  # they all converge
        loss_fn(model, got, x, xa, y).backward()
    # (a) every rank solved the OT over the concatenated global batch
    assert r0["batch"] == r1["batch"] == sum(SHARDS)
    value = float(got.diagnostics.value)
    assert r0["value"] == pytest.approx(value, rel=1e-10) and r1["value"] == pytest.approx(value, rel=1e-10)
    # (b) after DDP's averaging, gradients equal the single-process global-batch gradients
    for g0, g1, ref in zip(r0["grads"], r1["grads"], [p.grad for p in model.parameters()]):
        torch.testing.assert_close(g0, ref, rtol=1e-7, atol=1e-10)
        torch.testing.assert_close(g1, ref)
    # the gather concatenates uneven shards in rank order and keeps each rank's own gradient only
    torch.testing.assert_close(r0["gathered"], torch.tensor([0.0, 1.0, 2.0]))
    torch.testing.assert_close(r0["gt"], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(r1["gt"], torch.tensor([1.0, 1.0, 0.0]))
    # one rank's NaN: both ranks skip with a warning and a zero loss
    for r, name in ((r0, "another rank"), (r1, "logits_adv")):
        zero, no_diagnostics, messages = r["skip"]
        assert zero == 0.0 and no_diagnostics and any("skipped" in m and name in m for m in messages)
    # find_unused_parameters=True (outputs re-wrapped by DDP): the same global value
    assert r0["unused_value"] == pytest.approx(value, rel=1e-10)
    assert r1["unused_value"] == pytest.approx(value, rel=1e-10)
    # Built on the inner module, it cannot see DDP's new outputs, and says to build it on the wrapper.
    for r in (r0, r1):
        assert r["inner"].startswith("LookupError") and "DistributedDataParallel wrapper" in r["inner"]


def test_without_process_group_falls_back_to_local():
    assert world_size() == 1
    model = make_model()
    x, xa, y = global_batch()
    got = GOTRegularizer(model, "3", distributed_gather=True, **OPTS)
    plain = GOTRegularizer(model, "3", **OPTS)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GOTConvergenceWarning)  # they all converge
        lc, la = model(x), model(xa)
        assert float(got(lc, la, y).detach()) == float(plain(lc, la, y).detach())
    t = torch.ones(2, requires_grad=True)
    assert gather_with_grad(t) is t


def test_data_parallel_is_refused_with_a_clear_message():
    model = make_model()
    with pytest.raises(TypeError, match="DataParallel is not supported.*DistributedDataParallel"):
        GOTRegularizer(nn.DataParallel(model), "module.3")
    with pytest.raises(TypeError, match="DataParallel is not supported"):
        GOTRegularizer(nn.DataParallel(model), model[3])


def _pretend_another_rank(monkeypatch, code=2):
    """Two ranks, of which the other one holds a NaN (code 2) or lost its features (code 1): the collective
    decision (rank_max) says so."""
    import got_reg.regularizer as reg

    monkeypatch.setattr(reg, "world_size", lambda: 2)
    monkeypatch.setattr(reg, "gather_with_grad", lambda t: t)
    monkeypatch.setattr(reg, "rank_max", lambda value, device: max(value, code))


def _pretend_another_rank_is_non_finite(monkeypatch):
    _pretend_another_rank(monkeypatch, 2)


def test_skip_follows_a_non_finite_value_on_another_rank(monkeypatch):
    _pretend_another_rank_is_non_finite(monkeypatch)
    model = make_model()
    x, xa, y = global_batch()
    got = GOTRegularizer(model, "3", distributed_gather=True, nan_policy="skip", **OPTS)
    with pytest.warns(RuntimeWarning, match="another rank"):
        assert float(got(model(x), model(xa), y)) == 0.0


def test_raise_follows_a_non_finite_value_on_another_rank(monkeypatch):
    _pretend_another_rank_is_non_finite(monkeypatch)
    model = make_model()
    x, xa, y = global_batch()
    got = GOTRegularizer(model, "3", distributed_gather=True, **OPTS)
    with pytest.raises(FloatingPointError, match="another rank.*every rank raises"):
        got(model(x), model(xa), y)


class _MaybeInPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.on = False

    def forward(self, x):
        return x.tanh_() if self.on else x.tanh()


def test_features_overwritten_on_any_rank_make_every_rank_skip(monkeypatch):
    """hooks.FeaturesOverwritten under distributed_gather: the rank that lost its features and the others all
    skip the term (with a warning), so that none waits in all_gather."""
    from got_reg import hooks

    monkeypatch.setattr(hooks, "CLEAN_FORWARDS", 1)
    torch.manual_seed(0)
    layers = [nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 12), nn.Identity(), _MaybeInPlace(), nn.Linear(12, 3)]
    model = nn.Sequential(*layers).double()
    x, xa, y = global_batch()
    got = GOTRegularizer(model, "3", distributed_gather=True, **OPTS)
    _pretend_another_rank(monkeypatch, 1)
    with pytest.warns(RuntimeWarning, match="another rank's features were overwritten"):
        assert float(got(model(x), model(xa), y)) == 0.0
    _pretend_another_rank(monkeypatch, 0)  # this rank loses its own: the model now changes the layer in place
    model[4].on = True
    with pytest.warns(RuntimeWarning, match="GOT term skipped for this step: the output of layer '3' was changed"):
        assert float(got(model(x), model(xa), y)) == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # copied from now on: the term is back
        assert float(got(model(x), model(xa), y)) != 0.0
    # lost here while another rank holds a NaN (nan_policy="raise"): this rank raises with the others
    fresh = GOTRegularizer(model, "3", distributed_gather=True, **OPTS)
    model[4].on = False
    fresh(model(x), model(xa), y)
    model[4].on = True
    _pretend_another_rank(monkeypatch, 2)
    with pytest.raises(FloatingPointError, match="another rank's features or logits hold NaN"):
        fresh(model(x), model(xa), y)
