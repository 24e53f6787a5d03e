r"""Entropic optimal transport between two uniform empirical measures, with the envelope gradient.

For a cost matrix C (B × B'), uniform weights a = 1/B, b = 1/B' and temperature θ > 0 the value is

    W_θ(C) = min_{P ∈ Π(a, b)}  <P, C> + θ · KL(P ‖ a bᵀ)                               (1)

(the convention of POT's ``ot.solve(C, reg=θ).value`` and of eq. 5 of Bui et al., "Improving
robustness with optimal transport based adversarial generalization"). Its dual is

    W_θ(C) = max_{f, g}  <f, a> + <g, b> − θ Σ_ij a_i b_j (exp((f_i + g_j − C_ij)/θ) − 1),

and Danskin's (envelope) theorem gives ∂W_θ/∂C = P*, the optimal plan. Every backend below returns the
plan, and :func:`entropic_ot` attaches it as the gradient: nothing is unrolled, so memory does not grow
with the iterations.

A mask (True = allowed) sets C = +∞ on forbidden pairs. In the log domain that is an exact −∞ in the
log-sum-exp (torch backend) or a large finite cost (POT, GeomLoss, which would turn ∞ into NaN); the
plan is exactly 0 there, and so is the gradient.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .._checks import GOTConvergenceWarning, check_choice, ot_dtype

BACKENDS = ("torch", "pot", "geomloss")


@dataclass
class SinkhornResult:
    """What a solve returns. ``value`` and ``plan`` are detached; ``iterations`` is -1 if unknown."""

    value: torch.Tensor
    plan: torch.Tensor
    iterations: int
    marginal_error: float
    converged: bool
    log_v: Optional[torch.Tensor] = None  # scaled column potential g/θ, for warm starts


# torch's vectorised CPU exp() takes a slow path, 10-40x slower per element, when the result is
# subnormal or zero (fp32 argument below about -87). After the max is subtracted, a log-sum-exp term
# that small cannot change a sum that is >= 1, and near-diagonal plans of adversarial pairs are made of
# such terms; flooring the argument first gives the same sums at full speed. GPUs have no such path.
_EXP_FLOOR = {torch.float32: -87.0, torch.float64: -708.0}
# CPU row blocks of about 1 MB of fp32 (this machine's L2): the log-sum-exp is five passes over its
# block, which then stay in cache, and no B×B temporary goes through the allocator (mmap, page faults).
_BLOCK_ELEMENTS = 2**18


def _floor(x: torch.Tensor) -> Optional[float]:
    return _EXP_FLOOR.get(x.dtype) if x.device.type == "cpu" else None


def _block_rows(n_rows: int, n_cols: int) -> int:
    """Rows per CPU block of an (n_rows, n_cols) matrix: about _BLOCK_ELEMENTS entries, at least one row."""
    return min(n_rows, max(1, _BLOCK_ELEMENTS // max(1, n_cols)))


class _RowLogSumExp:
    """``out_i = log Σ_j exp(scale · A_ij + w_j)`` for a fixed matrix A (+∞ entries allowed, but every
    row needs a finite one) and finite w.

    On CPU the rows go block by block through one reused buffer, with the exponent floored as above.
    Measured against the plain ``torch.logsumexp(scale · A + w, 1)``: the same sums and iterations,
    and 2-3x faster Sinkhorn solves at B = 256-1024 (``benchmarks/bench_solvers.py``). Elsewhere it is
    the plain expression.
    """

    def __init__(self, A: torch.Tensor):
        if not bool(torch.isfinite(A).any(dim=1).all()):
            raise ValueError("every row and column of the cost needs a finite (allowed) entry")
        self.A = A
        self.floor = _floor(A)
        if self.floor is not None:
            self.buf = torch.empty(_block_rows(*A.shape), A.shape[1], dtype=A.dtype, device=A.device)

    def __call__(self, w: torch.Tensor, scale: float) -> torch.Tensor:
        if self.floor is None:
            return torch.logsumexp(torch.add(w, self.A, alpha=scale), dim=1)
        R = self.buf.shape[0]
        if R == self.A.shape[0]:
            return self._block(self.A, w, scale)
        return torch.cat([self._block(self.A[r0 : r0 + R], w, scale) for r0 in range(0, self.A.shape[0], R)])

    def _block(self, block: torch.Tensor, w: torch.Tensor, scale: float) -> torch.Tensor:
        X = torch.add(w, block, alpha=scale, out=self.buf[: block.shape[0]])
        m = X.amax(dim=1, keepdim=True)  # finite: each row has a finite entry
        return X.sub_(m).clamp_min_(self.floor).exp_().sum(dim=1).log_().add_(m.squeeze(1))


def _exp(x: torch.Tensor) -> torch.Tensor:
    """``torch.exp(x)`` with subnormal results flushed to 0 (masked −∞ entries give exactly 0)."""
    floor = _floor(x)
    if floor is None:
        return torch.exp(x)
    return x.clamp_min(floor).exp_().masked_fill_(x < floor, 0.0)


class _Envelope(torch.autograd.Function):
    """value(C) with dvalue/dC = plan (Danskin); the solve itself ran outside autograd."""

    @staticmethod
    def forward(ctx, cost: torch.Tensor, value: torch.Tensor, plan: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(plan)
        ctx.cost_dtype = cost.dtype
        return value.to(cost.dtype).clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (plan,) = ctx.saved_tensors
        return (grad * plan).to(ctx.cost_dtype), None, None


def marginal_error(plan: torch.Tensor) -> float:
    """The larger of the two L1 distances between the plan's marginals and the uniform weights."""
    B, Bp = plan.shape
    return float(torch.maximum((plan.sum(1) - 1.0 / B).abs().sum(), (plan.sum(0) - 1.0 / Bp).abs().sum()))


# Over-relaxation (see sinkhorn_log_torch): plain sweeps first, an exact check every few sweeps, and
# a permanent fall-back to plain Sinkhorn if the error stops improving.
_RELAX_AFTER, _CHECK_EVERY, _PATIENCE = 10, 5, 50


@torch.no_grad()
def sinkhorn_log_torch(
    cost: torch.Tensor,
    theta: float,
    mask: Optional[torch.Tensor] = None,
    *,
    max_iter: int = 1000,
    tol: float = 1e-3,
    scaling: float = 0.8,
    relax: float = 1.8,
    init_log_v: Optional[torch.Tensor] = None,
) -> SinkhornResult:
    r"""Log-domain Sinkhorn with ε-scaling, then over-relaxed iterations at θ until the marginal error is ≤ tol.

    Potentials f, g (in cost units) are first annealed through ε = D, D·s, D·s², … > θ (D the cost
    spread, s = ``scaling``), one Sinkhorn sweep per ε: at large ε the plan is diffuse and Sinkhorn
    contracts fast, and each stage hands the next a good start. Then, with scaled potentials
    u = f/θ, v = g/θ, the Sinkhorn maps

        v_j ← −log Σ_i a_i exp(u_i − C_ij/θ),   u_i ← −log Σ_j b_j exp(v_j − C_ij/θ)

    are applied with over-relaxation, x ← x + ω (map(x) − x), ω = ``relax`` ∈ (0, 2) (Thibault et al.,
    "Overrelaxed Sinkhorn-Knopp algorithm for regularized optimal transport", 2021; Lehmann et al.,
    "A note on overrelaxation in the Sinkhorn algorithm", 2022): locally convergent, and much faster
    where plain Sinkhorn crawls. That is the case of GOT without label matching: clean and adversarial
    features form class blocks coupled only through costs ≫ θ, and moving mass between blocks took
    plain Sinkhorn a median of 712-737 sweeps on a trained MNIST network at B = 128-512 (2 of 5 batches
    at B = 128 were still above tol after 1000), against 163-168 with ω = 1.8
    (``benchmarks/bench_relaxation.py``). The first 10 sweeps at θ are plain (easy problems, like
    label-matched ones, end there), and if the error has not improved for 50 sweeps the solver falls
    back to plain Sinkhorn (globally convergent) for good; ``relax=1`` is plain Sinkhorn throughout.

    Every 5th sweep (and every sweep when ω = 1) the v-map is applied exactly, so the columns of the
    current plan sum to b, and its row error Σ_i |row_i − a_i|, which comes free from the next
    u-map's log-sum-exp, is the stopping test: a returned converged plan meets it exactly. The value
    is the dual objective θ(<u, a> + <v, b>): equal to (1) at convergence, a lower bound of it before.
    ``init_log_v`` (a previous v) skips the annealing.
    """
    if not 0.0 < relax < 2.0:
        raise ValueError(f"relax must be in (0, 2) (over-relaxation factor; 1 = plain Sinkhorn), got {relax}")
    B, Bp = cost.shape
    log_a, log_b = -math.log(B), -math.log(Bp)
    C = cost.to(ot_dtype(cost.dtype))
    if mask is not None:
        C = C.masked_fill(~mask, math.inf)
    rows, cols = _RowLogSumExp(C), _RowLogSumExp(C.T.contiguous())
    it = 0
    if init_log_v is None:
        finite = C[torch.isfinite(C)]
        eps = float(finite.max() - finite.min())
        g = torch.zeros(Bp, dtype=C.dtype, device=C.device)
        while eps > theta and it < max_iter:
            f = -eps * (rows(g / eps, -1.0 / eps) + log_b)  # f_i = −ε log Σ_j b_j exp((g_j − C_ij)/ε)
            g = -eps * (cols(f / eps, -1.0 / eps) + log_a)
            eps *= scaling
            it += 1
        v = g / theta
    else:
        v = init_log_v.to(C)
    s = -1.0 / theta
    u = -rows(v, s) - log_b
    err, exact = math.inf, True
    omega, best, stalled = 1.0, math.inf, 0
    for k in range(max_iter - it):
        if k == _RELAX_AFTER:
            omega = relax
        exact = omega == 1.0 or k % _CHECK_EVERY == 0
        v_map = -cols(u, s) - log_a
        v = v_map if exact else v + omega * (v_map - v)
        it += 1
        lse_row = rows(v, s)
        # Row sums of the current plan, a_i · exp(u_i + lse_row_i + log b), compared with a_i.
        err = float(torch.expm1(u + lse_row + log_b).abs().mean())
        if exact and err <= tol:
            break
        if err < best:
            best, stalled = err, 0
        else:
            stalled += 1
            if stalled > _PATIENCE:
                omega = relax = 1.0
        u = -lse_row - log_b if omega == 1.0 else u + omega * ((-lse_row - log_b) - u)
    if not exact:  # max_iter ran out on a relaxed sweep: make the columns exact again
        v = -cols(u, s) - log_a
        err = float(torch.expm1(u + rows(v, s) + log_b).abs().mean())
    value = theta * (u.mean() + v.mean())
    plan = _exp(torch.add(u[:, None], C, alpha=s).add_(v[None, :] + (log_a + log_b)))
    if not math.isfinite(err):  # max_iter ran out during the annealing: measure the plan instead
        err = marginal_error(plan)
    converged = err <= tol
    return SinkhornResult(value, plan, it, err, converged, v)


@torch.no_grad()
def _masked_finite(cost: torch.Tensor, mask: Optional[torch.Tensor], theta: float) -> torch.Tensor:
    """Replace forbidden entries by a finite cost whose plan entry underflows to exactly 0.

    exp(−(big − C_max)/θ) with big − C_max = 1000·θ is e^−1000: 0 in float64 and float32.
    """
    if mask is None:
        return cost
    big = cost[mask].max() + 1000.0 * theta
    return cost.masked_fill(~mask, float(big))


@torch.no_grad()
def sinkhorn_pot(
    cost: torch.Tensor, theta: float, mask: Optional[torch.Tensor] = None, *, max_iter: int = 1000, tol: float = 1e-3
) -> SinkhornResult:
    """POT's ``ot.solve`` with ``method="sinkhorn_log"`` (the plain method overflows in fp32 on costs ≳ 80)."""
    import ot

    C = _masked_finite(cost.to(ot_dtype(cost.dtype)), mask, theta)
    res = ot.solve(C, reg=theta, reg_type="KL", method="sinkhorn_log", max_iter=max_iter, tol=tol)
    plan = res.plan
    if mask is not None:
        plan = plan.masked_fill(~mask, 0.0)
    err = marginal_error(plan)
    return SinkhornResult(res.value.detach(), plan.detach(), -1, err, err <= tol)


@torch.no_grad()
def sinkhorn_geomloss(
    cost: torch.Tensor,
    theta: float,
    mask: Optional[torch.Tensor] = None,
    *,
    scaling: float = 0.9,
    tol: float = 1e-3,
) -> SinkhornResult:
    r"""GeomLoss' ``SamplesLoss("sinkhorn", p=1, blur=θ, debias=False)`` on a precomputed matrix.

    GeomLoss solves between point clouds with a cost callable. Points here are (index, side) pairs and
    the callable looks the matrix up; the side flag is needed because GeomLoss also calls the cost with
    the two clouds swapped (C_yx), and our costs (KL) are not symmetric. Its ε-scaling schedule runs a
    fixed number of iterations (from ``diameter`` down to θ by ``scaling``) with no tolerance test, so
    the marginal error is measured afterwards. Grad mode is restored after the call: GeomLoss switches
    it on globally, even under ``torch.no_grad()``.
    """
    from geomloss import SamplesLoss

    C = _masked_finite(cost.to(ot_dtype(cost.dtype)), mask, theta)
    B, Bp = C.shape

    def lookup(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ix, iy = x[..., 0].long(), y[..., 0].long()
        table = C if bool(x[..., 1].flatten()[0] == 0) else C.T
        return table[ix[..., :, None], iy[..., None, :]]

    x = torch.stack([torch.arange(B, dtype=C.dtype, device=C.device), torch.zeros(B, dtype=C.dtype, device=C.device)], 1)
    y = torch.stack([torch.arange(Bp, dtype=C.dtype, device=C.device), torch.ones(Bp, dtype=C.dtype, device=C.device)], 1)
    allowed = C if mask is None else cost.to(C.dtype)[mask]
    diameter = max(float(allowed.max() - allowed.min()), theta)
    loss = SamplesLoss(
        "sinkhorn", p=1, blur=theta, debias=False, potentials=True, cost=lookup,
        diameter=diameter, scaling=scaling, backend="tensorized",
    )
    grad_mode = torch.is_grad_enabled()
    try:
        F, G = loss(x, y)
    finally:
        torch.set_grad_enabled(grad_mode)
    F, G = F.detach().reshape(B), G.detach().reshape(Bp)
    value = F.mean() + G.mean()
    plan = _exp((F[:, None] + G[None, :] - C) / theta - math.log(B) - math.log(Bp))
    if mask is not None:
        plan = plan.masked_fill(~mask, 0.0)
    err = marginal_error(plan)
    n_iter = len(_eps_schedule(diameter, theta, scaling)) + 1
    return SinkhornResult(value, plan, n_iter, err, err <= tol)


def _eps_schedule(diameter: float, theta: float, scaling: float) -> list:
    # Mirrors geomloss.utils.epsilon_schedule for p = 1 (for the iteration count only).
    return [diameter] + [math.exp(e) for e in torch.arange(math.log(diameter), math.log(theta), math.log(scaling)).tolist()] + [theta]


def solve_sinkhorn(
    cost: torch.Tensor,
    theta: float,
    mask: Optional[torch.Tensor] = None,
    *,
    backend: str = "torch",
    max_iter: int = 1000,
    tol: float = 1e-3,
    init_log_v: Optional[torch.Tensor] = None,
    warn: bool = True,
) -> SinkhornResult:
    """Dispatch to a backend (no autograd); warn with the knob to turn if the tolerance was missed."""
    check_choice("backend", backend, BACKENDS)
    if backend == "torch":
        res = sinkhorn_log_torch(cost, theta, mask, max_iter=max_iter, tol=tol, init_log_v=init_log_v)
        knob = "raise max_iter, raise theta, or loosen tol"
    elif backend == "pot":
        res = sinkhorn_pot(cost, theta, mask, max_iter=max_iter, tol=tol)
        knob = "raise max_iter, raise theta, or loosen tol"
    else:
        res = sinkhorn_geomloss(cost, theta, mask, tol=tol)
        knob = "GeomLoss runs a fixed ε-scaling schedule: raise theta, or use backend='torch' with a tolerance"
    if warn and not res.converged:
        warnings.warn(
            f"Sinkhorn ({backend}) stopped with marginal error {res.marginal_error:.2e} > tol={tol:g} "
            f"after {res.iterations if res.iterations >= 0 else max_iter} iterations (theta={theta:g}, "
            f"cost range [{float(cost.min()):.3g}, {float(cost.max()):.3g}]): {knob}.",
            GOTConvergenceWarning,
            stacklevel=3,
        )
    return res


def entropic_ot(
    cost: torch.Tensor,
    theta: float,
    mask: Optional[torch.Tensor] = None,
    **kwargs,
) -> Tuple[torch.Tensor, SinkhornResult]:
    """Differentiable W_θ(C) of (1) with the envelope gradient, and the solve's details."""
    res = solve_sinkhorn(cost.detach(), theta, mask, **kwargs)
    return _Envelope.apply(cost, res.value, res.plan), res
