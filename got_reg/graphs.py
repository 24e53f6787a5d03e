"""CUDA graphs for the GOT call: one replay instead of some sixty launches (``GOTRegularizer(cuda_graphs=True)``).

On a GPU a call at B = 128 is a few microseconds of arithmetic and some sixty kernel launches, forward and
backward (``benchmarks/bench_launches.py``); the launches are what a training step pays for. When every
Sinkhorn solve of the call runs in the fused Triton kernel (CUDA, float32, B ≤ 256), the call has no host
synchronisation, so its forward and its backward can each be captured once as a CUDA graph
(:class:`torch.cuda.CUDAGraph`) and replayed. One capture is kept per input signature (shapes, dtypes,
which inputs need a gradient), so the shorter last batch of an epoch gets its own.

A graph reads and writes fixed ("static") buffers; what a replay leaves there is overwritten by the next
replay. So a call copies its inputs in, and copies out what outlives it: the loss, the input gradients and
every tensor of the :class:`~got_reg.GOTDiagnostics`. On a GPU a call at B = 128 is host-bound, so the
copies out are one kernel per dtype: the backward graph writes the input gradients into one buffer per
dtype (:class:`FlatGroups`), and the diagnostics are packed inside the graph into one byte buffer, rebuilt
from its copy (views, but some sixty of them) only when someone reads them (:class:`PackedDiagnostics`);
the call itself reads only their flags. The inputs are copied in one by one. The backward of a call is
refused once a later call of the same signature has replayed over its buffers.

Replays compute what the eager call computes, in the same order: same values and gradients up to the
nondeterminism of the kernels themselves (``tests/test_graphs.py`` compares them on a GPU).
"""

from __future__ import annotations

import dataclasses
import functools
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .diagnostics import GOTDiagnostics, interpret_flags
from .solvers import OTResult

__all__ = ["FlatGroups", "GraphedCalls", "PackedDiagnostics", "pack", "unpack"]

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


def _root(flat: torch.Tensor, s: _Slot) -> torch.Tensor:
    if not s.nbytes:
        return torch.empty(s.shape, dtype=s.dtype, device=flat.device)
    return flat[s.offset : s.offset + s.nbytes].view(s.dtype).view(s.shape)


def unpack(flat: torch.Tensor, layout: Layout) -> list[torch.Tensor]:
    """The tensors that :func:`pack` stored, as views of ``flat`` (no kernel): same shapes, strides, dtypes."""
    roots = [_root(flat, s) for s in layout.slots]
    out = []
    for k, size, stride, offset in layout.views:
        r = roots[k]
        out.append(r.as_strided(size, stride, r.storage_offset() + offset))
    return out


def unpack_one(flat: torch.Tensor, layout: Layout, index: int) -> torch.Tensor:
    """Tensor ``index`` of :func:`unpack` ``(flat, layout)`` alone."""
    k, size, stride, offset = layout.views[index]
    r = _root(flat, layout.slots[k])
    return r.as_strided(size, stride, r.storage_offset() + offset)


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
        self.parts: list[tuple[int, int, int, tuple[int, ...]] | None] = [None] * len(like)
        for k, g in enumerate(self.groups):
            offset = 0
            for i in g:
                t = like[i]
                assert t is not None
                self.parts[i] = (k, offset, t.numel(), tuple(t.shape))
                offset += t.numel()

    def concat(self, tensors: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
        """One buffer per dtype holding ``tensors`` (shaped as at construction) one after another."""
        return [torch.cat([tensors[i].reshape(-1) for i in g]) for g in self.groups]  # type: ignore[union-attr]

    def split(self, buffers: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """The tensors as views of ``buffers`` (what :meth:`concat` wrote there)."""
        return [None if p is None else buffers[p[0]][p[1] : p[1] + p[2]].view(p[3]) for p in self.parts]


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


class _Capture:
    """The forward and backward graphs of ``fn`` at one input signature, with their static buffers."""

    def __init__(self, fn: Forward, inputs: tuple[torch.Tensor, ...]) -> None:
        def leaves() -> tuple[torch.Tensor, ...]:
            return tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in inputs)

        # The warm-up runs on its own copies: leaves that it used would carry autograd nodes bound to its
        # stream into the capture, which runs on another.
        warm = leaves()
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):
                loss, _ = fn(*warm)
                torch.autograd.grad(loss, [t for t in warm if t.requires_grad], allow_unused=True)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        del warm, loss

        self.inputs = leaves()
        wrt = [t for t in self.inputs if t.requires_grad]

        self.forward = torch.cuda.CUDAGraph()
        # thread_local: a DataLoader's pin-memory thread may call CUDA while this thread captures.
        with torch.cuda.graph(self.forward, capture_error_mode="thread_local"):
            loss, diag = fn(*self.inputs)
            # The flags first: the call reads them (one host read) without rebuilding the rest.
            self.diagnostics, self.layout = pack([diag.flags(), *diagnostics_tensors(diag)])
        self.template = diag
        self.loss = loss
        self.grad_loss = torch.empty_like(loss)
        self.backward = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.backward, pool=self.forward.pool(), capture_error_mode="thread_local"):
            grads = torch.autograd.grad(loss, wrt, grad_outputs=self.grad_loss, allow_unused=True)
            it = iter(grads)
            per_input = [next(it) if t.requires_grad else None for t in self.inputs]
            self.grads = FlatGroups(per_input)
            self.grad_buffers = self.grads.concat(per_input)
        self.generation = 0  # replays so far: a backward must belong to the latest one


class _Replay(torch.autograd.Function):
    """Replays a capture's forward; its backward replays the capture's backward graph."""

    @staticmethod
    def forward(ctx: Any, cap: _Capture, *inputs: torch.Tensor) -> torch.Tensor:
        for static, t in zip(cap.inputs, inputs):
            static.copy_(t)
        cap.forward.replay()
        cap.generation += 1
        ctx.cap, ctx.generation = cap, cap.generation
        return cap.loss.detach().clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        cap: _Capture = ctx.cap
        if ctx.generation != cap.generation:
            raise RuntimeError(
                "GOTRegularizer(cuda_graphs=True): this call's backward ran after a later call with the same "
                "shapes had replayed over its graph's buffers. Backpropagate each got(...) loss before the next "
                "call (or sum the losses of the calls first), or build the regulariser with cuda_graphs=False."
            )
        cap.grad_loss.copy_(grad)
        cap.backward.replay()
        # Copies: the static gradients are overwritten by the next replay, and autograd may keep them as .grad.
        return (None, *cap.grads.split([b.clone() for b in cap.grad_buffers]))


class GraphedCalls:
    """The captures of one regulariser, by input signature, and the call that replays them."""

    def __init__(self, fn: Forward, max_captures: int = MAX_CAPTURES) -> None:
        self.fn = fn
        self.max_captures = max_captures
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
        # Autocast cannot change the call (its cost is built in float32 outside autocast), and a capture must
        # not see autocast's cast cache (torch.cuda.make_graphed_callables refuses it for the same reason).
        with torch.autocast(device_type="cuda", enabled=False):
            cap = self.captures.get(key)
            if cap is None:
                while len(self.captures) >= self.max_captures:
                    self.captures.popitem(last=False)
                cap = self.captures[key] = _Capture(functools.partial(self.fn, **options), inputs)
            else:
                self.captures.move_to_end(key)
            loss = _Replay.apply(cap, *inputs)
        return loss, PackedDiagnostics(cap.diagnostics.clone(), cap.layout, cap.template)


class PackedDiagnostics:
    """One replayed call's diagnostics, as its copy of the packed buffer.

    :meth:`read_flags` reads the flags straight from it (one host read); :meth:`unpack` builds the
    :class:`~got_reg.GOTDiagnostics` (views of the copy, no kernel), once, when someone asks for it.
    """

    __slots__ = ("_flat", "_layout", "_template", "_built")

    def __init__(self, flat: torch.Tensor, layout: Layout, template: GOTDiagnostics) -> None:
        self._flat, self._layout, self._template = flat, layout, template
        self._built: GOTDiagnostics | None = None

    def read_flags(self) -> tuple[bool, bool | None]:
        """What :meth:`GOTDiagnostics.read_flags` returns, from the packed copy."""
        return interpret_flags(unpack_one(self._flat, self._layout, 0).tolist())

    def unpack(self) -> GOTDiagnostics:
        if self._built is None:
            self._built = diagnostics_from(self._template, unpack(self._flat, self._layout)[1:])
        return self._built
