"""CUDA graphs for the GOT call: one replay instead of some sixty launches (``GOTRegularizer(cuda_graphs=True)``).

On a GPU a call at B = 128 is a few microseconds of arithmetic and some sixty kernel launches, forward and
backward (``benchmarks/bench_launches.py``); the launches, and the host work of each, are what a training
step pays for. When the call has no host synchronisation (every Sinkhorn solve in the fused Triton kernel:
CUDA, float32, B ≤ 256 or ``GOT_REG_FUSED_MAX``; the dual's semi-dual and fused Adam step never read the
host), it is captured once as a CUDA graph (:class:`torch.cuda.CUDAGraph`) and replayed. One graph holds the
forward, the backward at unit upstream gradient and, for the dual, φ's ascent step: the backward of a scalar
loss is linear in its upstream gradient g, so a call's gradients are g times the captured ones. One capture is
kept per input signature (shapes, dtypes, which inputs need a gradient, φ trained or not), so the shorter last
batch of an epoch gets its own.

A graph reads and writes fixed ("static") buffers; what a replay leaves there is overwritten by the next
replay. So a call copies its inputs in (one by one), and copies out, in one kernel, one packed buffer
holding everything that outlives it: the flags, the loss, every tensor of the
:class:`~got_reg.GOTDiagnostics` and the input gradients (one buffer per dtype, :class:`FlatGroups`). The
call reads only the flags from its copy; the diagnostics are rebuilt from it (views, but some sixty of
them) when someone reads them (:class:`PackedDiagnostics`), and its backward is one multiplication per
dtype. As each call owns its copy, the backward of a call may run after later calls. A call that is not
finite returns a zero loss and zero gradients, decided inside the graph: so its flags may also be read
later (``deferred_checks``, at the next call, from a host copy that waits for this call's work only), and
the step it belonged to goes on without the GOT term.

State that the graph updates in place (φ's weight and Adam's moments and step count) must keep its storage:
warm-up and capture run inside the caller's ``hold`` (which restores φ's values), and the captures are
dropped when that storage changes (φ rebuilt after a divergence, or an optimiser state loaded).

Replays compute what the eager call computes, in the same order: same values and gradients up to the
nondeterminism of the kernels themselves (``tests/test_graphs.py`` compares them on a GPU, and the
bookkeeping on CPU through an emulated recorder).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch

from .diagnostics import GOTDiagnostics, interpret_flags
from .solvers import OTResult

__all__ = ["CUDARecorder", "FlatGroups", "GraphedCalls", "PackedDiagnostics", "pack", "unpack"]

#: captures kept per regulariser (least recently used dropped first): each holds its graphs' memory
MAX_CAPTURES = 4
#: untimed calls on a side stream before a capture (Triton compiles, cuBLAS picks its workspace)
WARMUP_CALLS = 3
_ALIGN = 16  # bytes: every packed tensor starts at a multiple of the largest element size


# -- packing the diagnostics: many tensors in, one buffer out -------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Slot:
    """Where one root tensor lives in the packed buffer."""

    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Layout:
    """How to rebuild each tensor of a list from the packed buffer: its root's slot and its view of it."""

    slots: tuple[_Slot, ...]
    views: tuple[tuple[int, tuple[int, ...], tuple[int, ...], int], ...]  # (slot, size, stride, offset in root)


def pack(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, Layout]:
    """All ``tensors`` (any dtypes, views allowed) as one uint8 buffer and the layout that :func:`unpack` reads.

    Views of one contiguous base (the results of an unbind) are stored once, as their base; a
    non-contiguous tensor without one is stored as a contiguous copy. One ``copy_`` per stored tensor.
    """
    roots: list[torch.Tensor] = []
    index: dict[int, int] = {}
    views = []
    for t in tensors:
        base = t._base
        if base is not None and base.is_contiguous():
            root, stride, offset = base, tuple(t.stride()), int(t.storage_offset() - base.storage_offset())
        else:
            root = t if t.is_contiguous() else t.contiguous()
            stride, offset = tuple(root.stride()), 0
        if id(root) not in index:  # roots stay referenced in the list, so an id is not reused meanwhile
            index[id(root)] = len(roots)
            roots.append(root)
        views.append((index[id(root)], tuple(t.shape), stride, offset))
    slots, offset = [], 0
    for r in roots:
        nbytes = r.numel() * r.element_size()
        slots.append(_Slot(offset, nbytes, r.dtype, tuple(r.shape)))
        offset += -(-nbytes // _ALIGN) * _ALIGN
    device = tensors[0].device if tensors else torch.device("cpu")
    flat = torch.empty(offset, dtype=torch.uint8, device=device)
    for r, s in zip(roots, slots):
        if s.nbytes:
            flat[s.offset : s.offset + s.nbytes].view(s.dtype).view(s.shape).copy_(r)
    return flat, Layout(tuple(slots), tuple(views))


def _view(flat: torch.Tensor, s: _Slot, view: tuple, typed: dict[torch.dtype, torch.Tensor]) -> torch.Tensor:
    """One stored tensor as a view of ``flat``: two view operations (``flat`` as the slot's dtype, shared
    through ``typed``, then the strides), as few as a call that builds some views on every call can make."""
    _, size, stride, offset = view
    if not s.nbytes:
        return torch.empty(s.shape, dtype=s.dtype, device=flat.device).as_strided(size, stride, offset)
    t = typed.get(s.dtype)
    if t is None:
        t = typed[s.dtype] = flat.view(s.dtype)  # pack() sizes the buffer in multiples of every element size
    return t.as_strided(size, stride, s.offset // t.element_size() + offset)


def unpack(flat: torch.Tensor, layout: Layout) -> list[torch.Tensor]:
    """The tensors that :func:`pack` stored, as views of ``flat`` (no kernel): same shapes, strides, dtypes."""
    typed: dict[torch.dtype, torch.Tensor] = {}
    return [_view(flat, layout.slots[v[0]], v, typed) for v in layout.views]


def unpack_one(flat: torch.Tensor, layout: Layout, index: int) -> torch.Tensor:
    """Tensor ``index`` of :func:`unpack` ``(flat, layout)`` alone."""
    v = layout.views[index]
    return _view(flat, layout.slots[v[0]], v, {})


# -- tensors as views of one buffer per dtype -------------------------------------------------------------
class FlatGroups:
    """Where each of a list of tensors (None allowed) lives in one flat buffer per dtype.

    :meth:`concat` writes the buffers, one ``torch.cat`` per dtype; :meth:`split` gives the tensors back as
    views of buffers (no kernel). The backward graph writes the input gradients this way, so that copying
    them out of its static memory is one kernel per dtype instead of one per tensor.
    """

    def __init__(self, like: Sequence[torch.Tensor | None]) -> None:
        groups: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(like):
            if t is not None:
                groups.setdefault(t.dtype, []).append(i)
        self.groups = list(groups.values())
        # (buffer, offset, shape, contiguous strides) of each tensor
        self.parts: list[tuple[int, int, tuple[int, ...], tuple[int, ...]] | None] = [None] * len(like)
        for k, g in enumerate(self.groups):
            offset = 0
            for i in g:
                t = like[i]
                assert t is not None
                shape = tuple(t.shape)
                strides, n = [], 1
                for d in reversed(shape):
                    strides.append(n)
                    n *= max(d, 1)
                self.parts[i] = (k, offset, shape, tuple(reversed(strides)))
                offset += t.numel()

    def concat(self, tensors: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
        """One buffer per dtype holding ``tensors`` (shaped as at construction) one after another."""
        return [torch.cat([tensors[i].reshape(-1) for i in g]) for g in self.groups]  # type: ignore[union-attr]

    def split(self, buffers: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """The tensors as views of ``buffers`` (what :meth:`concat` wrote there), one view operation each."""
        return [
            None if p is None else buffers[p[0]].as_strided(p[2], p[3], buffers[p[0]].storage_offset() + p[1])
            for p in self.parts
        ]


# -- the diagnostics as a flat list of tensors and back ------------------------------------------------
def _result_tensors(r: OTResult) -> list[torch.Tensor]:
    pots = list(r.potentials) if r.potentials is not None else []
    return [r.value, r.plan, r.iterations, r.marginal_error, r.converged, *pots]


def _result_from(r: OTResult, it: Any) -> OTResult:
    value, plan, iterations, error, converged = (next(it) for _ in range(5))
    pots = (next(it), next(it)) if r.potentials is not None else None
    return OTResult(value, plan, iterations, error, converged, potentials=pots)


def diagnostics_tensors(d: GOTDiagnostics) -> list[torch.Tensor]:
    """Every tensor that ``d`` holds, in a fixed order (:func:`diagnostics_from` reads them back)."""
    out = [d.value, d.loss, d.w_xy, d.finite, *_result_tensors(d.result)]
    if d.label_mask is not None:
        out.append(d.label_mask)
    for r in d.self_terms:
        out += _result_tensors(r)
    return out


def diagnostics_from(template: GOTDiagnostics, tensors: list[torch.Tensor]) -> GOTDiagnostics:
    """``template`` with its tensors replaced, in :func:`diagnostics_tensors`'s order."""
    it = iter(tensors)
    value, loss, w_xy, finite = (next(it) for _ in range(4))
    result = _result_from(template.result, it)
    mask = next(it) if template.label_mask is not None else None
    self_terms = tuple(_result_from(r, it) for r in template.self_terms)
    return dataclasses.replace(
        template,
        value=value,
        loss=loss,
        w_xy=w_xy,
        finite=finite,
        result=result,
        label_mask=mask,
        self_terms=self_terms,
    )


# -- one captured call ------------------------------------------------------------------------------------
Forward = Callable[..., "tuple[torch.Tensor, GOTDiagnostics]"]
Hold = Callable[[], AbstractContextManager[Any]]
#: the packed buffer holds the flags, the loss that the call returns, the diagnostics (from index _HEAD, in
#: :func:`diagnostics_tensors`' order, the value first) and the gradients
_FLAGS, _RETURNED, _HEAD = 0, 1, 2
_VALUE = 0  # the value's index among the diagnostics


class CUDARecorder:
    """Warm-up and capture on the current CUDA device (:class:`torch.cuda.CUDAGraph`)."""

    def warm_up(self, run: Callable[[], None]) -> None:
        """``run`` :data:`WARMUP_CALLS` times on a side stream (Triton compiles, cuBLAS picks its workspace)."""
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):
                run()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()

    def capture(self, body: Callable[[], tuple[torch.Tensor, Any]]) -> tuple[Callable[[], None], torch.Tensor, Any]:
        """``body`` captured once: (replay, the static tensor it returned, its other result)."""
        graph = torch.cuda.CUDAGraph()
        # thread_local: a DataLoader's pin-memory thread may call CUDA while this thread captures.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out, meta = body()
        return graph.replay, out, meta


class _Capture:
    """One graph of ``fn`` at one input signature: the forward, the backward at unit upstream gradient and
    any state update inside ``fn`` (φ's ascent step), all outputs packed into one static buffer.

    One graph instead of a forward and a backward graph: one launch less per call, and the gradients of a
    call are copied out with its diagnostics (one copy), so a call's backward never reads buffers that a
    later replay has overwritten. The backward of a scalar loss is linear in the upstream gradient g, so
    the gradients for g are g times those for 1 (one multiplication per dtype, which is also their copy).
    """

    def __init__(self, fn: Forward, inputs: tuple[torch.Tensor, ...], recorder: Any, hold: Hold) -> None:
        def leaves() -> tuple[torch.Tensor, ...]:
            return tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in inputs)

        def grads_of(loss: torch.Tensor, xs: tuple[torch.Tensor, ...]) -> list[torch.Tensor | None]:
            wrt = [t for t in xs if t.requires_grad]
            got = torch.autograd.grad(loss, wrt, allow_unused=True) if loss.requires_grad else [None] * len(wrt)
            it = iter(got)
            return [next(it) if t.requires_grad else None for t in xs]

        def warm_up() -> None:
            # On its own copies: leaves that it used would carry autograd nodes bound to its stream into the
            # capture, which runs on another. ``hold`` undoes what it did to state (φ's steps).
            warm = leaves()
            with hold():
                recorder.warm_up(lambda: grads_of(fn(*warm)[0], warm))

        warm_up()
        self.inputs = leaves()

        def body() -> tuple[torch.Tensor, tuple[Layout, GOTDiagnostics, FlatGroups]]:
            loss, diag = fn(*self.inputs)
            per_input = grads_of(loss, self.inputs)
            groups = FlatGroups(per_input)
            # A call that is not finite returns a zero loss and zero gradients: decided on the device, so that
            # a call whose flags are read only at the next call (deferred_checks) skips its step by itself.
            ok = diag.finite
            loss_out, *grads = (torch.where(ok, t, 0) for t in (loss.detach(), *groups.concat(per_input)))
            # The flags first: the call reads them (one host read) without rebuilding the rest.
            flat, layout = pack([diag.flags(), loss_out, *diagnostics_tensors(diag), *grads])
            return flat, (layout, diag, groups)

        with hold():
            self.replay, self.out, (self.layout, self.template, self.grads) = recorder.capture(body)
        self.n_diagnostics = len(diagnostics_tensors(self.template))
        flags = self.layout.slots[self.layout.views[_FLAGS][0]]  # PackedDiagnostics.read_flags: the first bytes
        assert flags.offset == 0 and self.layout.views[_FLAGS][3] == 0 and flags.dtype == torch.bool
        self.state: Any = None  # what GraphedCalls' ``state`` returned after this capture


class _Replay(torch.autograd.Function):
    """Replays a capture; its backward scales the gradients that the replay computed at unit upstream gradient.

    Outputs: the loss, and this call's copy of the packed buffer (not differentiable), which the
    diagnostics and the gradients are views of.
    """

    @staticmethod
    def forward(ctx: Any, cap: _Capture, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for static, t in zip(cap.inputs, inputs):
            static.copy_(t)
        cap.replay()
        flat = cap.out.clone()  # the next replay overwrites cap.out
        ctx.mark_non_differentiable(flat)
        first = _HEAD + cap.n_diagnostics
        ctx.grads = [unpack_one(flat, cap.layout, first + k) for k in range(len(cap.grads.groups))]
        ctx.groups = cap.grads
        # detach(): a view that autograd does not track as one, so that the caller may change the loss in place
        return unpack_one(flat, cap.layout, _RETURNED).detach(), flat

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor, _flat: Any) -> tuple[torch.Tensor | None, ...]:
        return (None, *ctx.groups.split([g * grad for g in ctx.grads]))


class GraphedCalls:
    """The captures of one regulariser, by input signature, and the call that replays them.

    ``recorder`` warms up and captures (:class:`CUDARecorder`); ``hold`` is a context in which the warm-up
    and the capture run and which undoes what they did to the caller's state (φ's ascent steps for the
    dual); ``state`` names the tensors that the graphs update in place (their storage), so that a change
    (φ rebuilt or loaded) drops the captures instead of replaying into stale memory.
    """

    def __init__(
        self,
        fn: Forward,
        max_captures: int = MAX_CAPTURES,
        *,
        recorder: Any = None,
        hold: Hold = contextlib.nullcontext,
        state: Callable[[], Any] = lambda: None,
    ) -> None:
        self.fn = fn
        self.max_captures = max_captures
        self.recorder = CUDARecorder() if recorder is None else recorder
        self.hold = hold
        self.state = state
        self.captures: OrderedDict[tuple, _Capture] = OrderedDict()

    @staticmethod
    def signature(inputs: tuple[torch.Tensor, ...], extra: tuple = ()) -> tuple:
        return (
            tuple((tuple(t.shape), t.dtype, t.device, t.requires_grad) for t in inputs),
            extra,
        )

    def __call__(self, inputs: tuple[torch.Tensor, ...], **options: Any) -> tuple[torch.Tensor, PackedDiagnostics]:
        """``fn(*inputs, **options)`` by replay, captured on the first call of this signature and ``options``."""
        key = self.signature(inputs, tuple(sorted(options.items())))
        cap = self.captures.get(key)
        if cap is not None and cap.state != self.state():
            self.captures.clear()  # the state they update has new storage: every capture is stale
            cap = None
        if cap is None:
            while len(self.captures) >= self.max_captures:
                self.captures.popitem(last=False)
            # Autocast cannot change the call (its cost is built in float32 outside autocast), and a capture
            # must not see autocast's cast cache (torch.cuda.make_graphed_callables refuses it for the same reason).
            with torch.autocast(device_type=inputs[0].device.type, enabled=False):
                cap = _Capture(functools.partial(self.fn, **options), inputs, self.recorder, self.hold)
            cap.state = self.state()
            self.captures[key] = cap
        else:
            self.captures.move_to_end(key)
        loss, flat = _Replay.apply(cap, *inputs)
        return loss, PackedDiagnostics(flat, cap.layout, cap.template, cap.n_diagnostics)


class PackedDiagnostics:
    """One replayed call's diagnostics, as its copy of the packed buffer.

    :meth:`read_flags` reads the flags straight from it (one host read); :meth:`unpack` builds the
    :class:`~got_reg.GOTDiagnostics` (views of the copy, no kernel), once, when someone asks for it.
    :meth:`copy_flags` starts the flags' copy to host memory without waiting, so that a later
    :meth:`read_flags` waits for this call's work only, not for what was queued after it.
    """

    __slots__ = ("_flat", "_layout", "_template", "_count", "_built", "_host", "_ready")

    def __init__(self, flat: torch.Tensor, layout: Layout, template: GOTDiagnostics, count: int) -> None:
        self._flat, self._layout, self._template, self._count = flat, layout, template, count
        self._built: GOTDiagnostics | None = None
        self._host: torch.Tensor | None = None
        self._ready: torch.cuda.Event | None = None

    @property
    def value(self) -> torch.Tensor:
        """:attr:`GOTDiagnostics.value` alone (one view of the copy), without building the rest."""
        return unpack_one(self._flat, self._layout, _HEAD + _VALUE)

    def _flag_bytes(self) -> torch.Tensor:
        return self._flat[: self._layout.views[_FLAGS][1][0]]

    def copy_flags(self) -> None:
        """Start the flags' copy to (pinned) host memory and mark its end on the current stream; no wait."""
        src = self._flag_bytes()
        if src.is_cuda:
            self._host = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
            self._host.copy_(src, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = src.clone()

    def read_flags(self) -> tuple[bool, bool | None]:
        """What :meth:`GOTDiagnostics.read_flags` returns, from the packed copy (the flags are its first bytes);
        after :meth:`copy_flags`, from the host copy once this call's work is done."""
        if self._host is None:
            return interpret_flags(self._flag_bytes().tolist())
        if self._ready is not None:
            self._ready.synchronize()
        return interpret_flags(self._host.tolist())

    def unpack(self) -> GOTDiagnostics:
        if self._built is None:
            tensors = unpack(self._flat, self._layout)[_HEAD : _HEAD + self._count]
            self._built = diagnostics_from(self._template, tensors)
        return self._built
