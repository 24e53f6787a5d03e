"""got_reg.graphs: the packing of the diagnostics (any device), and the CUDA-graph replay against the eager
call (CUDA with Triton only: values, gradients and diagnostics equal over several steps, diagnostics that
outlive later replays, one capture per shape, the stale backward refused)."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch import nn

from got_reg import GOTRegularizer
from got_reg.diagnostics import interpret_flags
from got_reg.functional import GOTConfig, got_forward
from got_reg.graphs import (
    FlatGroups,
    PackedDiagnostics,
    diagnostics_from,
    diagnostics_tensors,
    pack,
    unpack,
    unpack_one,
)
from got_reg.solvers.lse import triton_module


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype and a.stride() == b.stride()
    assert torch.equal(a, b)


def test_pack_roundtrip_mixed_dtypes_views_and_empty():
    g = torch.Generator().manual_seed(0)
    stacked = torch.randn(3, 5, 7, generator=g)
    ints = torch.arange(3, dtype=torch.int64)
    flags = torch.tensor([True, False, True])
    strided = torch.randn(6, 4, generator=g).t()  # not contiguous, no contiguous base
    tensors = [
        stacked[0],
        stacked[2],  # views of one base: stored once
        ints[1],
        flags,
        flags[2],
        torch.tensor(2.5, dtype=torch.float64),
        strided,
        torch.empty(0, 3),
        torch.tensor(7, dtype=torch.int32),
    ]
    flat, layout = pack(tensors)
    assert flat.dtype == torch.uint8 and flat.dim() == 1
    assert len(layout.slots) == 7  # the stacked base, ints, flags, float64, strided copy, empty, int32
    out = unpack(flat.clone(), layout)
    for a, b in zip(tensors, out):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.equal(a, b)
    for i in (0, 1, 2, 3, 4):  # views keep their strides
        assert out[i].stride() == tensors[i].stride()
    # Unpacked tensors view the buffer they came from, not the originals.
    copy = flat.clone()
    again = unpack(copy, layout)
    stacked.zero_()
    assert torch.equal(again[0], out[0]) and again[0].abs().sum() > 0
    copy.zero_()
    assert again[0].abs().sum() == 0


def _problem(B=24, D=16, K=4, seed=0, device="cpu", grad=True):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, D, generator=g)
    t = [z, z + 0.3 * torch.randn(B, D, generator=g), torch.randn(B, K, generator=g), torch.randn(B, K, generator=g)]
    t = [x.to(device).requires_grad_(grad) for x in t]
    y = torch.arange(B, device=device) % K
    return (*t, y)


@pytest.mark.parametrize("debias", [True, False])
@pytest.mark.parametrize("label_matching", [True, False])
def test_diagnostics_roundtrip_through_pack(debias, label_matching):
    z, za, lc, la, y = _problem()
    cfg = GOTConfig(beta=10.0, label_matching=label_matching, debias=debias)
    _, diag = got_forward(cfg, z, za, lc, la, y)
    flat, layout = pack(diagnostics_tensors(diag))
    back = diagnostics_from(diag, unpack(flat.clone(), layout))
    a, b = diagnostics_tensors(diag), diagnostics_tensors(back)
    assert len(a) == len(b)
    for x, w in zip(a, b):
        _same_tensor(x, w)
    assert back.as_dict() == diag.as_dict()
    assert back.read_flags() == diag.read_flags()
    assert len(back.self_terms) == (2 if debias else 0)


@pytest.mark.parametrize("converged", [True, False])
def test_packed_diagnostics_read_their_flags_and_unpack_once(converged):
    """What the regulariser gets from a replay: the flags read from the packed copy (as GOTDiagnostics.read_flags
    reads them), the diagnostics built from it on demand, once."""
    z, za, lc, la, y = _problem()
    cfg = GOTConfig(beta=10.0, label_matching=True, max_iter=1000 if converged else 2)
    _, diag = got_forward(cfg, z, za, lc, la, y)
    flat, layout = pack([diag.flags(), *diagnostics_tensors(diag)])
    packed = PackedDiagnostics(flat.clone(), layout, diag)
    assert packed.read_flags() == diag.read_flags() == (True, converged)
    back = packed.unpack()
    assert packed.unpack() is back
    for x, w in zip(diagnostics_tensors(diag), diagnostics_tensors(back)):
        _same_tensor(x, w)
    assert torch.equal(unpack_one(flat, layout, 0), diag.flags())
    # a non-finite value: the flag from the copy says so
    nan = dataclasses.replace(diag, finite=torch.tensor(False))
    flat, layout = pack([nan.flags(), *diagnostics_tensors(nan)])
    assert PackedDiagnostics(flat, layout, nan).read_flags() == (False, converged)
    assert interpret_flags([True]) == (True, None)  # the dual without debias: no Sinkhorn solve


def test_flat_groups_concat_and_split_one_buffer_per_dtype():
    g = torch.Generator().manual_seed(1)
    ts = [
        torch.randn(3, 4, generator=g),
        None,
        torch.arange(5),
        torch.randn(2, 6, generator=g).t(),  # not contiguous: copied in by the cat
        torch.randn(7, generator=g, dtype=torch.float64),
        torch.randn(1, 1, generator=g),
    ]
    groups = FlatGroups(ts)
    bufs = groups.concat(ts)
    assert [(b.dtype, b.numel()) for b in bufs] == [(torch.float32, 12 + 12 + 1), (torch.int64, 5), (torch.float64, 7)]
    back = groups.split(bufs)
    assert back[1] is None
    for a, b in zip(ts, back):
        if a is not None:
            assert b.shape == a.shape and b.dtype == a.dtype and torch.equal(a, b)
            assert b.untyped_storage().data_ptr() in {x.untyped_storage().data_ptr() for x in bufs}


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 5))


def test_validation_and_cpu_fallback_warns_once():
    with pytest.raises(TypeError, match="cuda_graphs must be a bool"):
        GOTRegularizer(_net(), "1", cuda_graphs=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="solver='sinkhorn' with backend='torch'.*solver='dual'"):
        GOTRegularizer(_net(), "1", cuda_graphs=True, solver="dual")
    with pytest.raises(ValueError, match="backend='geomloss'"):
        GOTRegularizer(_net(), "1", cuda_graphs=True, backend="geomloss")
    net = _net()
    eager, graphed = GOTRegularizer(net, "1", beta=10.0), GOTRegularizer(net, "1", beta=10.0, cuda_graphs=True)
    x, y = torch.randn(16, 12), torch.arange(16) % 5
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        a = eager(net(x), net(x + 0.1), y)
        b = graphed(net(x), net(x + 0.1), y)
        graphed(net(x), net(x + 0.1), y)
        with torch.no_grad():  # evaluation: eager without a word
            graphed(net(x), net(x + 0.1), y)
    msgs = [str(m.message) for m in w if issubclass(m.category, RuntimeWarning)]
    assert msgs == [
        "GOTRegularizer(cuda_graphs=True) runs this call eagerly: the features and logits are not on a CUDA device."
    ]
    assert torch.equal(a, b)


_GPU = torch.cuda.is_available() and triton_module() is not None
needs_gpu = pytest.mark.skipif(not _GPU, reason="needs CUDA and Triton")


class _Feed(nn.Module):
    """A model whose hooked layer passes given features through: got() on tensors the test controls."""

    def __init__(self) -> None:
        super().__init__()
        self.feat = nn.Identity()

    def forward(self, z, logits):
        self.feat(z)
        return logits.view_as(logits)


def _call(got, feed, z, za, lc, la, y):
    return got(feed(z, lc), feed(za, la), y)


def _eager_then_graphed(eager, graphed, feed, inputs, twin):
    """One call of each regulariser on the same values (``twin`` a copy of ``inputs``), each backpropagated:
    the losses and the input gradients agree."""
    le = _call(eager, feed, *inputs)
    le.backward()
    lg = _call(graphed, feed, *twin)
    lg.backward()
    torch.testing.assert_close(lg, le, rtol=1e-5, atol=1e-6)
    for a, b in zip(twin[:4], inputs[:4]):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7)


@needs_gpu
@pytest.mark.parametrize("options", [dict(), dict(label_matching=True), dict(label_matching=True, debias=False)])
def test_replay_equals_eager_over_steps(options):
    feed = _Feed()
    eager = GOTRegularizer(feed, "feat", beta=10.0, **options)
    graphed = GOTRegularizer(feed, "feat", beta=10.0, cuda_graphs=True, **options)
    kept = []
    for step in range(4):
        inputs = _problem(B=128, D=64, K=10, seed=step, device="cuda")
        twin = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs[:4]] + [inputs[4]]
        _eager_then_graphed(eager, graphed, feed, inputs, twin)
        de, dg = eager.diagnostics.as_dict(), graphed.diagnostics.as_dict()
        assert de.keys() == dg.keys()
        for k in de:
            assert dg[k] == pytest.approx(de[k], rel=1e-4, abs=1e-6), k
        kept.append((graphed.diagnostics, dg))
    assert len(graphed._graphs.captures) == 1
    for diag, seen in kept:  # later replays did not overwrite an earlier call's diagnostics
        assert diag.as_dict() == seen


@needs_gpu
def test_small_batch_captures_after_eager_calls_of_every_variant():
    """The order of bench_launches in one process, where a capture at B = 16 once failed (run 7, with the static
    inputs in one buffer per dtype): eager calls of GOT-S, GOT-LM and the dual, then graphed calls at B = 16,
    D = 64 against the eager ones."""
    feed = _Feed()
    inputs = _problem(B=16, D=64, K=10, seed=3, device="cuda")

    def twin():
        return [t.detach().clone().requires_grad_(True) for t in inputs[:4]] + [inputs[4]]

    for options in (dict(), dict(label_matching=True), dict(label_matching=True, solver="dual")):
        with GOTRegularizer(feed, "feat", beta=10.0, **options) as eager:
            for _ in range(3):
                _call(eager, feed, *twin()).backward()
    for options in (dict(), dict(label_matching=True)):
        eager = GOTRegularizer(feed, "feat", beta=10.0, **options)
        graphed = GOTRegularizer(feed, "feat", beta=10.0, cuda_graphs=True, **options)
        for _ in range(3):
            _eager_then_graphed(eager, graphed, feed, twin(), twin())
        assert len(graphed._graphs.captures) == 1
        eager.remove()
        graphed.remove()


@needs_gpu
def test_new_shape_recaptures_and_stale_backward_raises():
    feed = _Feed()
    got = GOTRegularizer(feed, "feat", beta=10.0, label_matching=True, cuda_graphs=True)
    for B in (128, 100, 128):
        loss = _call(got, feed, *_problem(B=B, D=64, K=10, seed=B, device="cuda"))
        loss.backward()
    assert len(got._graphs.captures) == 2
    first = _call(got, feed, *_problem(B=128, D=64, K=10, seed=1, device="cuda"))
    second = _call(got, feed, *_problem(B=128, D=64, K=10, seed=2, device="cuda"))
    with pytest.raises(RuntimeError, match="later call with the same shapes"):
        first.backward()
    second.backward()  # the latest call's backward is fine


@needs_gpu
def test_replay_has_one_host_read_and_too_large_batch_warns():
    feed = _Feed()
    got = GOTRegularizer(feed, "feat", beta=10.0, label_matching=True, cuda_graphs=True)
    inputs = _problem(B=128, D=64, K=10, seed=0, device="cuda")
    _call(got, feed, *inputs).backward()  # the capture
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            _call(got, feed, *inputs).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [m for m in w if "synchronizing CUDA operation" in str(m.message)]
    assert len(syncs) == 1  # read_flags: NaN check and convergence
    with pytest.warns(RuntimeWarning, match="batch size is above 256"):
        _call(got, feed, *_problem(B=300, D=64, K=10, seed=0, device="cuda")).backward()
