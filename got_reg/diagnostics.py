"""What a GOT call reports: tensors that stay on the device until someone reads them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .solvers import OTResult


@dataclass(frozen=True)
class GOTDiagnostics:
    """The diagnostics of one call. Tensor fields are detached 0-d tensors on the loss's device: reading
    them (``float(d.value)``, :meth:`as_dict`) is a host synchronisation, so training loops that care
    about speed accumulate them as tensors and read once per epoch.

    Attributes:
        value: the OT term W (or the Sinkhorn divergence with ``debias=True``; the semi-dual S_θ(φ)
            for ``solver="dual"``).
        loss: β · value (times R under ``distributed_gather``, see :class:`~got_reg.GOTRegularizer`).
        w_xy: the cross term W_θ(μ, ν) alone (equal to ``value`` without ``debias``).
        result: the solver's :class:`~got_reg.solvers.OTResult` for the cross term (plan, iterations,
            marginal error, converged).
        label_mask: the (B, B) same-label mask of the call (True where y_i == y_j), None without labels.
        same_label_mass: fraction of the plan's mass between same-label pairs (1 under label matching);
            None without labels. Computed when read (a property), so a call that nobody inspects pays nothing.
        finite: whether all features and logits were finite (and φ, for the dual).
        solver: ``"sinkhorn"`` or ``"dual"``.
        batch: the number of pairs' rows B (the global batch under ``distributed_gather``).
        self_terms: with ``debias=True``, the Sinkhorn results of the self-terms W_θ(μ, μ) and W_θ(ν, ν)
            (their tolerance is checked and warned about like the cross term's); else empty.
    """

    value: torch.Tensor
    loss: torch.Tensor
    w_xy: torch.Tensor
    result: OTResult
    label_mask: torch.Tensor | None
    finite: torch.Tensor
    solver: str
    batch: int
    self_terms: tuple[OTResult, ...] = ()

    @property
    def same_label_mass(self) -> torch.Tensor | None:
        if self.label_mask is None:
            return None
        plan = self.result.plan
        return (plan * self.label_mask).sum() / plan.sum()

    @property
    def iterations(self) -> torch.Tensor:
        return self.result.iterations

    @property
    def marginal_error(self) -> torch.Tensor:
        return self.result.marginal_error

    @property
    def converged(self) -> torch.Tensor:
        return self.result.converged

    def _solves(self) -> tuple[OTResult, ...]:
        """The Sinkhorn solves of the call (the ones with a tolerance): the cross term's, then the self-terms'."""
        return (() if self.solver == "dual" else (self.result,)) + tuple(self.self_terms)

    def flags(self) -> torch.Tensor:
        """[finite, converged of each Sinkhorn solve] as one bool tensor, what :meth:`read_flags` reads."""
        return torch.stack([self.finite] + [r.converged for r in self._solves()])

    def read_flags(self) -> tuple[bool, bool | None]:
        """(finite, converged) in one host read; converged covers every Sinkhorn solve of the call (the
        self-terms too) and is None when there is none (the dual without ``debias``)."""
        return interpret_flags(self.flags().tolist())

    def unconverged_result(self) -> OTResult | None:
        """The first Sinkhorn solve of the call that missed its tolerance, or None (reads the device)."""
        return next((r for r in self._solves() if not bool(r.converged)), None)

    def numbers(self) -> tuple[list[str], torch.Tensor]:
        """Every numeric field's name, and their values as one float64 vector on the device (two kernels and
        no host read, the ``same_label_mass`` ratio aside): what :meth:`as_dict` reads, and what a training
        loop can sum over an epoch without reading. ``finite`` is last."""
        names = ["value", "loss", "w_xy", "iterations", "marginal_error", "converged"]
        tensors = [self.value, self.loss, self.w_xy, self.iterations, self.marginal_error, self.converged]
        same_label_mass = self.same_label_mass
        if same_label_mass is not None:
            names.append("same_label_mass")
            tensors.append(same_label_mass)
        names.append("finite")
        tensors.append(self.finite)
        return names, torch.cat([t.detach().reshape(1) for t in tensors]).to(torch.float64)

    def as_dict(self) -> dict[str, float]:
        """All numeric fields as Python floats, read in one host synchronisation."""
        names, values = self.numbers()
        out = dict(zip(names, values.tolist()))
        out.update(batch=float(self.batch))
        return out


def interpret_flags(flags: list[bool]) -> tuple[bool, bool | None]:
    """(finite, converged) from the host copy of :meth:`GOTDiagnostics.flags`."""
    return bool(flags[0]), (all(flags[1:]) if len(flags) > 1 else None)
