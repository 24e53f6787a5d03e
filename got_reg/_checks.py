"""Argument checks shared by the modules and the functional API.

Every message names what was expected and what came, so that a wrong call is fixed from the message
alone.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

import torch


class GOTConvergenceWarning(UserWarning):
    """Warned when an iterative solver stops before meeting its tolerance."""


def check_choice(name: str, value: object, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        hint = ""
        if isinstance(value, str):
            close = difflib.get_close_matches(value, choices, n=1)
            if close:
                hint = f" Did you mean {close[0]!r}?"
        raise ValueError(f"unknown {name} {value!r}: expected one of {', '.join(map(repr, choices))}.{hint}")
    return value


def check_positive(name: str, value: object, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    ok = value >= 0 if allow_zero else value > 0
    if not ok or value != value or value == float("inf"):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value!r}")
    return value


def check_int(name: str, value: object, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_tensor(name: str, value: object, *, ndim: int | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(value.shape)}")
    return value


def check_finite(name: str, value: torch.Tensor) -> None:
    """Raise on NaN/inf; one reduction, so it stays cheap on large batches."""
    if not bool(torch.isfinite(value).all()):
        n_nan = int(torch.isnan(value).sum())
        n_inf = int(torch.isinf(value).sum())
        raise FloatingPointError(
            f"{name} holds {n_nan} NaN and {n_inf} inf values (shape {tuple(value.shape)}); the OT term "
            "would be NaN. Fix the model/attack, or pass nan_policy='skip' to drop the term for such steps."
        )


def all_finite(*tensors: torch.Tensor) -> torch.Tensor:
    """Whether every entry of every tensor is finite, as a 0-d bool tensor on their device (no host sync).

    One ``aminmax`` reduction per tensor (NaN propagates to both extremes, ±inf shows as one), then x − x,
    which is 0 exactly when x is finite: a handful of kernels, where ``isfinite(t).all()`` is five per tensor.
    """
    extremes: list[torch.Tensor] = []
    for t in tensors:
        t = t.detach()
        if t.numel() == 1:
            extremes.append(t.reshape(()))
        elif t.numel():
            extremes.extend(torch.aminmax(t))
    x = torch.stack(extremes)
    return (x - x).eq(0).all()


def check_square_cost(cost: object) -> torch.Tensor:
    cost = check_tensor("cost", cost, ndim=2)
    if cost.shape[0] != cost.shape[1]:
        raise ValueError(f"cost must be square (B, B) for two batches of the same size, got shape {tuple(cost.shape)}")
    if not cost.is_floating_point():
        raise TypeError(f"cost must be a floating-point tensor, got {cost.dtype}")
    return cost


def check_mask(mask: torch.Tensor | None, cost: torch.Tensor) -> torch.Tensor | None:
    if mask is None:
        return None
    mask = check_tensor("mask", mask)
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = transport allowed), got {mask.dtype}")
    if mask.shape != cost.shape:
        raise ValueError(f"mask must have the cost's shape {tuple(cost.shape)}, got {tuple(mask.shape)}")
    empty_rows = (~mask.any(dim=1)).nonzero().flatten()
    empty_cols = (~mask.any(dim=0)).nonzero().flatten()
    if empty_rows.numel() or empty_cols.numel():
        raise ValueError(
            "mask leaves no allowed entry in rows "
            f"{empty_rows.tolist()[:10]} / columns {empty_cols.tolist()[:10]}: uniform marginals are infeasible"
        )
    _check_blocks_feasible(mask)
    return mask


def _check_blocks_feasible(mask: torch.Tensor) -> None:
    """For a block mask (a label mask: rows sharing one pattern, patterns on disjoint columns), a plan with
    uniform marginals exists iff each block holds the same share of rows (of B) as of columns (of B')."""
    B, Bp = mask.shape
    patterns, counts = torch.unique(mask, dim=0, return_counts=True)
    if bool((patterns.sum(0) > 1).any()):
        return  # not a block mask: feasibility is a flow problem, left to the solver's convergence test
    cols = patterns.sum(1)
    bad = (counts * Bp != cols * B).nonzero().flatten()
    if bad.numel():
        k = int(bad[0])
        raise ValueError(
            f"mask admits no plan with uniform marginals: a block of {int(counts[k])} of the {B} rows may only "
            f"send mass to {int(cols[k])} of the {Bp} columns, so its rows carry {int(counts[k])}/{B} of the mass "
            f"and its columns {int(cols[k])}/{Bp}. With label_mask(y, y_adv) the two batches must hold the same "
            "number of examples of every class (the adversarial batch normally has the clean batch's labels)"
        )


def ot_dtype(dtype: torch.dtype) -> torch.dtype:
    """OT runs in at least fp32: half precision under/overflows in the log-sum-exp."""
    return torch.float64 if dtype == torch.float64 else torch.float32
