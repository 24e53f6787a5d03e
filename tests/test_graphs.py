"""got_reg.graphs: the packing of the diagnostics (any device); the replay's bookkeeping on CPU through an
emulated recorder (values, gradients, diagnostics and φ's steps equal to the eager call's, the scaled
backward in any order, captures dropped when φ is loaded, no host read in what would be captured, on the
CUDA path run through Triton's interpreter); and the CUDA-graph replay against the eager
call (CUDA with Triton only: the same over several steps, diagnostics that outlive later replays, one
capture per shape, one host read per call)."""

from __future__ import annotations

import copy
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
    reads them; also through the deferred host copy, which a later change of the copy does not reach), the
    diagnostics built from it on demand, once. The layout is the replay's: flags, returned loss, diagnostics."""
    z, za, lc, la, y = _problem()
    cfg = GOTConfig(beta=10.0, label_matching=True, max_iter=1000 if converged else 2)
    loss, diag = got_forward(cfg, z, za, lc, la, y)
    flat, layout = pack([diag.flags(), loss.detach(), *diagnostics_tensors(diag)])
    count = len(diagnostics_tensors(diag))
    packed = PackedDiagnostics(flat.clone(), layout, diag, count)
    assert packed.read_flags() == diag.read_flags() == (True, converged)
    deferred = PackedDiagnostics(flat.clone(), layout, diag, count)
    deferred.copy_flags()
    deferred._flat.zero_()  # after the copy: what read_flags reads is the copy's
    assert deferred.read_flags() == (True, converged)
    _same_tensor(packed.value, diag.value)  # what the collapse monitor reads, without building the rest
    assert packed._built is None
    back = packed.unpack()
    assert packed.unpack() is back
    for x, w in zip(diagnostics_tensors(diag), diagnostics_tensors(back)):
        _same_tensor(x, w)
    assert torch.equal(unpack_one(flat, layout, 0), diag.flags())
    # a non-finite value: the flag from the copy says so
    nan = dataclasses.replace(diag, finite=torch.tensor(False))
    flat, layout = pack([nan.flags(), loss.detach(), *diagnostics_tensors(nan)])
    assert PackedDiagnostics(flat, layout, nan, count).read_flags() == (False, converged)
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


@pytest.mark.parametrize("solver", ["sinkhorn", "dual"])
def test_validation_and_cpu_fallback_warns_once(solver):
    with pytest.raises(TypeError, match="cuda_graphs must be a bool"):
        GOTRegularizer(_net(), "1", cuda_graphs=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs backend='torch'.*got backend='geomloss'"):
        GOTRegularizer(_net(), "1", cuda_graphs=True, backend="geomloss", solver=solver)
    net = _net()
    eager = GOTRegularizer(net, "1", beta=10.0, solver=solver)
    graphed = GOTRegularizer(net, "1", beta=10.0, solver=solver, cuda_graphs=True)
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
    if solver == "dual":  # φ stepped once in each eager call with grad: the graphed one's fallback too
        assert graphed.potential.num_updates == 2 and eager.potential.num_updates == 1


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


class EagerRecorder:
    """The recorder protocol of :class:`got_reg.graphs.CUDARecorder` without CUDA: a "capture" runs the body
    once and a replay runs it again, copying its output into the static buffer. With it the CPU tests check
    the graphs' bookkeeping (static inputs, one packed copy per call, the scaled backward, φ's state kept
    through warm-up and capture); what only a real capture can get wrong is checked by the CUDA tests."""

    def __init__(self) -> None:
        self.captures = self.replays = 0

    def warm_up(self, run):
        run()

    def capture(self, body):
        self.captures += 1
        out, meta = body()

        def replay():
            self.replays += 1
            with torch.enable_grad():  # a Function's forward runs without grad; a real replay runs no Python
                out.copy_(body()[0])

        return replay, out, meta


def _emulated(got, monkeypatch):
    """``got`` (built with cuda_graphs=True) replaying through an EagerRecorder on CPU."""
    got._graphs.recorder = EagerRecorder()
    monkeypatch.setattr(got, "_graphable", lambda inputs: True)
    return got._graphs.recorder


def _twin(inputs):
    return [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs[:4]] + [inputs[4]]


_VARIANTS = [
    dict(),
    dict(label_matching=True, anchor="none"),
    dict(solver="dual", label_matching=True),
    dict(solver="dual", debias=False, dual_steps=2),
]


@pytest.mark.parametrize("options", _VARIANTS)
def test_emulated_replay_equals_eager_over_steps_and_keeps_phi_in_step(options, monkeypatch):
    """Replays (CPU emulation) against the eager call over steps of new data: losses, input gradients,
    diagnostics and, for the dual, φ's weight, Adam's state and update count; warm-up and capture leave φ
    as they found it, so each replay is one training step of φ as in the eager call."""
    feed = _Feed()
    eager = GOTRegularizer(feed, "feat", beta=10.0, **options)
    graphed = GOTRegularizer(feed, "feat", beta=10.0, cuda_graphs=True, **options)
    recorder = _emulated(graphed, monkeypatch)
    for step in range(3):
        inputs = _problem(seed=step)
        _eager_then_graphed(eager, graphed, feed, inputs, _twin(inputs))
        assert graphed.diagnostics.as_dict() == pytest.approx(eager.diagnostics.as_dict(), rel=1e-5, abs=1e-7)
        if eager.potential is not None:
            torch.testing.assert_close(graphed.potential.weight, eager.potential.weight, rtol=1e-5, atol=1e-7)
            we, wg = (g.potential.optimizer.state[g.potential.weight] for g in (eager, graphed))
            torch.testing.assert_close(wg["exp_avg_sq"], we["exp_avg_sq"], rtol=1e-5, atol=1e-12)
            assert graphed.potential.num_updates == eager.potential.num_updates == (step + 1) * eager.potential.steps
    assert (recorder.captures, recorder.replays) == (1, 3)


def test_emulated_backward_scales_by_the_upstream_gradient_in_any_order(monkeypatch):
    """One capture computes the gradients at unit upstream gradient; a call's backward multiplies its own copy,
    so it may run after later calls (no stale buffers) and with any upstream gradient, also after an
    in-place change of the loss."""
    feed = _Feed()
    eager = GOTRegularizer(feed, "feat", beta=10.0, label_matching=True)
    graphed = GOTRegularizer(feed, "feat", beta=10.0, label_matching=True, cuda_graphs=True)
    _emulated(graphed, monkeypatch)
    problems = [_problem(seed=s) for s in (5, 6)]
    twins = [_twin(p) for p in problems]
    losses = [_call(graphed, feed, *t) for t in twins]  # both calls before either backward
    for inputs, twin, loss, weight in reversed(list(zip(problems, twins, losses, (2.5, -0.5)))):
        loss.mul_(weight)  # in place, as on the eager loss
        loss.backward()
        reference = _call(eager, feed, *inputs)
        (weight * reference).backward()
        torch.testing.assert_close(loss, weight * reference.detach(), rtol=1e-5, atol=1e-6)
        for a, b in zip(twin[:4], inputs[:4]):
            if b.grad is None:  # anchor="clean": no gradient to the clean side
                assert a.grad is None or not a.grad.any()
            else:
                torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7)
    assert problems[0][1].grad is not None


def test_emulated_dual_recaptures_when_phi_is_loaded_and_eval_mode_leaves_it(monkeypatch):
    """A capture updates φ's tensors in place: loading a state dict (new Adam state tensors) drops the captures
    and the next call steps from the loaded state; a call with the model in eval mode (grad on) is its own
    capture and does not step φ."""
    feed = _Feed()
    trained = GOTRegularizer(feed, "feat", beta=10.0, solver="dual", label_matching=True)
    for s in range(3):
        _call(trained, feed, *_problem(seed=10 + s)).backward()
    graphed = GOTRegularizer(feed, "feat", beta=10.0, solver="dual", label_matching=True, cuda_graphs=True)
    recorder = _emulated(graphed, monkeypatch)
    _call(graphed, feed, *_problem(seed=0)).backward()
    graphed.load_state_dict(copy.deepcopy(trained.state_dict()))  # a checkpoint's copy (Adam's load keeps tensors)
    assert graphed.potential.num_updates == 3
    inputs = _problem(seed=1)
    _eager_then_graphed(trained, graphed, feed, inputs, _twin(inputs))
    assert recorder.captures == 2 and len(graphed._graphs.captures) == 1
    torch.testing.assert_close(graphed.potential.weight, trained.potential.weight, rtol=1e-5, atol=1e-7)
    assert graphed.potential.num_updates == trained.potential.num_updates == 4
    before = graphed.potential.weight.detach().clone()
    feed.eval()
    try:
        inputs = _problem(seed=2)
        _eager_then_graphed(trained, graphed, feed, inputs, _twin(inputs))
    finally:
        feed.train()
    assert torch.equal(graphed.potential.weight, before) and graphed.potential.num_updates == 4
    assert recorder.captures == 3 and len(graphed._graphs.captures) == 2


def _deferred(monkeypatch, **options):
    feed = _Feed()
    got = GOTRegularizer(feed, "feat", beta=10.0, cuda_graphs=True, deferred_checks=True, **options)
    _emulated(got, monkeypatch)
    return feed, got


def _with_nan(inputs, index=1):
    """``inputs`` with one entry of feature or logit tensor ``index`` set to NaN."""
    with torch.no_grad():
        inputs[index][3, 0] = float("nan")
    return inputs


@pytest.mark.parametrize("options", [dict(), dict(solver="dual", label_matching=True)])
def test_emulated_deferred_checks_read_each_calls_flags_at_the_next_call(options, monkeypatch):
    """deferred_checks: a replayed call reads no flags of its own (losses and gradients still the eager call's);
    the next call reads the previous call's, and check() the last one's, once."""
    read = []
    real = PackedDiagnostics.read_flags
    monkeypatch.setattr(PackedDiagnostics, "read_flags", lambda self: read.append(self) or real(self))
    feed, got = _deferred(monkeypatch, **options)
    eager = GOTRegularizer(feed, "feat", beta=10.0, **options)
    calls = []
    for step in range(3):
        inputs = _problem(seed=step)
        _eager_then_graphed(eager, got, feed, inputs, _twin(inputs))
        calls.append(got._pending)
        assert read == calls[:-1]  # the previous calls', not this one's
    assert got.diagnostics.as_dict() == pytest.approx(eager.diagnostics.as_dict(), rel=1e-5, abs=1e-7)
    got.check()
    got.check()
    assert read == calls and got._pending is None
    if got.potential is not None:
        torch.testing.assert_close(got.potential.weight, eager.potential.weight, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("solver", ["sinkhorn", "dual"])
@pytest.mark.parametrize("nan_policy", ["skip", "raise"])
def test_emulated_deferred_non_finite_call_returns_zero_and_the_next_call_warns_or_raises(
    solver, nan_policy, monkeypatch
):
    """A call with a NaN feature returns a zero loss and zero gradients without a word (decided inside the
    replay); the next call, or check(), warns ("skip") or raises ("raise"), resets a diverged φ and clears
    the diagnostics; a later call is the eager call again."""
    feed, got = _deferred(monkeypatch, label_matching=True, solver=solver, nan_policy=nan_policy)
    eager = GOTRegularizer(feed, "feat", beta=10.0, label_matching=True, solver=solver)
    inputs = _with_nan(_problem(seed=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = _call(got, feed, *inputs)
        loss.backward()
    assert loss.item() == 0.0
    assert inputs[1].grad is not None and not inputs[1].grad.any()  # zero, not NaN
    if solver == "dual":
        assert not torch.isfinite(got.potential.weight).all()  # the replay's φ step took the NaN
    message = "an earlier call had non-finite features.*(reset to 0)?"
    if nan_policy == "skip":
        with pytest.warns(RuntimeWarning, match="GOT term skipped: " + message) as w:
            got.check()
    else:
        with pytest.raises(FloatingPointError, match=message) as w:
            _call(got, feed, *_problem(seed=2))
    assert ("φ diverged" in str(w.list[0].message if nan_policy == "skip" else w.value)) == (solver == "dual")
    assert got.diagnostics is None and got._pending is None
    if solver == "dual":  # reset, so the next call steps from 0, as the unused eager potential does
        assert got.potential.built and not got.potential.weight.any()
    inputs = _problem(seed=3)
    _eager_then_graphed(eager, got, feed, inputs, _twin(inputs))


def test_leaving_the_with_block_checks_the_last_deferred_call(monkeypatch):
    feed, got = _deferred(monkeypatch, nan_policy="raise")
    with pytest.raises(FloatingPointError, match="an earlier call had non-finite"):
        with got:
            _call(got, feed, *_with_nan(_problem(seed=1))).backward()
    assert not got._capture.active  # the hooks came off all the same
    feed, got = _deferred(monkeypatch, nan_policy="raise")
    with pytest.raises(KeyError):  # an exception of the block's own is not replaced by the check's
        with got:
            _call(got, feed, *_with_nan(_problem(seed=1))).backward()
            raise KeyError("the loop's own")
    assert not got._capture.active and got._pending is not None


def test_emulated_deferred_unconverged_call_warns_at_the_next_call(monkeypatch):
    from got_reg import GOTConvergenceWarning

    feed, got = _deferred(monkeypatch, max_iter=2, tol=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _call(got, feed, *_problem(seed=0)).backward()
    with pytest.warns(GOTConvergenceWarning, match="tol=1e-09 after 2 iterations"):
        _call(got, feed, *_problem(seed=1)).backward()
    with pytest.warns(GOTConvergenceWarning):
        got.check()


class _CountingRecorder(EagerRecorder):
    """An :class:`EagerRecorder` that notes the host reads of each run of the body it would capture: the
    warm-up runs, the capture and every replay."""

    def __init__(self, reads) -> None:
        super().__init__()
        self.reads, self.per_body = reads, []

    def _counted(self, run):
        def counted():
            before = self.reads.n
            out = run()
            self.per_body.append(self.reads.n - before)
            return out

        return counted

    def warm_up(self, run):
        super().warm_up(self._counted(run))

    def capture(self, body):
        return super().capture(self._counted(body))


@pytest.mark.parametrize("options", _VARIANTS[:3])
def test_emulated_capture_body_reads_nothing_back_on_the_cuda_path(options, monkeypatch):
    """A host synchronisation inside a capture invalidates it (``cudaErrorStreamCaptureInvalidated``, the
    error of the capture that failed in run 7 of gpu_check, cause not found), and only a GPU shows that. On
    CPU, the CUDA path is emulated: the fused Sinkhorn kernel and the cost's kernels run under Triton's
    interpreter through their CUDA glue (benchmarks/bench_launches.py's backend and counters, which count
    every host read: item, bool, float, tolist, nonzero, boolean indexing, ...). Every run of the body that
    would be captured (warm-up, capture, replays: forward, backward at unit upstream gradient, φ's step,
    packing) reads nothing, and a replayed call reads once: its flags."""
    import sys
    from pathlib import Path

    from interpreted import kernel_modules

    kernel_modules("got_reg.solvers._triton", "got_reg.costs._triton_cosine_kl")
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:  # benchmarks/ is a package of the repository, not of the installed library
        sys.path.insert(0, root)
    from benchmarks.bench_launches import counting, interpreted_fused_backend

    backend = interpreted_fused_backend()
    assert backend is not None
    feed = _Feed()
    got = GOTRegularizer(feed, "feat", beta=10.0, cuda_graphs=True, backend=backend, **options)
    monkeypatch.setattr(got, "_graphable", lambda inputs: True)
    flag_reads = []
    monkeypatch.setattr(
        PackedDiagnostics, "read_flags", lambda d, _orig=PackedDiagnostics.read_flags: flag_reads.append(1) or _orig(d)
    )
    with counting() as (kernels, reads):
        got._graphs.recorder = recorder = _CountingRecorder(reads)
        for step in range(3):
            inputs = _problem(B=16, D=8, K=4, seed=step)
            before = reads.n
            loss = _call(got, feed, *inputs)
            assert reads.n - before == 1, (step, reads.n - before)  # the call's flags
            loss.backward()
    assert len(flag_reads) == 3 and kernels.ops["<triton>"] > 0  # the kernels ran (the cost's and the solver's)
    assert recorder.captures == 1 and recorder.replays == 3
    assert recorder.per_body == [0] * 5  # one warm-up, the capture, three replays: no host read in any
    got.remove()


def test_deferred_checks_validation():
    with pytest.raises(TypeError, match="deferred_checks must be a bool, got int"):
        GOTRegularizer(_net(), "1", cuda_graphs=True, deferred_checks=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="deferred_checks=True needs cuda_graphs=True.*got cuda_graphs=False"):
        GOTRegularizer(_net(), "1", deferred_checks=True)
    net = _net()
    got = GOTRegularizer(net, "1", cuda_graphs=True, deferred_checks=True)
    x, y = torch.randn(16, 12), torch.arange(16) % 5
    with pytest.warns(RuntimeWarning, match="not on a CUDA device"):  # an eager call reads its own flags
        got(net(x), net(x + 0.1), y)
    assert got._pending is None


def test_phi_unchanged_restores_in_place_and_zeroes_what_was_built_inside():
    from got_reg.solvers import KantorovichPotential

    pot = KantorovichPotential(lr=0.1)
    e, plan = torch.randn(6, 4), torch.softmax(torch.randn(6, 6), 1) / 6
    with pot.unchanged():
        pot.build(4, e.device, e.dtype)
        pot.step(e, plan)
        pot.step(e, plan)
    assert pot.built and not pot.weight.any() and pot.num_updates == 0
    assert all(not t.any() for t in pot.state_tensors())
    pot.step(e, plan)
    kept = [t.detach().clone() for t in pot.state_tensors()]
    ptrs = pot.fingerprint()
    with pot.unchanged():
        pot.step(e, plan)
        assert not torch.equal(pot.weight, kept[0])
    assert all(torch.equal(a, b) for a, b in zip(pot.state_tensors(), kept))
    assert pot.fingerprint() == ptrs and pot.num_updates == 1


@needs_gpu
@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(label_matching=True),
        dict(label_matching=True, debias=False),
        dict(solver="dual", label_matching=True),
        dict(solver="dual", debias=False),
    ],
)
def test_replay_equals_eager_over_steps(options):
    feed = _Feed()
    eager = GOTRegularizer(feed, "feat", beta=10.0, **options)
    graphed = GOTRegularizer(feed, "feat", beta=10.0, cuda_graphs=True, **options)
    kept = []
    for step in range(4):
        inputs = _problem(B=128, D=64, K=10, seed=step, device="cuda")
        _eager_then_graphed(eager, graphed, feed, inputs, _twin(inputs))
        de, dg = eager.diagnostics.as_dict(), graphed.diagnostics.as_dict()
        assert de.keys() == dg.keys()
        for k in de:
            assert dg[k] == pytest.approx(de[k], rel=1e-4, abs=1e-6), k
        kept.append((graphed.diagnostics, dg))
        if eager.potential is not None:  # the replayed Adam step moved φ as the eager one did
            torch.testing.assert_close(graphed.potential.weight, eager.potential.weight, rtol=1e-4, atol=1e-6)
            assert graphed.potential.num_updates == eager.potential.num_updates == step + 1
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
    for options in (dict(), dict(label_matching=True), dict(label_matching=True, solver="dual")):
        eager = GOTRegularizer(feed, "feat", beta=10.0, **options)
        graphed = GOTRegularizer(feed, "feat", beta=10.0, cuda_graphs=True, **options)
        for _ in range(3):
            _eager_then_graphed(eager, graphed, feed, twin(), twin())
        assert len(graphed._graphs.captures) == 1
        eager.remove()
        graphed.remove()


@needs_gpu
def test_new_shape_recaptures_and_backward_runs_in_any_order():
    feed = _Feed()
    got = GOTRegularizer(feed, "feat", beta=10.0, label_matching=True, cuda_graphs=True)
    eager = GOTRegularizer(feed, "feat", beta=10.0, label_matching=True)
    for B in (128, 100, 128):
        loss = _call(got, feed, *_problem(B=B, D=64, K=10, seed=B, device="cuda"))
        loss.backward()
    assert len(got._graphs.captures) == 2
    problems = [_problem(B=128, D=64, K=10, seed=s, device="cuda") for s in (1, 2)]
    twins = [_twin(p) for p in problems]
    losses = [_call(got, feed, *t) for t in twins]
    for inputs, twin, loss in reversed(list(zip(problems, twins, losses))):  # the first call's backward last
        (3.0 * loss).backward()
        (3.0 * _call(eager, feed, *inputs)).backward()
        for a, b in zip(twin[1::2], inputs[1::2]):  # the adversarial side (anchor="clean")
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7)


@needs_gpu
@pytest.mark.parametrize("solver", ["sinkhorn", "dual"])
def test_replay_has_one_host_read_and_too_large_batch_warns(solver):
    feed = _Feed()
    got = GOTRegularizer(feed, "feat", beta=10.0, label_matching=True, solver=solver, cuda_graphs=True)
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


@needs_gpu
@pytest.mark.parametrize("solver", ["sinkhorn", "dual"])
def test_deferred_call_does_not_wait_for_the_gpu(solver):
    """deferred_checks: with a long kernel queued before it, a replayed call and its backward return while the
    GPU is still busy (the previous call's flags are read from their host copy, which that kernel does not
    delay); a NaN call returns zero and the next call warns."""
    feed = _Feed()
    options = dict(label_matching=True, solver=solver, nan_policy="skip")
    got = GOTRegularizer(feed, "feat", beta=10.0, cuda_graphs=True, deferred_checks=True, **options)
    eager = GOTRegularizer(feed, "feat", beta=10.0, **options)
    for step in range(3):  # the capture, then replays equal to the eager calls
        inputs = _problem(B=128, D=64, K=10, seed=step, device="cuda")
        _eager_then_graphed(eager, got, feed, inputs, _twin(inputs))
    inputs = _problem(B=128, D=64, K=10, seed=5, device="cuda")  # before the kernel: a copy from the host waits
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # some 0.1 s of GPU time
    _call(got, feed, *inputs).backward()
    assert not torch.cuda.current_stream().query()  # the host did not wait for the queued kernel
    inputs = _with_nan(_problem(B=128, D=64, K=10, seed=6, device="cuda"))
    loss = _call(got, feed, *inputs)
    loss.backward()
    assert loss.item() == 0.0 and not inputs[1].grad.any()
    with pytest.warns(RuntimeWarning, match="GOT term skipped: an earlier call"):
        got.check()
