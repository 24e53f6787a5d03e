"""Finding the hooked layer and pairing each model output with the features of its own forward.

Two forward hooks do the work. The one on the layer keeps the output of its latest call; the one on
the model itself, when a forward ends, files that feature under the output tensor(s) of that same
forward. The filing is a weak reference on the output: when the logits tensor dies (every attack
iteration's does), its entry goes too. The regulariser so runs no forward of its own, and holds
nothing from forwards whose outputs the training loop has let go.
"""
from __future__ import annotations

import difflib
import weakref
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn


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
        elif hasattr(model, "_orig_mod") and isinstance(getattr(model, "_orig_mod"), nn.Module):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def resolve_layer(model: nn.Module, layer: Union[str, nn.Module]) -> Tuple[str, nn.Module]:
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


def _output_tensors(output: Any) -> List[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (list, tuple)):
        return [t for t in output if isinstance(t, torch.Tensor)]
    if isinstance(output, dict):
        return [t for t in output.values() if isinstance(t, torch.Tensor)]
    return []


class _Hook:
    """A hook object that a ``copy.deepcopy`` of the model shares instead of copying.

    A deep copy of the model (an EMA model, say) keeps calling the same capture, whose entries die
    with their outputs; after ``remove()`` the copy's hooks are inert.
    """

    def __init__(self, capture: "FeatureCapture", fn) -> None:
        self.capture = capture
        self.fn = fn

    def __call__(self, *args):
        if self.capture.active:
            return self.fn(*args)
        return None

    def __deepcopy__(self, memo: Dict[int, Any]) -> "_Hook":
        return self


class _Table(dict):
    """A dict that can be weakly referenced (the reapers must not keep the capture alive)."""


class FeatureCapture:
    """Hooks that map each output tensor of ``model`` to the output of ``layer`` in the same forward.

    Use :meth:`lookup` with an output tensor, or a row slice of one (``logits.chunk(2)``), to get the
    matching (flattened) features. ``remove()`` takes the hooks off; usable as a context manager.
    """

    def __init__(self, model: nn.Module, layer: Union[str, nn.Module]) -> None:
        self.layer_name, self.layer = resolve_layer(model, layer)
        self.active = True
        self._pending: Optional[torch.Tensor] = None
        self._calls = 0
        self._entries: Dict[int, Tuple[weakref.ref, Optional[torch.Tensor], int]] = _Table()
        self._handles = [
            self.layer.register_forward_hook(_Hook(self, self._on_layer)),
            model.register_forward_pre_hook(_Hook(self, self._on_model_start)),
            model.register_forward_hook(_Hook(self, self._on_model_end)),
        ]

    # -- hooks -------------------------------------------------------------------------------
    def _on_layer(self, module: nn.Module, inputs: Any, output: Any) -> None:
        tensors = _output_tensors(output)
        if not tensors:
            raise TypeError(f"layer {self.layer_name!r} returned {type(output).__name__}, not a tensor")
        self._pending = tensors[0]
        self._calls += 1

    def _on_model_start(self, module: nn.Module, inputs: Any) -> None:
        self._pending, self._calls = None, 0

    def _on_model_end(self, module: nn.Module, inputs: Any, output: Any) -> None:
        feature, calls = self._pending, self._calls
        self._pending, self._calls = None, 0
        # A forward in which the layer did not run is filed too (feature None), so lookup can say so.
        for out in _output_tensors(output):
            key = id(out)
            ref = weakref.ref(out, self._make_reaper(key))
            self._entries[key] = (ref, feature, calls)

    def _make_reaper(self, key: int):
        entries = weakref.ref(self._entries)

        def reap(ref: weakref.ref) -> None:
            table = entries()
            if table is not None:
                entry = table.get(key)
                if entry is not None and entry[0] is ref:
                    del table[key]

        return reap

    # -- lookup ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, output: torch.Tensor, what: str = "logits") -> torch.Tensor:
        """Features (B, D) of the forward that produced ``output`` (or the base tensor it is a row slice of)."""
        entry = self._entries.get(id(output))
        rows = slice(None)
        if entry is None or entry[0]() is not output:
            base = output._base
            entry = self._entries.get(id(base)) if base is not None else None
            if entry is None or entry[0]() is not base:
                raise LookupError(
                    f"no features recorded for {what}: pass the tensor returned by the model's forward "
                    f"(or a row slice of it, e.g. logits.chunk(2)), not a copy or a transform of it "
                    f"(.float(), .clone(), arithmetic). The hooked layer {self.layer_name!r} must run inside "
                    "that forward, and the regulariser must be built on the module you call: on a "
                    "DistributedDataParallel wrapper itself, not its .module (DDP can return new output tensors)."
                )
            rows = _row_slice(output, base, what)
        ref, feature, calls = entry
        if feature is None:
            raise LookupError(
                f"layer {self.layer_name!r} did not run in the forward that produced {what}. If the model is "
                "torch.compile'd and was called before this GOTRegularizer was built, its cached graph runs no "
                "hook added later (dynamo does not guard on hooks): build the regulariser before the first "
                "compiled call, or call torch._dynamo.reset()"
            )
        if calls != 1:
            raise RuntimeError(
                f"layer {self.layer_name!r} ran {calls} times in the forward that produced {what}; "
                "hook a layer that runs once per forward"
            )
        z = feature.reshape(feature.shape[0], -1)
        return z[rows]

    def remove(self) -> None:
        self.active = False
        for h in self._handles:
            h.remove()
        self._handles = []
        self._entries.clear()
        self._pending = None

    def __enter__(self) -> "FeatureCapture":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


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
