"""Finding the hooked layer and pairing each model output with the features of its own forward.

Three hooks do the work. A pre-hook on the model opens a record for the forward in the calling
thread; the hook on the layer puts a copy of the layer's output in it; the model's forward hook, when
the forward ends, files that copy under each output tensor of the same forward. The filing is a weak
reference on the output: when the logits tensor dies (every attack iteration's does), its entry and
the copy go too. The regulariser so runs no forward of its own, and holds nothing from forwards whose
outputs the training loop has let go.

Why each piece is as it is:

* The layer's output is copied only where the model changes it in place after the layer ran
  (``nn.ReLU(inplace=True)``, or ``out += shortcut; relu_`` after ``bn2`` in a ResNet block), where a
  reference would hold the later values. Which models do is learned per mode (train, eval): the first
  :data:`CLEAN_FORWARDS` forwards in a mode copy the output (``clone`` keeps the autograd path to the
  layer) and compare its version counter before and after the rest of the forward; if it never changed,
  later forwards in that mode keep a reference (no copy: on a GPU each is a launch, and the attack's
  forwards are many), and still compare. A forward that changes an uncopied output files
  :class:`FeaturesOverwritten` instead of its features (lookup raises it, naming the cause; the
  regulariser skips that step's term with a warning), and from then on that mode copies. Inference
  tensors (no version counter), forwards traced by ``torch.compile`` and a layer output that the model
  returns (or a view of it, which would keep its own entry alive) are always copied. What is filed lives
  as long as the output it is filed under.
* The per-forward record is per thread: forwards of the model in two threads (an EMA copy evaluated
  in another thread shares the capture) interleave, and each output must get its own forward's copy.
* The model's hooks hold the capture weakly. Hooks whose capture nobody holds any more are taken off
  (or, in a loaded pickle, do nothing): a whole-model ``torch.save`` does not carry a live capture,
  and a regulariser pickled together with its model works on the unpickled model.

Contract for the layer's output: a batch-first tensor (B, ...) whose B is the batch of the model
output it is filed under; it is flattened to (B, D). A tuple, list, dict or dataclass output is used
only when it holds exactly one tensor; otherwise ``select`` must say which part is the feature.
Modules built with ``batch_first=False`` (``nn.LSTM``, ``nn.MultiheadAttention``, ``nn.Transformer*``
by default) are refused, because their (T, B, ...) output would be read as T samples.
"""

from __future__ import annotations

import dataclasses
import difflib
import pickle
import threading
import weakref
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

Select = int | str | Callable[[Any], torch.Tensor] | None


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, nn.DataParallel):
            raise TypeError(
                "torch.nn.DataParallel is not supported: its replicas run the hooks in one thread per GPU, "
                "so features and logits cannot be paired reliably. Use DistributedDataParallel "
                "(one process per GPU; GOTRegularizer(..., distributed_gather=True) for the global batch)."
            )
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def resolve_layer(model: nn.Module, layer: str | nn.Module) -> tuple[str, nn.Module]:
    """Return (qualified name, submodule) for a name such as ``"classifier.4"`` or a module instance.

    Names may carry DDP/compile prefixes (``module.layer4``); an unknown name raises ``ValueError``
    listing the closest names.
    """
    root = unwrap_model(model)
    names = dict(root.named_modules())
    if isinstance(layer, nn.Module):
        for name, mod in names.items():
            if mod is layer:
                return name, mod
        raise ValueError(f"the module {type(layer).__name__} given as layer is not a submodule of the model")
    if not isinstance(layer, str):
        raise TypeError(f"layer must be a submodule name (str) or an nn.Module, got {type(layer).__name__}")
    name = layer
    while name.startswith(_WRAPPER_PREFIXES):
        name = name.split(".", 1)[1]
    if name in names and name != "":
        return name, names[name]
    candidates = [n for n in names if n]
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.5)
    hint = f" Close matches: {', '.join(map(repr, close))}." if close else ""
    leaves = [n for n, m in root.named_modules() if n and not list(m.children())]
    raise ValueError(
        f"layer {layer!r} is not a submodule of {type(root).__name__}.{hint} "
        f"Names are those of model.named_modules(), e.g. {', '.join(map(repr, leaves[:6]))}"
        f"{' ...' if len(leaves) > 6 else ''}"
    )


# Deep enough for any real output structure; a bound instead of an id() set, which dynamo cannot trace.
_MAX_DEPTH = 8


def _output_tensors(output: Any, depth: int = 0) -> list[torch.Tensor]:
    """Every tensor in ``output``: itself, or found in (nested) tuples, lists, dicts and dataclasses."""
    if isinstance(output, torch.Tensor):
        return [output]
    if depth >= _MAX_DEPTH:
        return []
    if isinstance(output, Mapping):
        children = list(output.values())
    elif isinstance(output, (list, tuple)):
        children = list(output)
    elif dataclasses.is_dataclass(output) and not isinstance(output, type):
        children = [getattr(output, f.name, None) for f in dataclasses.fields(output)]
    else:
        return []
    found: list[torch.Tensor] = []
    for child in children:
        found.extend(_output_tensors(child, depth + 1))
    return found


def _describe(output: Any) -> str:
    tensors = _output_tensors(output)
    shapes = ", ".join(str(tuple(t.shape)) for t in tensors[:6]) + (" ..." if len(tensors) > 6 else "")
    return f"{type(output).__name__} holding {len(tensors)} tensors" + (f" of shapes {shapes}" if tensors else "")


def _pick(output: Any, key: int | str) -> Any:
    if isinstance(output, Mapping):
        return output.get(key)
    if isinstance(key, int) and isinstance(output, (list, tuple)):
        return output[key] if -len(output) <= key < len(output) else None
    if isinstance(key, str):
        return getattr(output, key, None)
    return None


def _sequence_first(layer: nn.Module) -> bool:
    """Whether ``layer`` is a torch module built to return (T, B, ...) rather than (B, T, ...)."""
    if isinstance(layer, (nn.TransformerEncoder, nn.TransformerDecoder)):
        name = "self_attn" if isinstance(layer, nn.TransformerEncoder) else "multihead_attn"
        attn = getattr(layer.layers[0], name, None)
        return getattr(attn, "batch_first", None) is False
    return getattr(layer, "batch_first", None) is False


class _LostSelect:
    """Stands in for a ``select`` callable that could not be pickled (a lambda, a local function)."""

    def __init__(self, name: str) -> None:
        self.name = name


class _Hook:
    """A hook that holds its capture weakly and that a ``copy.deepcopy`` of the model shares.

    A deep copy of the model (an EMA model, say) keeps calling the same capture, whose entries die
    with their outputs. After ``remove()``, or once nothing holds the capture, the hook does nothing.
    Pickled, it carries the capture (so that a regulariser pickled with the model finds it again) but
    unpickled it holds it weakly too: a model loaded on its own gets inert hooks.
    """

    def __init__(self, capture: FeatureCapture, method: str) -> None:
        self._ref: Callable[[], FeatureCapture | None] = weakref.ref(capture)
        self.method = method

    def __call__(self, *args):
        capture = self._ref()
        if capture is not None and capture.active:
            return getattr(capture, self.method)(*args)
        return None

    def __deepcopy__(self, memo: dict[int, Any]) -> _Hook:
        return self

    def __getstate__(self) -> dict[str, Any]:
        return {"capture": self._ref(), "method": self.method}

    def __setstate__(self, state: dict[str, Any]) -> None:
        capture = state["capture"]
        self._ref = weakref.ref(capture) if capture is not None else _dead_ref
        self.method = state["method"]


def _dead_ref() -> None:
    return None


class _Table(dict):
    """A dict that can be weakly referenced (the reapers must not keep the capture alive)."""


class _Entry(NamedTuple):
    ref: weakref.ref  # the output tensor
    feature: Any  # the copied layer output, None if the layer did not run, or an exception to raise
    calls: int  # how many times the layer ran in that forward
    version: int | None  # the copy's _version when filed (None for inference tensors)


#: forwards per mode that copy the layer output and find it unchanged before later ones keep a reference
CLEAN_FORWARDS = 20


class FeaturesOverwritten(RuntimeError):
    """The model changed the hooked layer's output in place later in a forward in which it was not copied."""


class _Watch(NamedTuple):
    """The layer's own output in a forward, to compare its version counter when the forward ends."""

    output: torch.Tensor
    version: int
    copied: bool  # whether what was filed is a copy (then a later change is harmless)
    training: bool  # the layer's mode, the key of what is learned


class _Record:
    """The record of the forward running in one thread (and of the ones it is nested in)."""

    def __init__(self) -> None:
        self.depth = 0
        self.feature: Any = None
        self.calls = 0
        self.watch: _Watch | None = None
        self.outer: list[tuple[Any, int, _Watch | None]] = []
        self.unfiled: str | None = None


class _State(threading.local):
    # The hooks change attributes of the thread's _Record, never of the threading.local itself: dynamo
    # drops writes to a threading.local's attributes in a traced hook, but replays those to an object it
    # holds (re-fetched from the running thread's local on each call).
    def __init__(self) -> None:
        self.rec = _Record()


def _remove_handles(handles: list[Any]) -> None:
    for h in handles:
        h.remove()
    handles.clear()


class FeatureCapture:
    """Hooks that map each output tensor of ``model`` to the output of ``layer`` in the same forward.

    Use :meth:`lookup` with an output tensor, or a row slice of one (``logits.chunk(2)``), to get the
    matching features flattened to (B, D). ``remove()`` takes the hooks off; usable as a context
    manager. The hooks go away by themselves when nothing holds the capture any more.

    Copies: ``copy.deepcopy`` of the model or of the capture (or of a regulariser holding it) shares
    the capture, so every copy's forwards are filed and ``remove()`` acts on all of them. Pickling
    drops what was filed; a capture unpickled together with its model works on that model, and the
    hooks of a model unpickled without it do nothing.

    Args:
        model: the module whose forward is called (plain, DDP or compiled).
        layer: submodule name or instance. Its output must be batch-first.
        select: which part of the layer's output is the feature, when the layer returns a tuple,
            list, dict or dataclass holding more than one tensor (``nn.LSTM``: ``(output, (h, c))``):
            an index, a key or attribute name, or a callable ``output -> tensor`` (which may also
            transform a tensor output, e.g. make it batch-first). Unset, a tensor output is used as
            is and a container holding exactly one tensor gives that tensor.
    """

    def __init__(self, model: nn.Module, layer: str | nn.Module, select: Select = None) -> None:
        self.layer_name, self.layer = resolve_layer(model, layer)
        if (
            select is not None
            and not callable(select)
            and (not isinstance(select, (int, str)) or isinstance(select, bool))
        ):
            raise TypeError(
                f"select must be an index (int), a key or attribute name (str) or a callable taking the layer's "
                f"output and returning the feature tensor, got {type(select).__name__}"
            )
        if _sequence_first(self.layer) and not callable(select):
            raise ValueError(
                f"layer {self.layer_name!r} is a {type(self.layer).__name__} built with batch_first=False: its "
                "output is sequence-first (T, B, ...), and flattening it would take the T time steps for "
                "samples. Build it with batch_first=True, hook a later layer whose output is batch-first, "
                "or pass select=a callable returning a batch-first tensor, e.g. "
                "select=lambda out: out[0].transpose(0, 1)"
            )
        self.select = select
        self.active = True
        self._unpickled = False
        self._model_ran = False
        self._state = _State()
        self._entries: dict[int, _Entry] = _Table()
        # Per mode (layer.training): forwards that copied the layer's output and found it unchanged at their
        # end, or -1 once one found it changed (that mode copies for good).
        self._unchanged: dict[bool, int] = {True: 0, False: 0}
        self._handles = [
            self.layer.register_forward_hook(_Hook(self, "_on_layer")),
            model.register_forward_pre_hook(_Hook(self, "_on_model_start")),
            # always_call: a forward that raises still closes its record, so nothing is left pending.
            model.register_forward_hook(_Hook(self, "_on_model_end"), always_call=True),
        ]
        self._finalizer: weakref.finalize | None = weakref.finalize(self, _remove_handles, self._handles)
        self._finalizer.atexit = False

    # -- hooks ---------------------------------------------------------------------------------
    def _on_layer(self, module: nn.Module, inputs: Any, output: Any) -> None:
        st = self._state.rec
        if st.depth == 0:
            return  # run outside a forward of the model: by hand, or in a checkpoint's recompute
        st.calls += 1
        st.watch = None
        feature = self._take(output)
        if isinstance(feature, torch.Tensor):
            if torch.compiler.is_compiling() or feature.is_inference():
                feature = feature.clone()
            else:
                training = module.training
                copy = self._unchanged[training] < CLEAN_FORWARDS  # -1 (seen changed) included
                st.watch = _Watch(feature, feature._version, copy, training)
                feature = feature.clone() if copy else feature
        st.feature = feature

    def _take(self, output: Any) -> Any:
        """The feature tensor in ``output`` (not a copy), or the exception that lookup should raise."""
        select = self.select
        if select is None:
            if isinstance(output, torch.Tensor):
                return output
            tensors = _output_tensors(output)
            if len(tensors) == 1:
                return tensors[0]
            if not tensors:
                return TypeError(f"layer {self.layer_name!r} returned {_describe(output)}; expected a tensor")
            return ValueError(
                f"layer {self.layer_name!r} returned a {_describe(output)}; say which one is the feature with "
                "select=an index or key (e.g. GOTRegularizer(..., select=0)) or a callable output -> tensor"
            )
        if isinstance(select, _LostSelect):
            return RuntimeError(
                f"this capture was unpickled, and its select= callable {select.name} could not be pickled: build "
                "a new GOTRegularizer/FeatureCapture on the loaded model, passing select= again"
            )
        if callable(select):
            picked = select(output)
        elif isinstance(output, torch.Tensor):
            return TypeError(
                f"select={select!r} picks a part of a tuple, list, dict or dataclass output, but layer "
                f"{self.layer_name!r} returned a tensor of shape {tuple(output.shape)}: leave select unset, or "
                "pass a callable"
            )
        else:
            picked = _pick(output, select)
        if not isinstance(picked, torch.Tensor):
            return TypeError(
                f"select={getattr(select, '__name__', select)!r} took {type(picked).__name__}, not a tensor, from "
                f"layer {self.layer_name!r}'s output ({_describe(output)})"
            )
        return picked

    def _on_model_start(self, module: nn.Module, inputs: Any) -> None:
        st = self._state.rec
        if st.depth:
            st.outer.append((st.feature, st.calls, st.watch))  # a forward of the model inside another one
        st.depth += 1
        st.feature, st.calls, st.watch = None, 0, None
        self._model_ran = True

    def _on_model_end(self, module: nn.Module, inputs: Any, output: Any) -> None:
        st = self._state.rec
        if st.depth == 0:
            return  # the hooks were put on while this forward ran
        feature, calls, watch = st.feature, st.calls, st.watch
        st.depth -= 1
        st.feature, st.calls, st.watch = st.outer.pop() if st.depth else (None, 0, None)
        if output is None:
            return  # the forward raised
        tensors = _output_tensors(output)
        if watch is not None:
            feature = self._checked(feature, watch)
            if not watch.copied and isinstance(feature, torch.Tensor) and _shares_storage(feature, tensors):
                # Filed under an output it is (a view of), it would keep that output alive, and the entry with
                # it: a copy of its values, which the forward did not change.
                feature = feature.clone()
        st.unfiled = None if tensors else type(output).__name__
        version = None
        if isinstance(feature, torch.Tensor) and not feature.is_inference():
            version = feature._version
        # A forward in which the layer did not run is filed too (feature None), so lookup can say so.
        for out in tensors:
            key = id(out)
            self._entries[key] = _Entry(weakref.ref(out, self._make_reaper(key)), feature, calls, version)

    def _checked(self, feature: torch.Tensor, watch: _Watch) -> Any:
        """``feature``, or an error if the forward changed the uncopied layer output in place; learns the mode."""
        changed = watch.output._version != watch.version
        seen = self._unchanged[watch.training]
        if changed:
            self._unchanged[watch.training] = -1
        elif seen >= 0:
            self._unchanged[watch.training] = seen + 1
        if not changed or watch.copied:
            return feature
        mode = "training" if watch.training else "eval"
        return FeaturesOverwritten(
            f"the output of layer {self.layer_name!r} was changed in place later in the forward that produced "
            f"{{what}}, which the first {CLEAN_FORWARDS} forwards in {mode} mode did not do, so it was not copied "
            "and its features are lost for this forward; got-reg copies them in every later forward in this mode"
        )

    def _make_reaper(self, key: int) -> Callable[[weakref.ref], None]:
        entries = weakref.ref(self._entries)

        def reap(ref: weakref.ref) -> None:
            table = entries()
            if table is not None:
                entry = table.get(key)
                if entry is not None and entry.ref is ref:
                    del table[key]

        return reap

    # -- lookup ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._entries)

    def _entry(self, output: torch.Tensor) -> _Entry | None:
        entry = self._entries.get(id(output))
        return entry if entry is not None and entry.ref() is output else None

    def lookup(self, output: torch.Tensor, what: str = "logits") -> torch.Tensor:
        """Features (B, D) of the forward that produced ``output`` (or the base tensor it is a row slice of)."""
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"{what} must be a tensor returned by the model's forward, got {type(output).__name__}")
        base, rows = output, slice(None)
        entry = self._entry(output)
        if entry is None and output._base is not None:
            base = output._base
            entry = self._entry(base)
            if entry is not None:
                rows = _row_slice(output, base, what)
        if entry is None:
            raise LookupError(self._not_found(what))
        feature = entry.feature
        if feature is None:
            raise LookupError(
                f"layer {self.layer_name!r} did not run in the forward that produced {what}. If the model is "
                "torch.compile'd and was called before this GOTRegularizer was built, its cached graph runs no "
                "hook added later (dynamo does not guard on hooks): build the regulariser before the first "
                "compiled call, or call torch._dynamo.reset()"
            )
        if isinstance(feature, Exception):
            text = str(feature)
            if "{what}" in text:
                raise type(feature)(text.replace("{what}", what))
            raise type(feature)(f"{text} (seen in the forward that produced {what})")
        if entry.calls != 1:
            raise RuntimeError(
                f"layer {self.layer_name!r} ran {entry.calls} times in the forward that produced {what}; "
                "hook a layer that runs once per forward"
            )
        if entry.version is not None and feature._version != entry.version:
            raise RuntimeError(
                f"the features of layer {self.layer_name!r} filed for {what} were changed in place after the "
                "forward: a tensor returned by lookup() was modified in place (clone it before changing it), or "
                "the layer writes its output into the same memory in every forward (then copy it: "
                "select=lambda out: out.clone())"
            )
        if feature.ndim == 0 or (base.ndim and feature.shape[0] != base.shape[0]):
            raise ValueError(
                f"layer {self.layer_name!r} returned a tensor of shape {tuple(feature.shape)} in the forward that "
                f"produced {what} of shape {tuple(base.shape)}: the layer's output must be batch-first, with "
                f"{base.shape[0] if base.ndim else 'its'} rows like the model's output (a sequence-first (T, B, ...) "
                "output needs select=lambda out: out.transpose(0, 1))"
            )
        z = feature.reshape(feature.shape[0], -1)
        return z[rows]

    def _not_found(self, what: str) -> str:
        if self._unpickled and not self._model_ran:
            return (
                f"no features recorded for {what}: this regulariser (or capture) was unpickled, and it reads only "
                "the forwards of the model unpickled together with it (torch.save({'model': model, 'got': got})), "
                "none of which has run. To use it on another model, build a new one there: "
                f"GOTRegularizer(model, {self.layer_name!r}, ...), then new.load_state_dict(old.state_dict()) for "
                "the dual potential"
            )
        msg = (
            f"no features recorded for {what}: pass the tensor returned by the model's forward "
            f"(or a row slice of it, e.g. logits.chunk(2)), not a copy or a transform of it "
            f"(.float(), .clone(), arithmetic). The hooked layer {self.layer_name!r} must run inside "
            "that forward, and the regulariser must be built on the module you call: on a "
            "DistributedDataParallel wrapper itself, not its .module (DDP can return new output tensors); "
            "a copy of the model made before the regulariser was built carries none of its hooks."
        )
        unfiled = self._state.rec.unfiled
        if unfiled is not None:
            msg += (
                f" The last forward in this thread returned {unfiled}, in which no tensor was found: outputs are "
                "searched through tensors, tuples, lists, dicts and dataclasses."
            )
        return msg

    # -- life cycle ----------------------------------------------------------------------------
    def remove(self) -> None:
        self.active = False
        if self._finalizer is not None:
            self._finalizer.detach()
        _remove_handles(self._handles)
        self._entries.clear()
        self._state.rec.feature = None

    def __enter__(self) -> FeatureCapture:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __deepcopy__(self, memo: dict[int, Any]) -> FeatureCapture:
        # The hooks are on the model, which a deep copy of the regulariser does not copy, and a deep copy of
        # the model shares them: a copy of the regulariser shares the capture too, and so reads the forwards
        # of the original model and of its copies. remove() on either takes the hooks off both.
        return self

    def __copy__(self) -> FeatureCapture:
        return self

    def __getstate__(self) -> dict[str, Any]:
        # Entries are per process and per tensor, the per-thread record cannot leave its thread, and the
        # handles would drag every hook on the model into the pickle. The layer stays (the regulariser reads
        # its training flag): the model's own when pickled together, a copy of it otherwise.
        skip = ("_entries", "_state", "_handles", "_finalizer")
        state = {k: v for k, v in self.__dict__.items() if k not in skip}
        state.update(_unpickled=True, _model_ran=False)
        if callable(self.select):
            try:
                pickle.dumps(self.select)
            except Exception:
                state["select"] = _LostSelect(getattr(self.select, "__qualname__", repr(self.select)))
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        # The unpickled model's hooks reach this capture through the _Hook objects (weakly); without the
        # handles remove() cannot take them off, and makes them inert instead.
        self._state = _State()
        self._entries = _Table()
        self._handles = []
        self._finalizer = None


def _shares_storage(t: torch.Tensor, others: list[torch.Tensor]) -> bool:
    ptr = t.untyped_storage().data_ptr()
    return any(o.untyped_storage().data_ptr() == ptr for o in others)


def _row_slice(view: torch.Tensor, base: torch.Tensor, what: str) -> slice:
    """The rows of ``base`` that ``view`` covers, for a contiguous row slice (chunk, split, [a:b])."""
    if view.ndim != base.ndim or view.shape[1:] != base.shape[1:] or view.stride() != base.stride():
        raise LookupError(
            f"{what} is a view of the model's output but not a row slice of it "
            f"(view shape {tuple(view.shape)}, output shape {tuple(base.shape)}); split the output along dim 0"
        )
    offset = view.storage_offset() - base.storage_offset()
    step = base.stride(0) if base.ndim else 1
    if step == 0 or offset % step:
        raise LookupError(f"{what} does not start at a row of the model's output")
    start = offset // step
    return slice(start, start + view.shape[0])
