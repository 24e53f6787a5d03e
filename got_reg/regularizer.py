r"""GOTRegularizer: the one line added to a PGD-AT or TRADES loop.

Bui et al., "Improving robustness with optimal transport based adversarial generalization" (GOT).
On a chosen layer with output z = g(x) and prediction h(z) = softmax(logits), the regulariser is

    β · W_θ(μ, μ_adv),   μ = 1/B Σ_i δ(z_i, h(z_i)),   μ_adv = 1/B Σ_j δ(z_adv_j, h(z_adv_j)),
    C[i, j] = λ · d_x(z_i, z_adv_j) + d_y(h(z_i), h(z_adv_j)),

with W_θ the entropic OT value min_P <P, C> + θ KL(P ‖ 1/B²) (eq. 5), solved by Sinkhorn or through
the learned semi-dual (eq. 5/6, :mod:`got_reg.solvers.dual`), and label matching (LM) restricting
transport to same-label pairs. Variants: GOT-PGD-S/LM and GOT-TRADES-S/LM.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from ._checks import check_choice, check_finite, check_int, check_positive, check_tensor
from .costs import FeatureCost, ProbCost, get_feature_cost, get_prob_cost
from .distributed import any_rank, gather_with_grad, world_size
from .functional import SOLVERS, joint_cost, label_mask
from .hooks import FeatureCapture
from .solvers import BACKENDS, KantorovichPotential, entropic_ot, semidual_value_and_plan

NAN_POLICIES = ("raise", "skip")


class GOTRegularizer(nn.Module):
    r"""β · W_θ between the clean and adversarial joint distributions of (z, softmax(logits)).

    Usage::

        got = GOTRegularizer(model, layer="classifier.4", beta=10.0, label_matching=True)
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
        feature_cost: d_x, ``"cosine"`` or ``"l2"`` (or a :class:`~got_reg.costs.FeatureCost`).
        prob_cost: d_y, ``"kl"`` or ``"l1"`` (or a :class:`~got_reg.costs.ProbCost`).
        label_matching: transport only between pairs with the same label (LM).
        solver: ``"sinkhorn"`` (solved to ``tol``) or ``"dual"`` (learned linear potential φ; a lower
            bound of the Sinkhorn value unless the feature dim is ≥ the batch size).
        backend: Sinkhorn backend, ``"torch"`` (default: own log-domain solver, fastest in
            ``benchmarks/``), ``"pot"`` or ``"geomloss"``.
        max_iter, tol: Sinkhorn stopping rule (L1 marginal error); missing it warns.
        dual_lr, dual_steps: φ's Adam learning rate and ascent steps per training-mode call.
        distributed_gather: under ``torch.distributed``, run the OT over the global batch (features,
            logits and labels gathered from every rank, local gradients kept). The returned loss is
            then R · β · W so that DDP's gradient averaging gives the global-batch gradient of β · W;
            ``diagnostics["value"]`` stays W. Without a process group this is a no-op.
        nan_policy: ``"raise"`` (default) on NaN/inf features or logits, or ``"skip"``: warn and
            return a zero loss for that step.

    After each call, :attr:`diagnostics` holds the value W, the loss, the iterations, the marginal
    error, whether the solve converged, and (with labels) the fraction of mass moved between
    same-label pairs.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: Union[str, nn.Module],
        *,
        beta: float = 10.0,
        lam: float = 1.0,
        theta: float = 0.1,
        feature_cost: Union[str, FeatureCost] = "cosine",
        prob_cost: Union[str, ProbCost] = "kl",
        label_matching: bool = False,
        solver: str = "sinkhorn",
        backend: str = "torch",
        max_iter: int = 1000,
        tol: float = 1e-3,
        dual_lr: float = 1e-2,
        dual_steps: int = 1,
        distributed_gather: bool = False,
        nan_policy: str = "raise",
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.beta = check_positive("beta", beta, allow_zero=True)
        self.lam = check_positive("lam", lam, allow_zero=True)
        self.theta = check_positive("theta", theta)
        self.feature_cost = get_feature_cost(feature_cost)
        self.prob_cost = get_prob_cost(prob_cost)
        if not isinstance(label_matching, bool):
            raise TypeError(f"label_matching must be a bool, got {type(label_matching).__name__}")
        self.label_matching = label_matching
        self.solver = check_choice("solver", solver, SOLVERS)
        self.backend = check_choice("backend", backend, BACKENDS)
        self.max_iter = check_int("max_iter", max_iter)
        self.tol = check_positive("tol", tol)
        self.distributed_gather = bool(distributed_gather)
        self.nan_policy = check_choice("nan_policy", nan_policy, NAN_POLICIES)
        self.potential = KantorovichPotential(
            lr=check_positive("dual_lr", dual_lr), steps=check_int("dual_steps", dual_steps)
        )
        # A plain attribute, not a submodule: the model's parameters must not enter got.state_dict().
        self._capture = FeatureCapture(model, layer)
        self.layer_name = self._capture.layer_name
        self.diagnostics: Dict[str, Any] = {}

    # -- hooks ---------------------------------------------------------------------------------
    def remove(self) -> None:
        """Take the hooks off the model (idempotent); afterwards calls raise."""
        self._capture.remove()

    def __enter__(self) -> "GOTRegularizer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    @property
    def num_captured(self) -> int:
        """How many model outputs currently have features filed (those the caller still holds)."""
        return len(self._capture)

    # -- the loss ------------------------------------------------------------------------------
    def forward(
        self, logits_clean: torch.Tensor, logits_adv: torch.Tensor, y: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """β · W for the two batches; ``y`` (B,) are the clean batch's labels, needed for label matching."""
        if not self._capture.active:
            raise RuntimeError("this GOTRegularizer was removed from its model; build a new one")
        logits_clean = check_tensor("logits_clean", logits_clean, ndim=2)
        logits_adv = check_tensor("logits_adv", logits_adv, ndim=2)
        if logits_adv.shape != logits_clean.shape:
            raise ValueError(
                f"logits_adv must have the shape of logits_clean {tuple(logits_clean.shape)} (one adversarial "
                f"example per clean one), got {tuple(logits_adv.shape)}"
            )
        B = logits_clean.shape[0]
        if y is not None:
            y = check_tensor("y", y)
            if y.shape != (B,):
                raise ValueError(f"y must hold one label per example, shape ({B},), got {tuple(y.shape)}")
            if y.is_floating_point() or y.dtype == torch.bool:
                raise TypeError(f"y must hold integer class indices, got {y.dtype}")
        elif self.label_matching:
            raise ValueError("label_matching=True needs the labels: call got(logits_clean, logits_adv, y)")
        z = self._capture.lookup(logits_clean, "logits_clean")
        z_adv = self._capture.lookup(logits_adv, "logits_adv")
        if z.shape != z_adv.shape or z.shape[0] != B:
            raise ValueError(
                f"features of layer {self.layer_name!r} do not match the logits: clean {tuple(z.shape)}, "
                f"adversarial {tuple(z_adv.shape)}, logits batch {B}"
            )

        named = {
            f"features of logits_clean (layer {self.layer_name!r})": z,
            f"features of logits_adv (layer {self.layer_name!r})": z_adv,
            "logits_clean": logits_clean,
            "logits_adv": logits_adv,
        }
        bad = [name for name, t in named.items() if not bool(torch.isfinite(t).all())]
        gather = self.distributed_gather and world_size() > 1
        # Under gather the decision (skip or raise) must be collective: a rank that left alone would
        # leave the others waiting in all_gather until the process-group timeout.
        if any_rank(bool(bad), z.device) if gather else bad:
            if self.nan_policy == "skip":
                warnings.warn(f"GOT term skipped for this step: non-finite values in {bad or 'another rank'}",
                              RuntimeWarning, stacklevel=2)
                self.diagnostics = {"value": math.nan, "loss": 0.0, "skipped": True}
                return logits_clean.new_zeros((), dtype=torch.float32)
            if bad:
                check_finite(bad[0], named[bad[0]])
            raise FloatingPointError(
                "another rank's features or logits hold NaN/inf (distributed_gather=True): every rank raises "
                "so that none waits in all_gather; nan_policy='skip' skips the GOT term on all ranks instead"
            )

        if gather:
            z, z_adv = gather_with_grad(z), gather_with_grad(z_adv)
            logits_clean, logits_adv = gather_with_grad(logits_clean), gather_with_grad(logits_adv)
            if y is not None:
                y = gather_with_grad(y)
        cost = joint_cost(z, z_adv, logits_clean, logits_adv, lam=self.lam,
                          feature_cost=self.feature_cost, prob_cost=self.prob_cost)
        mask = label_mask(y) if self.label_matching else None
        diag: Dict[str, Any] = {"solver": self.solver, "batch": cost.shape[0]}
        if self.solver == "sinkhorn":
            value, res = entropic_ot(cost, self.theta, mask, backend=self.backend, max_iter=self.max_iter, tol=self.tol)
            plan = res.plan
            diag.update(iterations=res.iterations, marginal_error=res.marginal_error, converged=res.converged)
        else:
            value, plan = self._dual_value(z, cost, mask)
            rows = plan.sum(1)
            diag.update(iterations=self.potential.num_updates,
                        marginal_error=float((rows - 1.0 / cost.shape[0]).abs().sum()), converged=None)
        scale = self.beta * (world_size() if gather else 1)
        loss = scale * value
        diag.update(value=float(value.detach()), loss=float(loss.detach()), skipped=False)
        if y is not None:
            # 1 − cross-label mass: exactly 1 under label matching, where the cross entries are exact zeros.
            diag["same_label_mass"] = float(1.0 - plan[~label_mask(y)].sum() / plan.sum())
        self.diagnostics = diag
        return loss

    def _dual_value(self, z: torch.Tensor, cost: torch.Tensor, mask: Optional[torch.Tensor]):
        z32 = z.to(cost.dtype)
        if not self.potential.built:
            self.potential.build(z32.shape[1], z32.device, cost.dtype)
        if self.training and torch.is_grad_enabled():
            self.potential.ascend(z32, cost, self.theta, mask)
        # The model gets the gradient of the value at the current φ; φ's own parameters are trained
        # only by ascend(), so they are detached here.
        phi = self.potential(z32, detach_params=True)
        return semidual_value_and_plan(cost, phi, self.theta, mask)

    def extra_repr(self) -> str:
        return (
            f"layer={self.layer_name!r}, beta={self.beta:g}, lam={self.lam:g}, theta={self.theta:g}, "
            f"feature_cost={self.feature_cost.name!r}, prob_cost={self.prob_cost.name!r}, "
            f"label_matching={self.label_matching}, solver={self.solver!r}, backend={self.backend!r}"
        )
