r"""Functional API: the GOT loss as plain functions. :class:`got_reg.GOTRegularizer` calls :func:`got_loss`'s
code path; use these directly when you already hold the features.

Bui et al., "Improving robustness with optimal transport based adversarial generalization": for clean
and adversarial mini-batches with features z, z_adv (an intermediate layer) and predictions
p = softmax(logits), q = softmax(logits_adv), the regulariser is β times the entropic Wasserstein distance

    W_θ(μ, ν) = min_{P ∈ Π(1/B, 1/B)} <P, C> + θ · KL(P ‖ 1/B²),
    C[i, j] = λ · d_x(z_i, z_adv_j) + d_y(p_i, q_j),

between μ = 1/B Σ δ(z_i, p_i) and ν = 1/B Σ δ(z_adv_j, q_j), optionally with label matching
(C[i, j] = +∞ where y_i ≠ y_j), solved by Sinkhorn or through the learned semi-dual. Two options change
what the network is pushed towards (the defaults are chosen from measurements, see README):

* ``anchor``: which parts of the clean side are a fixed target. ``"none"`` is the paper's form, in which
  W's gradient reaches both batches, so the cheapest way to lower W is to pull all representations
  together; ``"clean"`` detaches z and the clean logits inside W, so that W moves the adversarial
  examples toward the clean ones ("pushes an adversarial example toward the cluster of benign examples
  sharing the same label", the paper's abstract); ``"features"`` detaches z only.
* ``debias``: the Sinkhorn divergence S_θ(μ, ν) = W_θ(μ, ν) − ½ W_θ(μ, μ) − ½ W_θ(ν, ν) (Genevay et al.,
  2018; Feydy et al., 2019) instead of W_θ. W_θ(μ, μ) > 0: the entropic term makes W_θ smallest not at
  ν = μ but at a shrunk ν, and with label matching W_θ ≥ θ·log(#classes) for any batch, the floor that a
  network collapsed to a constant map reaches. S_θ is 0 exactly at ν = μ, and its −½W_θ(ν, ν) term
  pushes the adversarial points apart rather than together.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ._checks import (
    all_finite,
    check_choice,
    check_finite,
    check_int,
    check_mask,
    check_positive,
    check_square_cost,
    check_tensor,
)
from .costs import JointCost, PairwiseCost
from .diagnostics import GOTDiagnostics
from .solvers import KantorovichPotential, OTResult, SinkhornBackend, get_backend, semidual, with_grad
from .solvers.result import envelope
from .solvers.sinkhorn import warn_unconverged

SOLVERS = ("sinkhorn", "dual")
ANCHORS = ("none", "clean", "features")
DUAL_INPUTS = ("embedded", "raw")

__all__ = ["got_loss", "ot_loss", "joint_cost", "label_mask"]


@dataclass(frozen=True)
class GOTConfig:
    """The validated options of the GOT loss, shared by :func:`got_loss` and :class:`~got_reg.GOTRegularizer`
    (one set of checks). Field meanings: see :class:`~got_reg.GOTRegularizer`."""

    beta: float = 3.0
    lam: float = 1.0
    theta: float = 0.1
    feature_cost: str | PairwiseCost = "cosine"
    prob_cost: str | PairwiseCost = "kl"
    label_matching: bool = False
    solver: str = "sinkhorn"
    backend: str | SinkhornBackend = "torch"
    anchor: str = "clean"
    debias: bool = True
    dual_input: str = "embedded"
    max_iter: int = 1000
    tol: float = 1e-3
    cost: JointCost = field(init=False, repr=False)
    sinkhorn: SinkhornBackend = field(init=False, repr=False)

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass)
        set_("beta", check_positive("beta", self.beta, allow_zero=True))
        set_("theta", check_positive("theta", self.theta))
        set_("tol", check_positive("tol", self.tol))
        set_("max_iter", check_int("max_iter", self.max_iter))
        for name in ("label_matching", "debias"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        check_choice("solver", self.solver, SOLVERS)
        check_choice("anchor", self.anchor, ANCHORS)
        check_choice("dual_input", self.dual_input, DUAL_INPUTS)
        set_("cost", JointCost(self.feature_cost, self.prob_cost, self.lam))
        set_("lam", self.cost.lam)
        set_("sinkhorn", get_backend(self.backend))


def joint_cost(
    z: torch.Tensor,
    z_adv: torch.Tensor,
    logits: torch.Tensor,
    logits_adv: torch.Tensor,
    *,
    lam: float = 1.0,
    feature_cost: str | PairwiseCost = "cosine",
    prob_cost: str | PairwiseCost = "kl",
) -> torch.Tensor:
    r"""C[i, j] = lam · d_x(z_i, z_adv_j) + d_y(softmax(logits_i), softmax(logits_adv_j)).

    A functional shortcut for :class:`~got_reg.costs.JointCost`.
    """
    return JointCost(feature_cost, prob_cost, lam)(z, z_adv, logits, logits_adv)


def label_mask(y: torch.Tensor, y_adv: torch.Tensor | None = None) -> torch.Tensor:
    """Bool (B, B') mask, True where y[i] == y_adv[j] (y_adv defaults to y: the adversarial batch's labels)."""
    y = _labels("y", y)
    y_adv = y if y_adv is None else _labels("y_adv", y_adv)
    if y_adv.device != y.device:
        raise ValueError(f"y and y_adv must be on one device, got {y.device} and {y_adv.device}")
    return y[:, None] == y_adv[None, :]


def _labels(name: str, y: object, batch: int | None = None, device: torch.device | None = None) -> torch.Tensor:
    y = check_tensor(name, y, ndim=1)
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class indices, got {y.dtype}")
    if batch is not None and y.shape[0] != batch:
        raise ValueError(f"{name} must hold one label per example, shape ({batch},), got {tuple(y.shape)}")
    if device is not None and y.device != device:
        raise ValueError(f"{name} must be on the logits' device {device}, got {y.device}")
    return y


def ot_loss(
    cost: torch.Tensor,
    *,
    theta: float = 0.1,
    mask: torch.Tensor | None = None,
    solver: str = "sinkhorn",
    backend: str | SinkhornBackend = "torch",
    potential: torch.Tensor | None = None,
    max_iter: int = 1000,
    tol: float = 1e-3,
    grad: str = "envelope",
) -> torch.Tensor:
    r"""Entropic OT value min_P <P, C> + θ · KL(P ‖ abᵀ) between uniform weights (POT's ``ot.solve`` convention).

    ``solver="sinkhorn"``: solved to ``tol`` (L1 marginal error) by ``backend`` (``"torch"``, ``"pot"``,
    ``"geomloss"``), warning with the knob to turn if missed; with ``grad="envelope"`` the gradient is
    the optimal plan (envelope theorem), never unrolled iterations; ``grad="detach"`` returns no graph.
    ``solver="dual"``: the semi-dual at the given ``potential`` φ (B,) on the clean side,
    mean_i φ_i + mean_j[−θ log mean_i exp((φ_i − C_ij)/θ)], a lower bound of the Sinkhorn value.
    ``mask`` (bool (B, B), True = allowed) forbids the other pairs; no NaN comes from it, and a mask
    that admits no plan with uniform marginals (e.g. label masks of batches with different class
    counts) raises.
    """
    cost = check_square_cost(cost)
    theta = check_positive("theta", theta)
    check_choice("solver", solver, SOLVERS)
    check_choice("grad", grad, ("envelope", "detach"))
    mask = check_mask(mask, cost)
    check_finite("cost", cost)
    if solver == "sinkhorn":
        if potential is not None:
            raise ValueError("potential is used by solver='dual' only")
        b = get_backend(backend)
        res = b.solve(
            cost.detach(), theta, mask, max_iter=check_int("max_iter", max_iter), tol=check_positive("tol", tol)
        )
        if not bool(res.converged):
            warn_unconverged(res, b, theta, tol, max_iter)
        return with_grad(cost, res, grad)
    if potential is None:
        raise ValueError("solver='dual' needs potential=φ, a (B,) tensor of Kantorovich potentials on the clean side")
    potential = check_tensor("potential", potential, ndim=1)
    if potential.shape[0] != cost.shape[0]:
        raise ValueError(
            f"potential must have shape ({cost.shape[0]},) to match the cost, got {tuple(potential.shape)}"
        )
    value, _ = semidual(cost, potential.to(cost.dtype), theta, mask)
    return value.detach() if grad == "detach" else value


def got_loss(
    z: torch.Tensor,
    z_adv: torch.Tensor,
    logits: torch.Tensor,
    logits_adv: torch.Tensor,
    y: torch.Tensor | None = None,
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
    potential: KantorovichPotential | None = None,
    update_potential: bool = False,
    max_iter: int = 1000,
    tol: float = 1e-3,
) -> torch.Tensor:
    """β · W between the clean and adversarial joint distributions, from features and logits you already hold.

    The functional twin of :class:`got_reg.GOTRegularizer` (same options and defaults, one code path),
    without hooks. ``solver="dual"`` needs ``potential``, a :class:`~got_reg.solvers.KantorovichPotential`
    (its state: pass the same object every step), trained by one ascent step per call when
    ``update_potential`` is True. Raises on NaN/inf inputs and warns if Sinkhorn missed ``tol``.
    """
    cfg = GOTConfig(
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
    loss, diag = got_forward(
        cfg, z, z_adv, logits, logits_adv, y, potential=potential, update_potential=update_potential
    )
    finite, converged = diag.read_flags()
    if not finite:
        raise_non_finite({"z": z, "z_adv": z_adv, "logits": logits, "logits_adv": logits_adv}, potential)
    if converged is False:
        bad = diag.unconverged_result()
        warn_unconverged(bad, cfg.sinkhorn, cfg.theta, cfg.tol, cfg.max_iter)  # type: ignore[arg-type]
    return loss


def stacked_envelope(
    both: torch.Tensor, value: torch.Tensor, blocks: list[tuple[tuple[int, int], torch.Tensor, float]]
) -> torch.Tensor:
    """``value`` as a function of the stacked cost [[C(x,x), C(x,y)], [C(y,x), C(y,y)]] (2B × 2B), with the
    envelope gradient: ``weight · plan`` on each listed ``((row, column), plan, weight)`` block (row and column
    in {0, 1}), 0 elsewhere. One autograd node however many OT terms the value combines."""
    B = both.shape[0] // 2
    grad = both.new_zeros(both.shape)
    for (r, c), plan, weight in blocks:
        block = grad[r * B : (r + 1) * B, c * B : (c + 1) * B]
        if weight == 1.0:
            block.copy_(plan)
        else:
            torch.mul(plan, weight, out=block)
    return envelope(both, value, grad)


def raise_non_finite(named: dict[str, torch.Tensor], potential: KantorovichPotential | None = None) -> None:
    """Raise FloatingPointError naming the first non-finite input, or the diverged dual potential (reset)."""
    for name, t in named.items():
        check_finite(name, t)
    if potential is not None and potential.reset_if_diverged():
        raise FloatingPointError("the dual potential φ diverged (non-finite) and was reset to 0; lower dual_lr")
    raise FloatingPointError("the OT value is not finite although its inputs are; please report this")


def check_inputs(
    z: torch.Tensor,
    z_adv: torch.Tensor,
    logits: torch.Tensor,
    logits_adv: torch.Tensor,
    y: torch.Tensor | None,
    label_matching: bool,
) -> torch.Tensor | None:
    """Shapes, dtypes and devices of one call (no host sync); returns the checked labels."""
    logits = check_tensor("logits", logits, ndim=2)
    logits_adv = check_tensor("logits_adv", logits_adv, ndim=2)
    if logits_adv.shape != logits.shape:
        raise ValueError(
            f"logits_adv must have the shape of logits {tuple(logits.shape)} (one adversarial example per clean "
            f"one), got {tuple(logits_adv.shape)}"
        )
    B = logits.shape[0]
    for name, t in (("z", z), ("z_adv", z_adv)):
        t = check_tensor(name, t)
        if t.ndim < 2 or t.shape[0] != B:
            raise ValueError(f"{name} must be (B, ...) with the logits' batch size B = {B}, got shape {tuple(t.shape)}")
        if t.device != logits.device:
            raise ValueError(f"{name} must be on the logits' device {logits.device}, got {t.device}")
    if z.shape != z_adv.shape:
        raise ValueError(f"z and z_adv must have one shape, got {tuple(z.shape)} and {tuple(z_adv.shape)}")
    if y is not None:
        return _labels("y", y, B, logits.device)
    if label_matching:
        raise ValueError("label_matching=True needs the labels y of the clean batch")
    return None


def got_forward(
    cfg: GOTConfig,
    z: torch.Tensor,
    z_adv: torch.Tensor,
    logits: torch.Tensor,
    logits_adv: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    potential: KantorovichPotential | None = None,
    update_potential: bool = False,
    loss_scale: float = 1.0,
) -> tuple[torch.Tensor, GOTDiagnostics]:
    """The one code path: the loss β·W (times ``loss_scale``) and its diagnostics, with no host sync.

    The caller decides what to do with :meth:`GOTDiagnostics.read_flags` (NaN/inf inputs, convergence):
    :func:`got_loss` raises and warns, the module applies its ``nan_policy``.
    """
    y = check_inputs(z, z_adv, logits, logits_adv, y, cfg.label_matching)
    z, z_adv = z.reshape(z.shape[0], -1), z_adv.reshape(z_adv.shape[0], -1)
    if cfg.anchor == "clean":
        z, logits = z.detach(), logits.detach()
    elif cfg.anchor == "features":
        z = z.detach()
    B = z.shape[0]
    if cfg.debias:
        # One cost over the stacked batches: its blocks are C(x, y), C(x, x) and C(y, y), in one product
        # and, backward, one gradient (a launch-bound GPU step pays per kernel, not per entry).
        zs, ls = torch.cat([z, z_adv]), torch.cat([logits, logits_adv])
        inputs: tuple[torch.Tensor, ...] = (zs, ls)
        both = cfg.cost(zs, zs, ls, ls)
        cost, xx, yy = both[:B, B:], both[:B, :B], both[B:, B:]
    else:
        inputs = (z, z_adv, logits, logits_adv)
        cost = cfg.cost(*inputs)
    same = label_mask(y) if y is not None else None
    mask = same if cfg.label_matching else None
    self_terms: tuple[OTResult, ...] = ()
    if cfg.solver == "sinkhorn":
        if cfg.debias:
            res, *rest = cfg.sinkhorn.solve_many(
                torch.stack([cost, xx, yy]).detach(), cfg.theta, mask, max_iter=cfg.max_iter, tol=cfg.tol
            )
            self_terms = xx_res, yy_res = tuple(rest)
            # S_θ = W_θ(μ, ν) − ½ W_θ(μ, μ) − ½ W_θ(ν, ν): the cross plan on C(x, y), −½ each self-term's plan.
            value = stacked_envelope(
                both,
                res.value - 0.5 * (xx_res.value + yy_res.value),
                [((0, 1), res.plan, 1.0), ((0, 0), xx_res.plan, -0.5), ((1, 1), yy_res.plan, -0.5)],
            )
        else:
            res = cfg.sinkhorn.solve(cost.detach(), cfg.theta, mask, max_iter=cfg.max_iter, tol=cfg.tol)
            value = with_grad(cost, res)
    else:
        if potential is None:
            raise ValueError("solver='dual' needs potential=KantorovichPotential(...) (GOTRegularizer keeps one)")
        if cfg.debias:
            self_terms = tuple(
                cfg.sinkhorn.solve_many(
                    torch.stack([xx, yy]).detach(), cfg.theta, mask, max_iter=cfg.max_iter, tol=cfg.tol
                )
            )
        # Like the cost, φ(e) = e·w and its step run in the cost's dtype outside autocast (in bf16 under the
        # user's autocast, the semi-dual would be computed in bf16 and the step's gradient refused by Adam).
        with torch.autocast(device_type=cost.device.type, enabled=False):
            zc = z.to(cost.dtype)
            e = cfg.cost.feature_cost.embed(zc) if cfg.dual_input == "embedded" else zc
            if not potential.built:
                potential.build(e.shape[1], e.device, cost.dtype)
            if update_potential and potential.steps > 1:
                potential.ascend(e, cost, cfg.theta, mask, potential.steps - 1)
            value, res = semidual(cost, potential(e), cfg.theta, mask)
            if update_potential:
                potential.step(e, res.plan)
        if cfg.debias:
            xx_res, yy_res = self_terms
            value = value + stacked_envelope(
                both, -0.5 * (xx_res.value + yy_res.value), [((0, 0), xx_res.plan, -0.5), ((1, 1), yy_res.plan, -0.5)]
            )
    loss = (cfg.beta * loss_scale) * value
    diag = GOTDiagnostics(
        value=value.detach(),
        loss=loss.detach(),
        w_xy=res.value,
        result=res,
        label_mask=same,
        finite=all_finite(*inputs, loss),
        solver=cfg.solver,
        batch=cost.shape[0],
        self_terms=self_terms,
    )
    return loss, diag
