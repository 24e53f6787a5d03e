r"""GOTRegularizer: the one line added to a PGD-AT or TRADES loop.

Bui et al., "Improving robustness with optimal transport based adversarial generalization" (GOT).
On a chosen layer with output z = g(x) and prediction h(z) = softmax(logits), the regulariser is

    β · W_θ(μ, μ_adv),   μ = 1/B Σ_i δ(z_i, h(z_i)),   μ_adv = 1/B Σ_j δ(z_adv_j, h(z_adv_j)),
    C[i, j] = λ · d_x(z_i, z_adv_j) + d_y(h(z_i), h(z_adv_j)),

with W_θ the entropic OT value min_P <P, C> + θ KL(P ‖ 1/B²) (eq. 5), solved by Sinkhorn or through
the learned semi-dual (eq. 5/6, :mod:`got_reg.solvers.dual`), and label matching (LM) restricting
transport to same-label pairs. Variants: GOT-PGD-S/LM and GOT-TRADES-S/LM. The module is the hooks and
the state (the dual's potential φ, the collapse monitor) around one call of the functional loss,
:func:`got_reg.functional.got_loss`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_choice, check_int, check_positive, ot_dtype
from .costs import PairwiseCost
from .diagnostics import GOTDiagnostics
from .distributed import gather_with_grad, rank_max, world_size
from .functional import GOTConfig, got_forward, raise_non_finite
from .graphs import GraphedCalls, PackedDiagnostics
from .hooks import FeatureCapture, FeaturesOverwritten
from .solvers import KantorovichPotential, SinkhornBackend
from .solvers.lse import triton_module
from .solvers.sinkhorn import TorchSinkhorn, warn_unconverged

NAN_POLICIES = ("raise", "skip")

__all__ = ["GOTRegularizer", "GOTCollapseWarning"]


def _another_rank_non_finite() -> FloatingPointError:
    return FloatingPointError(
        "another rank's features or logits hold NaN/inf (distributed_gather=True): every rank raises "
        "so that none waits in all_gather; nan_policy='skip' skips the GOT term on all ranks instead"
    )


class GOTCollapseWarning(UserWarning):
    """Warned when training looks collapsed: clean cross-entropy stuck near ln(#classes) with GOT on."""


# The collapse monitor: after _WARMUP training calls, the clean cross-entropy of every _SAMPLE-th call of each
# window of _WINDOW calls (the window's last call always) is summed on the device and the mean is read at the
# window's end (one host read per window); at or above _CHANCE · ln(K) it warns. Sampling keeps the monitor's
# kernels off most calls.
_WARMUP, _WINDOW, _SAMPLE, _CHANCE = 200, 50, 5, 0.9


class GOTRegularizer(nn.Module):
    r"""β · W_θ between the clean and adversarial joint distributions of (z, softmax(logits)).

    Usage::

        got = GOTRegularizer(model, layer="classifier.4", label_matching=True)
        logits_clean, logits_adv = model(x), model(x_adv)     # the loop's own forwards
        loss = trades_loss + got(logits_clean, logits_adv, y)  # the added line

    The regulariser hooks ``layer`` (a name from ``model.named_modules()``, resolved through DDP's
    ``.module`` and ``torch.compile``'s ``._orig_mod``) and the model itself. Each call uses the
    features that the layer produced in the forwards that produced the two logits tensors; it runs
    no forward itself and keeps nothing from forwards whose outputs are gone (the attack's).
    One concatenated forward works too::

        logits_clean, logits_adv = model(torch.cat([x, x_adv])).chunk(2)

    Args:
        model: the network (plain, DDP or compiled; not ``nn.DataParallel``).
        layer: submodule name or instance whose output, flattened to (B, D), is z.
        beta: weight β of W in the loss (paper: 10).
        lam: weight λ of the feature cost.
        theta: entropic temperature θ (paper: 0.1).
        feature_cost: d_x, ``"cosine"`` or ``"l2"`` (or a :class:`~got_reg.costs.PairwiseCost`).
        prob_cost: d_y, ``"kl"`` or ``"l1"`` (or a :class:`~got_reg.costs.PairwiseCost` on logits).
        label_matching: transport only between pairs with the same label (LM).
        solver: ``"sinkhorn"`` (solved to ``tol``) or ``"dual"`` (learned linear potential φ; a lower
            bound of the Sinkhorn value unless the feature dim is ≥ the batch size).
        backend: Sinkhorn backend, ``"torch"`` (default: own log-domain solver, fastest in
            ``benchmarks/``), ``"pot"`` or ``"geomloss"``; all meet ``tol``.
        anchor: ``"clean"`` (default) makes the clean side of the cost a fixed target, so W moves the
            adversarial examples toward the clean ones; ``"features"`` anchors z only; ``"none"`` is the
            paper's form (W's gradient reaches both sides). See :mod:`got_reg.functional`.
        debias: use the Sinkhorn divergence W(μ,ν) − ½W(μ,μ) − ½W(ν,ν) (default) instead of W, which
            removes the entropic bias that rewards collapsing representations.
        dual_input: ``"embedded"`` (default): φ acts on the representation the feature cost sees (unit
            vectors for cosine), which keeps the min-max bounded; ``"raw"``: on z itself (the paper).
        max_iter, tol: Sinkhorn stopping rule (L1 marginal error); missing it warns.
        dual_lr, dual_steps: φ's Adam learning rate and ascent steps per training call.
        distributed_gather: under ``torch.distributed``, run the OT over the global batch (features,
            logits and labels gathered from every rank, local gradients kept). The returned loss is
            then R · β · W so that DDP's gradient averaging gives the global-batch gradient of β · W;
            ``diagnostics.value`` stays W. Without a process group this is a no-op.
        nan_policy: ``"raise"`` (default) on NaN/inf features or logits, or ``"skip"``: warn and
            return a zero loss for that step.
        select: which tensor of a tuple/list/dict/dataclass layer output is z (an index, key or a
            callable ``output -> tensor``); see :class:`~got_reg.FeatureCapture`.
        cuda_graphs: replay the call from CUDA graphs (:mod:`got_reg.graphs`): captured once per input
            shape, then one graph launch (forward, backward and φ's step) instead of some sixty kernel
            launches. Needs ``backend="torch"``; a call is replayed when its tensors are on CUDA and grad is
            enabled, and, where it solves Sinkhorn (``solver="sinkhorn"``, or the dual's ``debias`` terms),
            in at most float32 with B ≤ 256 (the fused Triton kernel; ``GOT_REG_FUSED_MAX`` in the environment
            moves 256, up to 1024); otherwise it runs eagerly (with a
            warning, once per reason, unless grad is simply off). φ's Adam settings are those of its capture.
        deferred_checks: with ``cuda_graphs=True``, a replayed call does not wait for its NaN and
            convergence flags: it starts their copy to the host and they are read at the next call (or by
            :meth:`check`), when the GPU has long finished it, so the call leaves the host without any
            synchronisation. A call that was not finite has already returned a zero loss and zero
            gradients (decided on the GPU), so its step went on without the GOT term; the next call then
            warns (``nan_policy="skip"``) or raises (``"raise"``), and a diverged φ is reset before it
            is used again. Until that read, :attr:`diagnostics` may be such a call's (NaN) values. Call
            :meth:`check` after the last step and before saving φ, so that the last call is checked too
            (leaving a ``with`` block of the regulariser does).

    φ is trained (one Adam step per call, from the same pass that gives the loss) only in training
    mode: when both the regulariser and the model (as seen on the hooked layer) are in training mode
    and grad is enabled. Each call reads the device once (NaN check and convergence; with
    ``deferred_checks``, the previous call's); after each call :attr:`diagnostics` holds a
    :class:`~got_reg.GOTDiagnostics` of device tensors.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str | nn.Module,
        *,
        beta: float = 3.0,
        lam: float = 1.0,
        theta: float = 0.1,
        feature_cost: str | PairwiseCost = "cosine",
        prob_cost: str | PairwiseCost = "kl",
        label_matching: bool = False,
        solver: str = "sinkhorn",
        backend: str | SinkhornBackend = "torch",
        anchor: str = "clean",
        debias: bool = True,
        dual_input: str = "embedded",
        max_iter: int = 1000,
        tol: float = 1e-3,
        dual_lr: float = 1e-2,
        dual_steps: int = 1,
        distributed_gather: bool = False,
        nan_policy: str = "raise",
        select: Any = None,
        cuda_graphs: bool = False,
        deferred_checks: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.config = GOTConfig(
            beta=beta,
            lam=lam,
            theta=theta,
            feature_cost=feature_cost,
            prob_cost=prob_cost,
            label_matching=label_matching,
            solver=solver,
            backend=backend,
            anchor=anchor,
            debias=debias,
            dual_input=dual_input,
            max_iter=max_iter,
            tol=tol,
        )
        self.distributed_gather = bool(distributed_gather)
        self.nan_policy = check_choice("nan_policy", nan_policy, NAN_POLICIES)
        lr, steps = check_positive("dual_lr", dual_lr), check_int("dual_steps", dual_steps)
        # Only the dual has state: a Sinkhorn regulariser's state_dict stays empty.
        self.potential = KantorovichPotential(lr=lr, steps=steps) if solver == "dual" else None
        # A plain attribute, not a submodule: the model's parameters must not enter got.state_dict().
        self._capture = FeatureCapture(model, layer, select=select)
        if not isinstance(cuda_graphs, bool):
            raise TypeError(f"cuda_graphs must be a bool, got {type(cuda_graphs).__name__}")
        if cuda_graphs and not isinstance(self.config.sinkhorn, TorchSinkhorn):
            raise ValueError(
                "cuda_graphs=True needs backend='torch' (the fused kernel, no host sync); "
                f"got backend={self.config.sinkhorn.name!r}"
            )
        if not isinstance(deferred_checks, bool):
            raise TypeError(f"deferred_checks must be a bool, got {type(deferred_checks).__name__}")
        if deferred_checks and not cuda_graphs:
            raise ValueError(
                "deferred_checks=True needs cuda_graphs=True (only a replayed call zeroes its own loss and "
                "gradients on the GPU when it is not finite); got cuda_graphs=False"
            )
        self.deferred_checks = deferred_checks
        self._pending: PackedDiagnostics | None = None  # a replayed call whose flags are not read yet
        self._graphs: GraphedCalls | None = None
        if cuda_graphs and self.potential is not None:
            pot = self.potential
            self._graphs = GraphedCalls(self._got_forward, hold=pot.unchanged, state=pot.fingerprint)
        elif cuda_graphs:
            self._graphs = GraphedCalls(self._got_forward)
        self._graph_warned: set[str] = set()
        self.layer_name = self._capture.layer_name
        self._diagnostics: GOTDiagnostics | PackedDiagnostics | None = None
        self._monitor: torch.Tensor | None = None
        self._calls = 0
        self._collapse_warned = False

    # -- hooks ---------------------------------------------------------------------------------
    def remove(self) -> None:
        """Take the hooks off the model (idempotent); afterwards calls raise."""
        self._capture.remove()

    def __enter__(self) -> GOTRegularizer:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        """Take the hooks off; leaving without an exception also runs :meth:`check` (the last deferred call)."""
        try:
            if exc_type is None:
                self.check()
        finally:
            self.remove()

    @property
    def num_captured(self) -> int:
        """How many model outputs currently have features filed (those the caller still holds)."""
        return len(self._capture)

    @property
    def beta(self) -> float:
        return self.config.beta

    # -- the loss ------------------------------------------------------------------------------
    def forward(
        self, logits_clean: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """β · W for the two batches; ``y`` (B,) are the clean batch's labels, needed for label matching."""
        if not self._capture.active:
            raise RuntimeError("this GOTRegularizer was removed from its model; build a new one")
        self.check()  # the previous call's flags, if deferred: before φ or the graphs are used again
        gather = self.distributed_gather and world_size() > 1
        try:
            z = self._capture.lookup(logits_clean, "logits_clean")
            z_adv = self._capture.lookup(logits_adv, "logits_adv")
        except FeaturesOverwritten as exc:  # once per mode at most: the hooks copy from then on
            # Under the gather every rank takes one decision (code 1: skip), or the others would wait in all_gather.
            if gather and rank_max(1, logits_clean.device) == 2 and self.nan_policy == "raise":
                raise _another_rank_non_finite() from exc
            return self._skip(logits_clean, str(exc))
        named = {
            f"features of logits_clean (layer {self.layer_name!r})": z,
            f"features of logits_adv (layer {self.layer_name!r})": z_adv,
            "logits_clean": logits_clean,
            "logits_adv": logits_adv,
        }
        if gather:
            # The decision to skip or raise must be collective, or a rank that left alone would leave
            # the others waiting in all_gather until the process-group timeout.
            bad = [n for n, t in named.items() if isinstance(t, torch.Tensor) and not bool(torch.isfinite(t).all())]
            code = rank_max(2 if bad else 0, logits_clean.device)
            if code == 2:
                if self.nan_policy == "skip":
                    return self._skip(logits_clean, bad or ["another rank"])
                if bad:
                    raise_non_finite({bad[0]: named[bad[0]]})
                raise _another_rank_non_finite()
            if code == 1:
                return self._skip(logits_clean, "another rank's features were overwritten in place (see its warning)")
            z, z_adv = gather_with_grad(z), gather_with_grad(z_adv)
            logits_clean, logits_adv = gather_with_grad(logits_clean), gather_with_grad(logits_adv)
            if y is not None:
                y = gather_with_grad(y)
        train_phi = (
            self.potential is not None
            and self.training
            and self._capture.layer.training
            and torch.is_grad_enabled()
            and not logits_clean.is_inference()
        )
        scale = float(world_size() if gather else 1)
        inputs = (z, z_adv, logits_clean, logits_adv) + (() if y is None else (y,))
        diag: GOTDiagnostics | PackedDiagnostics
        if self._graphs is not None and self._graphable(inputs):
            loss, diag = self._graphs(inputs, loss_scale=scale, update_potential=train_phi)
        else:
            loss, diag = got_forward(
                self.config,
                z,
                z_adv,
                logits_clean,
                logits_adv,
                y,
                potential=self.potential,
                update_potential=train_phi,
                loss_scale=scale,
            )
        if self.deferred_checks and isinstance(diag, PackedDiagnostics):
            diag.copy_flags()  # read by the next call's check(), which then waits for this call's work only
            self._pending = diag
        else:
            finite, converged = diag.read_flags()  # the call's one host read
            if not finite:
                if self.nan_policy == "skip":
                    if self.potential is not None:
                        self.potential.reset_if_diverged()
                    bad = [n for n, t in named.items() if not bool(torch.isfinite(t).all())]
                    return self._skip(logits_clean, bad)
                raise_non_finite(named, self.potential)
            if converged is False:
                self._warn_unconverged(diag)
        self._diagnostics = diag
        if y is not None and self.training and torch.is_grad_enabled():
            self._watch_collapse(logits_clean, y)
        return loss

    def check(self) -> None:
        """Read the flags of the last replayed call if they are still unread (``deferred_checks=True``; one host
        read), and warn or raise as its own call would have: a no-op otherwise. Each call runs it first."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        finite, converged = pending.read_flags()
        if finite:
            if converged is False:
                self._warn_unconverged(pending)
            return
        if self._diagnostics is pending:
            self._diagnostics = None  # as after a skipped call
        reset = self.potential is not None and self.potential.reset_if_diverged()
        what = (
            "an earlier call had non-finite features, logits or OT value (deferred_checks=True: read at the next "
            "call; that call returned a zero loss and zero gradients, so its step went on without the GOT term)"
        )
        if reset:
            what += "; the dual potential φ diverged with it and was reset to 0"
        if self.nan_policy == "skip":
            warnings.warn(f"GOT term skipped: {what}", RuntimeWarning, stacklevel=3)
            return
        raise FloatingPointError(f"{what}; nan_policy='skip' skips such steps with a warning instead")

    def _warn_unconverged(self, diag: GOTDiagnostics | PackedDiagnostics) -> None:
        c = self.config
        missed = (diag.unpack() if isinstance(diag, PackedDiagnostics) else diag).unconverged_result()
        if missed is not None:
            warn_unconverged(missed, c.sinkhorn, c.theta, c.tol, c.max_iter)

    @property
    def diagnostics(self) -> GOTDiagnostics | None:
        """The last call's :class:`~got_reg.GOTDiagnostics` (device tensors), None before the first call and
        after a skipped one. With ``cuda_graphs=True`` they are built from the call's packed copy when first
        read."""
        return None if self._diagnostics is None else self._built_diagnostics()

    @diagnostics.setter
    def diagnostics(self, value: GOTDiagnostics | None) -> None:
        self._diagnostics = value

    def _built_diagnostics(self) -> GOTDiagnostics:
        d = self._diagnostics
        assert d is not None
        if isinstance(d, PackedDiagnostics):
            d = self._diagnostics = d.unpack()
        return d

    def _got_forward(self, z, z_adv, logits_clean, logits_adv, y=None, *, loss_scale: float, update_potential: bool):  # type: ignore[no-untyped-def]
        """The call that the CUDA graphs capture (its only state change: φ's steps, in place)."""
        return got_forward(
            self.config,
            z,
            z_adv,
            logits_clean,
            logits_adv,
            y,
            potential=self.potential,
            update_potential=update_potential,
            loss_scale=loss_scale,
        )

    def _graphable(self, inputs: tuple[torch.Tensor, ...]) -> bool:
        """Whether this call can be replayed from a CUDA graph; warns once per reason why not."""
        if not torch.is_grad_enabled() or not any(t.requires_grad for t in inputs):
            return False  # evaluation: nothing to gain from a backward graph, and nothing to warn about
        B, device = inputs[2].shape[0], inputs[2].device
        dtype = ot_dtype(torch.promote_types(inputs[0].dtype, inputs[2].dtype))  # the cost's, as JointCost builds it
        solves = self.config.solver == "sinkhorn" or self.config.debias  # Sinkhorn solves in the call
        opt = self.potential.optimizer if self.potential is not None else None
        if any(not t.is_cuda for t in inputs):
            reason = "the features and logits are not on a CUDA device"
        elif torch.cuda.is_current_stream_capturing():
            return False  # inside the caller's own capture: the eager call is what gets captured
        elif opt is not None and not opt.defaults.get("fused"):
            reason = "φ's Adam is not the fused one (its step reads the host)"
        elif not solves:
            return True
        elif (tri := triton_module()) is None:
            reason = "Triton is not available, so Sinkhorn would synchronise with the host every few sweeps"
        elif tri.fused_takes(B, B, dtype, device):  # the solver's own test: every solve in one launch, no sync
            return True
        elif B > (limit := tri.fused_max()):
            reason = (
                f"the batch size is above {limit} (GOT_REG_FUSED_MAX), where Sinkhorn checks convergence on the host"
            )
        elif dtype != torch.float32:
            reason = "the inputs are float64 (the fused kernel is float32)"
        elif tri.INTERPRET:
            reason = "Triton runs interpreted (TRITON_INTERPRET=1), so Sinkhorn would synchronise with the host"
        else:
            reason = f"the fused Sinkhorn kernel does not take B = {B}"
        if reason not in self._graph_warned:
            self._graph_warned.add(reason)
            warnings.warn(
                f"GOTRegularizer(cuda_graphs=True) runs this call eagerly: {reason}.", RuntimeWarning, stacklevel=3
            )
        return False

    def _skip(self, logits_clean: torch.Tensor, bad: list | str) -> torch.Tensor:
        """A zero loss for this step, with a warning saying why (``bad``: the non-finite inputs, or a reason)."""
        why = bad if isinstance(bad, str) else f"non-finite values in {bad or 'the OT value'}"
        warnings.warn(f"GOT term skipped for this step: {why}", RuntimeWarning, stacklevel=3)
        self.diagnostics = None
        return logits_clean.new_zeros((), dtype=torch.float32)

    def _watch_collapse(self, logits_clean: torch.Tensor, y: torch.Tensor) -> None:
        """Warn once if the clean cross-entropy sits near ln(K) (chance) for a window after warm-up."""
        if self._collapse_warned:
            return
        self._calls += 1
        if self._calls <= _WARMUP - _WINDOW:
            return
        position = self._calls % _WINDOW  # 0 at the window's last call
        if position % _SAMPLE == 0:
            ce = F.cross_entropy(logits_clean.detach().float(), y)
            assert self._diagnostics is not None
            # .value of either form: a replayed call's diagnostics are not built for it (some sixty views)
            term = torch.stack([ce, self._diagnostics.value.float(), ce.new_ones(())])
            self._monitor = term if self._monitor is None else self._monitor + term
        if position or self._monitor is None:
            return
        ce_sum, w_sum, samples = self._monitor.tolist()
        ce_mean, w_mean = ce_sum / samples, w_sum / samples
        self._monitor = None
        k = logits_clean.shape[1]
        if ce_mean >= _CHANCE * math.log(k):
            self._collapse_warned = True
            warnings.warn(
                f"GOT training looks collapsed: the clean cross-entropy averaged {ce_mean:.3f} over {samples:.0f} "
                f"of the last {_WINDOW} training calls, near chance ln({k}) = {math.log(k):.3f}, with the OT term at "
                f"{w_mean:.4g} (beta={self.config.beta:g}, anchor={self.config.anchor!r}, "
                f"debias={self.config.debias}). "
                "Lower beta, or use anchor='clean' and debias=True (the defaults).",
                GOTCollapseWarning,
                stacklevel=3,
            )

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"layer={self.layer_name!r}, beta={c.beta:g}, lam={c.lam:g}, theta={c.theta:g}, "
            f"feature_cost={c.cost.feature_cost.name!r}, prob_cost={c.cost.prob_cost.name!r}, "
            f"label_matching={c.label_matching}, solver={c.solver!r}, backend={c.sinkhorn.name!r}, "
            f"anchor={c.anchor!r}, debias={c.debias}"
        )
