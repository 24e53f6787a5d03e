"""The Triton kernel modules for tests: compiled on a CUDA machine, else run on CPU tensors through Triton's
interpreter.

TRITON_INTERPRET=1 must be set when the kernels are decorated, so it is set before triton is imported, and a
module imported earlier without it is reloaded (then the variable is restored). Shared by
tests/solvers/test_triton.py and tests/costs/test_triton_cosine_kl.py.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def kernel_modules(*names: str) -> list[ModuleType]:
    """The named modules, each with kernels for DEVICE; the test module is skipped without Triton. Name a
    module after those it takes kernel helpers from (it is reloaded after them)."""
    saved = os.environ.get("TRITON_INTERPRET")
    if not CUDA:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        pytest.importorskip("triton")
        try:  # imported lazily at the first launch, and it checks TRITON_INTERPRET then: import it now
            import triton.experimental.gluon  # noqa: F401
        except ImportError:
            pass
        modules = []
        for name in names:
            module = importlib.import_module(name)
            if not CUDA and not module.INTERPRET:
                module = importlib.reload(module)
            modules.append(module)
        return modules
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved
