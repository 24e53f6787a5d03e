r"""Entropic optimal transport between two uniform empirical measures, with the envelope gradient.

For a cost matrix C (B × B'), uniform weights a = 1/B, b = 1/B' and temperature θ > 0 the value is

    W_θ(C) = min_{P ∈ Π(a, b)}  <P, C> + θ · KL(P ‖ a bᵀ)                               (1)

(the convention of POT's ``ot.solve(C, reg=θ).value`` and of eq. 5 of Bui et al., "Improving
robustness with optimal transport based adversarial generalization"). Its dual is

    W_θ(C) = max_{f, g}  <f, a> + <g, b> − θ Σ_ij a_i b_j (exp((f_i + g_j − C_ij)/θ) − 1),

and Danskin's (envelope) theorem gives ∂W_θ/∂C = P*, the optimal plan: nothing is unrolled, so memory
does not grow with the iterations.

A mask (True = allowed) sets C = +∞ on forbidden pairs: an exact −∞ in the log-sum-exp of our solver, a
large finite cost for POT and GeomLoss (which would turn ∞ into NaN). The plan is exactly 0 there.

Three backends, one per :class:`SinkhornBackend` subclass, all returning an :class:`OTResult` whose
``marginal_error`` is measured on the returned plan and which meets ``tol`` or warns:

* ``"torch"`` (:class:`TorchSinkhorn`): :func:`sinkhorn_log`, our log-domain solver. Its one loop runs on
  a :class:`~got_reg.solvers.lse.RowLSE` operator chosen for the device; on CUDA with Triton and
  B, B' ≤ 256 (``GOT_REG_FUSED_MAX``) the same loop runs inside one fused kernel (no launch or sync per sweep).
* ``"pot"`` (:class:`POTSinkhorn`): ``ot.solve(method="sinkhorn_log")`` with its stopping test mapped to ``tol``.
* ``"geomloss"`` (:class:`GeomLossSinkhorn`): GeomLoss' ε-scaling solver (no tolerance of its own),
  finished by exact sweeps of :func:`sinkhorn_log` started from its potentials until ``tol``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch

from .._checks import GOTConvergenceWarning, check_choice, ot_dtype
from .lse import RowLSE, exp_plan, row_lse, triton_failed, triton_module
from .result import OTResult, marginal_error

# Anderson acceleration of the Sinkhorn map (see _accelerated_sweeps): the number of past differences it
# extrapolates from, and the Tikhonov weight of its least squares relative to the trace of their Gram matrix,
# per dtype. The weight damps exactly the slow directions that the extrapolation is for, so it is small,
# but not below what the precision resolves: in float64, 1e-10 took erratic paths on a near-singular Gram
# matrix (a masked 32 × 32 problem of tests/solvers/test_triton.py missed 1e-5 after 5·10⁴ sweeps) and 1e-4
# stalled near an error of 1e-8; in float32, 1e-4 and 1e-6 gave the same sweep counts on GOT's costs.
ANDERSON = 8
ANDERSON_REG = {torch.float32: 1e-4, torch.float64: 1e-7}
# Sweeps without a new best error after which the acceleration is switched off for good: plain Sinkhorn
# converges from anywhere, restarted Anderson can circle (seen in float32 near its rounding floor).
PATIENCE = 50
# Sweeps per stopping test of the torch loop (on CUDA a host read; on CPU a few small operators, which cost
# more than the sweeps they can save). The fused kernel tests every sweep: it costs nothing there.
CHECK_EVERY = 5


def _masked(cost: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    C = cost.to(ot_dtype(cost.dtype))
    return C if mask is None else torch.where(mask, C, math.inf)


def _anneal(
    rows: RowLSE, cols: RowLSE, C: torch.Tensor, theta: float, scaling: float, max_iter: int
) -> tuple[torch.Tensor, int]:
    """ε-scaling: one Sinkhorn sweep at each ε = D, D·s, D·s², … > θ (D the finite cost spread).

    At large ε the plan is diffuse and Sinkhorn contracts fast; each stage hands the next a good start.
    Returns the column potential g (cost units) and the sweeps done. One host read (D) per solve.
    """
    B, Bp = C.shape
    log_a, log_b = -math.log(B), -math.log(Bp)
    forbidden = ~torch.isfinite(C)
    eps = float(C.masked_fill(forbidden, -math.inf).max() - C.masked_fill(forbidden, math.inf).min())
    g = C.new_zeros(Bp)
    it = 0
    while eps > theta and it < max_iter:
        f = -eps * (rows(g / eps, -1.0 / eps) + log_b)  # f_i = −ε log Σ_j b_j exp((g_j − C_ij)/ε)
        g = -eps * (cols(f / eps, -1.0 / eps) + log_a)
        eps *= scaling
        it += 1
    return g, it


class _Anderson:
    r"""Type-II Anderson acceleration of a fixed-point map T, on the device (no host read).

    Given the iterate x_k and its residual r_k = T(x_k) − x_k, with ΔX, ΔF (memory × n) holding the last
    differences x_j − x_{j−1}, r_j − r_{j−1}, the next iterate is

        x_{k+1} = x_k + r_k − (ΔX + ΔF)ᵀ γ,   γ = argmin_γ ‖r_k − ΔFᵀγ‖² + λ‖γ‖²,  λ = ``reg`` · tr(ΔF ΔFᵀ)

    (Walker & Ni, "Anderson acceleration for fixed-point iterations", SIAM J. Numer. Anal. 2011), i.e. the
    extrapolation from past iterates that the residuals say cancels best, then shifted to mean 0 (see
    :func:`_accelerated_sweeps`). Safeguard: when ‖r_k‖ grows, the history is dropped and the step is the
    plain x + r (restarted Anderson); a non-finite γ counts as 0. Slots fill round-robin, so the slot of
    step k is known on the host; which slots are valid is a device vector of 0/1 weights. On CUDA in
    float32 :class:`got_reg.solvers._triton.Anderson` takes the same step in one launch (:func:`_anderson`).
    """

    def __init__(self, x: torch.Tensor, memory: int, reg: float) -> None:
        self.dXF = x.new_zeros(memory, x.numel())  # ΔX + ΔF, what the step combines
        self.dF = x.new_zeros(memory, x.numel())
        self.w = x.new_zeros(memory)  # 1 on valid slots, 0 on empty ones
        self.reg, self.tiny = reg, torch.finfo(x.dtype).tiny
        self.k = 0
        self.xr_prev = self.r_prev = x
        self.rn_prev = x.new_full((), math.inf)

    def step(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        rn = torch.dot(r, r)
        xr = x + r  # the plain step T(x)
        if self.k > 0:
            slot = (self.k - 1) % len(self.w)
            torch.sub(xr, self.xr_prev, out=self.dXF[slot])
            torch.sub(r, self.r_prev, out=self.dF[slot])
            # fill_ launches a kernel; `self.w[slot] = 1.0` copies a host scalar, which on CUDA waits for the
            # device: one synchronisation per sweep.
            self.w[slot].fill_(1.0)
        self.w.mul_(rn <= self.rn_prev)  # restart when the residual grew
        self.xr_prev, self.r_prev, self.rn_prev = xr, r, rn
        self.k += 1
        F = self.dF * self.w[:, None]
        G = F @ F.T
        # Empty slots get a unit diagonal (so γ = 0 there), valid ones the Tikhonov weight, added on its own:
        # inside 1 + λ it would round away whenever λ < eps.
        lam = torch.trace(G) * self.reg + self.tiny
        G.diagonal().add_(1.0 - self.w).add_(lam)
        # G is symmetric positive definite: Cholesky and two triangular solves, none of which reads its status
        # on the host (cholesky_ex does not check; a failure in rounding gives a non-finite γ, taken as 0).
        L = torch.linalg.cholesky_ex(G).L
        y = torch.linalg.solve_triangular(L, (F @ r)[:, None], upper=False)
        gamma = torch.linalg.solve_triangular(L.mT, y, upper=True)[:, 0].nan_to_num_(0.0, 0.0, 0.0)
        out = torch.addmv(xr, self.dXF.T, gamma, alpha=-1.0)
        return out.sub_(out.mean())


class _HostAnderson:
    r"""CPU: :class:`_Anderson`'s step in numpy, on views of the iterates (no copies).

    On a GPU a read of the device is a synchronisation, so :class:`_Anderson` keeps the whole step on the
    device at some twenty operators per sweep. On CPU those operators, on vectors of B entries and an m × m
    system, cost more in dispatch than in arithmetic: more than the sweep's two log-sum-exps at B = 128
    (``benchmarks/bench_cpu_paths.py``). numpy dispatches several times faster, and the small system can
    be read: one product Z Zᵀ of Z = [ΔF; r] gives the Gram matrix ΔF ΔFᵀ, ΔF·r and ‖r‖² in the iterate's
    dtype, and the restart, slot weights, ridge and solve run in float64.
    """

    def __init__(self, x: torch.Tensor, memory: int, reg: float) -> None:
        dtype = x.numpy().dtype
        self.dXF = np.zeros((memory, x.numel()), dtype)  # ΔX + ΔF, what the step combines
        self.Z = np.zeros((memory + 1, x.numel()), dtype)  # rows: the ΔF ring, then the last residual
        self.w = np.zeros(memory)  # 1 on valid slots, 0 on empty ones
        self.reg, self.tiny = reg, float(torch.finfo(x.dtype).tiny)
        self.k = 0
        self.xr_prev = np.zeros(x.numel(), dtype)
        self.rn_prev = math.inf

    def step(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        xn, rv = x.numpy(), r.numpy()
        m, Z = len(self.w), self.Z
        xr = xn + rv  # the plain step T(x)
        if self.k > 0:
            slot = (self.k - 1) % m
            np.subtract(xr, self.xr_prev, out=self.dXF[slot])
            np.subtract(rv, Z[m], out=Z[slot])
            self.w[slot] = 1.0
        Z[m] = rv
        M = (Z @ Z.T).astype(np.float64)
        rn = M[m, m]
        if not rn <= self.rn_prev:  # the residual grew (or is not finite): restart
            self.w[:] = 0.0
        self.xr_prev, self.rn_prev = xr, rn
        self.k += 1
        out = xr
        valid = np.flatnonzero(self.w)
        if valid.size:
            # Empty slots have γ = 0 (in _Anderson through a unit diagonal): solve over the valid ones only.
            G = M[valid[:, None], valid]
            G.flat[:: valid.size + 1] += G.trace() * self.reg + self.tiny
            try:
                gamma = np.linalg.solve(G, M[valid, m])
            except np.linalg.LinAlgError:
                gamma = np.zeros(valid.size)
            if np.isfinite(gamma).all():  # else γ = 0, as in _Anderson
                out = xr - gamma.astype(xr.dtype) @ self.dXF[valid]
        # numpy's mean() is slow on small arrays (a Python-level wrapper); sum() is its reduction alone.
        return torch.from_numpy(out - out.sum() / out.size)


class _TritonAnderson:
    """:class:`got_reg.solvers._triton.Anderson`; if its kernel raises, the step is reported once and the
    solve goes on with a fresh :class:`_Anderson` (a restart, as when the residual grows)."""

    def __init__(self, tri: Any, x: torch.Tensor, memory: int, reg: float) -> None:
        self.memory, self.reg = memory, reg
        try:
            self.impl: Any = tri.Anderson(x, memory, reg)
        except Exception as exc:  # noqa: BLE001 - as below
            triton_failed(exc)
            self.impl = _Anderson(x, memory, reg)

    def step(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        if not isinstance(self.impl, _Anderson):
            try:
                return self.impl.step(x, r)
            except Exception as exc:  # noqa: BLE001 - any kernel failure falls back to torch
                triton_failed(exc)
                self.impl = _Anderson(x, self.memory, self.reg)
        return self.impl.step(x, r)


def _anderson(x: torch.Tensor, memory: int) -> _Anderson | _HostAnderson | _TritonAnderson:
    """The Anderson state for iterates like x: the small system on the host on CPU, one Triton launch per
    step on CUDA float32, else torch on the device."""
    reg = ANDERSON_REG[x.dtype]
    if x.device.type == "cpu":
        return _HostAnderson(x, memory, reg)
    tri = triton_module() if x.is_cuda else None
    if tri is not None and tri.anderson_supported(x):
        return _TritonAnderson(tri, x, memory, reg)
    return _Anderson(x, memory, reg)


def _accelerated_sweeps(
    rows: RowLSE,
    cols: RowLSE,
    v: torch.Tensor,
    theta: float,
    it: int,
    max_iter: int,
    tol: float,
    anderson: int,
    check_every: int,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    r"""Sinkhorn at θ on the scaled potentials u = f/θ, v = g/θ, Anderson-accelerated, until the row error is ≤ tol.

    One sweep is the column map v_j = −log Σ_i a_i exp(u_i − C_ij/θ), after which the plan's columns sum
    to b, then the row map T(u)_i = −log Σ_j b_j exp(v_j − C_ij/θ). Plain Sinkhorn is u ← T(u); here u
    moves by :class:`_Anderson` with ``anderson`` past differences (0: plain). GOT without label matching
    is where this matters: its clean and adversarial class blocks are coupled only through costs ≫ θ, the
    slow modes of plain Sinkhorn are the mass balances between blocks, and a few past residuals span
    them (``benchmarks/bench_acceleration.py``).

    u is shifted to mean 0 after every update. T commutes with constants (T(u + c) = T(u) + c, and v − c
    gives the same plan), so the residuals, plans and errors are those of the unshifted iteration; but
    the extrapolation, to which constant shifts are invisible, would otherwise let |u| drift to
    thousands, where float32 cannot resolve an error of 1e-4.

    Every ``check_every``-th sweep the row error ‖P·1 − a‖₁ = mean_i |expm1(u_i + lse_i + log b)|, which
    comes free from the row map's log-sum-exp, is read on the host: the only synchronisation. (Its
    argument is minus the residual T(u) − u, so one tensor serves both.) If it has not reached a new
    best for PATIENCE sweeps, the acceleration is off for good (plain Sinkhorn converges from anywhere).
    Returns u, v (columns exact) and the sweep count.
    """
    B, Bp = rows.A.shape
    log_a, log_b = -math.log(B), -math.log(Bp)
    s = -1.0 / theta
    u = -rows(v, s) - log_b
    u = u - u.mean()
    accel = _anderson(u, anderson) if anderson > 0 else None
    best, it_best = math.inf, it
    for k in range(max_iter - it):
        v = -cols(u, s) - log_a
        it += 1
        t = rows(v, s).add_(u).add_(log_b)  # u_i + lse_i + log b = −(T(u) − u)_i
        if k % check_every == 0:
            err = float(torch.expm1(t).abs_().mean())
            if err <= tol:
                return u, v, it
            if err < best:
                best, it_best = err, it
            elif it - it_best >= PATIENCE:
                accel = None
        if accel is None:
            u = u - t
            u = u - u.mean()
        else:
            u = accel.step(u, t.neg_())  # shifted to mean 0 too
    # max_iter ran out after a row update: make the columns exact again.
    v = -cols(u, s) - log_a
    return u, v, it


def _result(
    C: torch.Tensor, u: torch.Tensor, v: torch.Tensor, theta: float, it: torch.Tensor | int, tol: float
) -> OTResult:
    """The plan P_ij = a_i b_j exp(u_i + v_j − C_ij/θ), the dual value θ(<u, a> + <v, b>) and the error on P.

    C may be a (k, B, B') stack with u (k, B), v (k, B') and it (k,): every field then has the leading k.
    """
    B, Bp = C.shape[-2:]
    plan = exp_plan(
        torch.add(u[..., :, None], C, alpha=-1.0 / theta).add_(v[..., None, :] - (math.log(B) + math.log(Bp)))
    )
    err = marginal_error(plan)
    # A fill kernel, not a host-to-device copy (which would synchronise).
    iterations = it if isinstance(it, torch.Tensor) else C.new_full((), it, dtype=torch.int64)
    return OTResult(
        value=theta * (u.mean(-1) + v.mean(-1)),
        plan=plan,
        iterations=iterations.to(torch.int64),
        marginal_error=err,
        converged=err <= tol,
        potentials=(theta * u, theta * v),
    )


@torch.no_grad()
def sinkhorn_log(
    cost: torch.Tensor,
    theta: float,
    mask: torch.Tensor | None = None,
    *,
    max_iter: int = 1000,
    tol: float = 1e-3,
    scaling: float = 0.7,
    anderson: int = ANDERSON,
    init_g: torch.Tensor | None = None,
) -> OTResult:
    r"""Log-domain Sinkhorn for (1): ε-scaling (:func:`_anneal`), then Anderson-accelerated sweeps at θ
    (:func:`_accelerated_sweeps`) until the L1 marginal error is ≤ ``tol``, then the plan (:func:`_result`).

    ``init_g`` (a column potential in cost units, e.g. from another solver) replaces the annealing.
    ``anderson`` is the number of past differences the acceleration uses; 0 is plain Sinkhorn. On CUDA,
    float32, B, B' ≤ 256 (``GOT_REG_FUSED_MAX``) and with Triton installed, the same stages run in one fused
    kernel launch (:func:`got_reg.solvers._triton.sinkhorn_fused`), which tests the error every sweep instead
    of every ``CHECK_EVERY``-th.
    """
    if not (isinstance(anderson, int) and 0 <= anderson <= 16):
        raise ValueError(f"anderson must be an int in [0, 16] (past differences; 0 = plain Sinkhorn), got {anderson!r}")
    if not 0.0 < scaling < 1.0:
        raise ValueError(f"scaling must be in (0, 1) (ε-scaling factor), got {scaling}")
    C = _masked(cost, mask)
    tri = triton_module() if init_g is None and C.is_cuda else None
    if tri is not None and tri.fused_supported(C):
        try:
            return _fused_result(tri, C, theta, max_iter, tol, scaling=scaling, anderson=anderson)
        except Exception as exc:  # noqa: BLE001 - any kernel failure falls back to the torch loop
            triton_failed(exc)
    rows, cols = row_lse(C), row_lse(C.T.contiguous())
    if init_g is None:
        g, it = _anneal(rows, cols, C, theta, scaling, max_iter)
    else:
        g, it = init_g.to(C), 0
    u, v, it = _accelerated_sweeps(rows, cols, g / theta, theta, it, max_iter, tol, anderson, CHECK_EVERY)
    return _result(C, u, v, theta, it, tol)


@torch.no_grad()
def _masked_finite(cost: torch.Tensor, mask: torch.Tensor | None, theta: float) -> torch.Tensor:
    """Forbidden entries replaced by a finite cost whose plan entry underflows to exactly 0.

    exp(−(big − C_max)/θ) with big − C_max = 1000·θ is e^−1000: 0 in float64 and float32.
    """
    C = cost.to(ot_dtype(cost.dtype))
    if mask is None:
        return C
    big = C.masked_fill(~mask, -math.inf).max() + 1000.0 * theta
    return torch.where(mask, C, big)


class SinkhornBackend:
    """Base class: ``solve(cost, theta, mask, max_iter=, tol=) -> OTResult`` with no autograd, and
    ``solve_many`` for a (k, B, B') stack of problems sharing one mask (one ``solve`` each unless a
    backend can do better)."""

    name = "base"
    #: the knob to turn when ``tol`` is missed, named in the warning
    advice = "raise max_iter, raise theta, or loosen tol"

    def solve(
        self, cost: torch.Tensor, theta: float, mask: torch.Tensor | None, *, max_iter: int, tol: float
    ) -> OTResult:
        raise NotImplementedError

    def solve_many(
        self, costs: torch.Tensor, theta: float, mask: torch.Tensor | None, *, max_iter: int, tol: float
    ) -> list[OTResult]:
        """The k problems of ``costs`` (k, B, B'), each with the (B, B') ``mask``: k independent results."""
        return [self.solve(c, theta, mask, max_iter=max_iter, tol=tol) for c in costs]


class TorchSinkhorn(SinkhornBackend):
    name = "torch"

    def solve(
        self, cost: torch.Tensor, theta: float, mask: torch.Tensor | None, *, max_iter: int, tol: float
    ) -> OTResult:
        return sinkhorn_log(cost, theta, mask, max_iter=max_iter, tol=tol)

    @torch.no_grad()
    def solve_many(
        self, costs: torch.Tensor, theta: float, mask: torch.Tensor | None, *, max_iter: int, tol: float
    ) -> list[OTResult]:
        """On CUDA with Triton and B, B' ≤ 256, all k solves in one fused launch (one program each, each
        exactly the single solve); elsewhere :func:`sinkhorn_log` once per problem."""
        tri = triton_module() if costs.is_cuda else None
        C = _masked(costs, mask) if tri is not None else costs
        if tri is not None and tri.fused_supported(C):
            try:
                return _fused_many(tri, C, theta, max_iter, tol)
            except Exception as exc:  # noqa: BLE001 - any kernel failure falls back to the torch loop
                triton_failed(exc)
        return super().solve_many(costs, theta, mask, max_iter=max_iter, tol=tol)


def _fused_result(tri: Any, C: torch.Tensor, theta: float, max_iter: int, tol: float, **kw: Any) -> OTResult:
    """The solve of a masked (B, B') cost, or of each problem of a (k, B, B') stack, in one launch of the
    fused kernel, which also writes the plans, values and marginal errors (:func:`_result`'s fields)."""
    u, v, it, _, plan, value, err = tri.sinkhorn_fused(C, theta, max_iter=max_iter, tol=tol, with_plan=True, **kw)
    return OTResult(
        value=value,
        plan=plan,
        iterations=it.to(torch.int64),
        marginal_error=err,
        converged=err <= tol,
        potentials=(theta * u, theta * v),
    )


def _fused_many(tri: Any, C: torch.Tensor, theta: float, max_iter: int, tol: float) -> list[OTResult]:
    """The k solves of a masked (k, B, B') stack in one launch of the fused kernel, as k results."""
    return _fused_result(tri, C, theta, max_iter, tol).unbind()


class POTSinkhorn(SinkhornBackend):
    """POT's ``ot.solve(method="sinkhorn_log")``; the plain method overflows in fp32 on costs ≳ 80.

    POT stops when the L2 norm of the column error, ‖Pᵀ·1 − b‖₂, is below its threshold, with the rows
    exact after its last update. ‖·‖₁ ≤ √B'·‖·‖₂, so the threshold tol/√B' guarantees our L1 test.
    """

    name = "pot"

    @torch.no_grad()
    def solve(
        self, cost: torch.Tensor, theta: float, mask: torch.Tensor | None, *, max_iter: int, tol: float
    ) -> OTResult:
        import ot

        C = _masked_finite(cost, mask, theta)
        res = ot.solve(
            C,
            reg=theta,
            reg_type="KL",
            method="sinkhorn_log",
            max_iter=max_iter,
            tol=tol / math.sqrt(C.shape[1]),
            grad="detach",
        )
        plan = res.plan.detach()
        if mask is not None:
            plan = plan.masked_fill(~mask, 0.0)
        err = marginal_error(plan)
        f, g = res.potentials
        # POT reports no iteration count: -1.
        return OTResult(
            res.value.detach(), plan, C.new_full((), -1, dtype=torch.int64), err, err <= tol, (f.detach(), g.detach())
        )


class GeomLossSinkhorn(SinkhornBackend):
    r"""GeomLoss' ``SamplesLoss("sinkhorn", p=1, blur=θ, debias=False)`` on a precomputed matrix, then
    exact sweeps of :func:`sinkhorn_log` from its column potential until ``tol``.

    GeomLoss solves between point clouds with a cost callable. Points here are (index, side) pairs and
    the callable looks the matrix up; the side flag is needed because GeomLoss also calls the cost with
    the two clouds swapped (C_yx), and our costs (KL) are not symmetric. Its ε-scaling schedule (from
    ``diameter`` down to θ by ``scaling``) has no tolerance test, so it is finished by our own sweeps
    (usually a handful). Grad mode is restored after the call: GeomLoss switches it on globally, even
    under ``torch.no_grad()``.
    """

    name = "geomloss"

    def __init__(self, scaling: float = 0.9) -> None:
        self.scaling = scaling

    @torch.no_grad()
    def solve(
        self, cost: torch.Tensor, theta: float, mask: torch.Tensor | None, *, max_iter: int, tol: float
    ) -> OTResult:
        from geomloss import SamplesLoss

        C = _masked_finite(cost, mask, theta)
        B, Bp = C.shape

        def lookup(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            ix, iy = x[..., 0].long(), y[..., 0].long()
            table = C if bool(x[..., 1].flatten()[0] == 0) else C.T
            return table[ix[..., :, None], iy[..., None, :]]

        def idx(n: int, side: int) -> torch.Tensor:
            # GeomLoss sees points (index, side) and looks their cost up in C: it never sees features.
            return torch.stack(
                [
                    torch.arange(n, dtype=C.dtype, device=C.device),
                    torch.full((n,), float(side), dtype=C.dtype, device=C.device),
                ],
                1,
            )

        allowed = C if mask is None else C[mask]
        diameter = max(float(allowed.max() - allowed.min()), theta)
        loss = SamplesLoss(
            "sinkhorn",
            p=1,
            blur=theta,
            debias=False,
            potentials=True,
            cost=lookup,
            diameter=diameter,
            scaling=self.scaling,
            backend="tensorized",
        )
        grad_mode = torch.is_grad_enabled()
        try:
            _, G = loss(idx(B, 0), idx(Bp, 1))
        finally:
            torch.set_grad_enabled(grad_mode)
        res = sinkhorn_log(cost, theta, mask, max_iter=max_iter, tol=tol, init_g=G.detach().reshape(Bp))
        n_geomloss = len(_eps_schedule(diameter, theta, self.scaling)) + 1
        return OTResult(
            res.value, res.plan, res.iterations + n_geomloss, res.marginal_error, res.converged, res.potentials
        )


def _eps_schedule(diameter: float, theta: float, scaling: float) -> list:
    # Mirrors geomloss.utils.epsilon_schedule for p = 1 (for the iteration count only).
    steps = torch.arange(math.log(diameter), math.log(theta), math.log(scaling)).tolist()
    return [diameter] + [math.exp(e) for e in steps] + [theta]


_BACKENDS: dict[str, type[SinkhornBackend]] = {"torch": TorchSinkhorn, "pot": POTSinkhorn, "geomloss": GeomLossSinkhorn}
BACKENDS = tuple(_BACKENDS)


def get_backend(backend: str | SinkhornBackend) -> SinkhornBackend:
    """A name in :data:`BACKENDS` or a :class:`SinkhornBackend` instance."""
    if isinstance(backend, SinkhornBackend):
        return backend
    return _BACKENDS[check_choice("backend", backend, _BACKENDS)]()


def warn_unconverged(
    result: OTResult, backend: SinkhornBackend, theta: float, tol: float, max_iter: int, stacklevel: int = 3
) -> None:
    """The convergence warning, naming the knob to turn (reads the result on the host)."""
    it = int(result.iterations)
    warnings.warn(
        f"Sinkhorn ({backend.name}) stopped with marginal error {float(result.marginal_error):.2e} > tol={tol:g} "
        f"after {it if it >= 0 else max_iter} iterations (theta={theta:g}): {backend.advice}.",
        GOTConvergenceWarning,
        stacklevel=stacklevel,
    )


def solve_sinkhorn(
    cost: torch.Tensor,
    theta: float,
    mask: torch.Tensor | None = None,
    *,
    backend: str | SinkhornBackend = "torch",
    max_iter: int = 1000,
    tol: float = 1e-3,
    warn: bool = True,
) -> OTResult:
    """Solve (1) with ``backend`` (no autograd); warn with the knob to turn if ``tol`` was missed."""
    b = get_backend(backend)
    res = b.solve(cost.detach(), theta, mask, max_iter=max_iter, tol=tol)
    if warn and not bool(res.converged):
        warn_unconverged(res, b, theta, tol, max_iter)
    return res
