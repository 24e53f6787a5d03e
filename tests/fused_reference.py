"""The fused Sinkhorn kernel's solve as an eager torch loop, and the problems it is checked on.

Shared by ``tests/solvers/test_triton.py`` (CPU, Triton's interpreter) and ``benchmarks/triton_selfcheck.py``
(the same checks on a GPU), so that both hold the kernel to one reference. Nothing here calls got_reg.
"""

from __future__ import annotations

import math

import torch

# The Tikhonov weight of the Anderson least squares per dtype (got_reg.solvers.sinkhorn.ANDERSON_REG).
REG = {torch.float32: 1e-4, torch.float64: 1e-7}


class AndersonReference:
    """Type-II Anderson acceleration (Walker & Ni 2011) written from its definition, not from the solver:
    the history is a list of the last ``memory`` differences (x_j − x_{j−1}, r_j − r_{j−1}), dropped when
    ‖r‖ grows (``restarted`` then says so), and γ solves the normal equations of min ‖r − ΔFᵀγ‖² + λ‖γ‖²,
    λ = reg·tr(ΔF ΔFᵀ) + tiny, densely (0 if not finite). ``step`` returns x + r − (ΔX + ΔF)ᵀγ (x + r
    without a history), shifted to mean 0, in the dtype of x."""

    def __init__(self, memory, reg, tiny):
        self.memory, self.reg, self.tiny = memory, reg, tiny
        self.history, self.x_prev, self.r_prev, self.rn_prev = [], None, None, math.inf
        self.restarted = False

    def step(self, x, r):
        rn = float(r @ r)
        if self.x_prev is not None:
            self.history = (self.history + [(x - self.x_prev, r - self.r_prev)])[-self.memory :]
        self.restarted = not rn <= self.rn_prev
        if self.restarted:
            self.history = []
        self.x_prev, self.r_prev, self.rn_prev = x, r, rn
        out = x + r
        if self.history:
            dX = torch.stack([d for d, _ in self.history])
            dF = torch.stack([d for _, d in self.history])
            G = dF @ dF.T
            G = G + (self.reg * float(G.trace()) + self.tiny) * torch.eye(len(self.history), dtype=x.dtype)
            gamma = torch.linalg.solve(G, dF @ r)
            if not torch.isfinite(gamma).all():
                gamma = torch.zeros_like(gamma)
            out = out - (dX + dF).T @ gamma
        return out - out.mean()


def reference_solve(
    C,
    theta,
    *,
    max_iter,
    tol,
    scaling=0.7,
    anderson=8,
    reg=None,
    patience=50,
    dtype=torch.float64,
    stop_at=None,
    trace=None,
):
    """The solve of ``got_reg.solvers._triton.sinkhorn_fused`` as an eager torch loop, in any dtype: ε-scaling,
    then Sinkhorn sweeps with the stopping test every sweep and the row update, kept at mean(u) = 0,
    Anderson-accelerated (Walker & Ni 2011, type II) from the last ``anderson`` differences since the
    residual last grew, switched off for good after ``patience`` sweeps without a new best error.

    Written from the algorithm, not from the kernel: the history is a list, the least squares a dense
    solve of its normal equations. ``stop_at``: also stop at the sweep that brings the count to this many
    (to follow a run that stopped there). ``trace``: a list that collects the sweep counts where the
    history was dropped because the residual grew. ``reg``: the Tikhonov weight, by default the solver's
    for ``dtype`` (1e-4 in float32, 1e-7 in float64).
    """
    C = C.to(dtype)
    if reg is None:
        reg = REG[dtype]
    n, m = C.shape
    log_a, log_b, s = -math.log(n), -math.log(m), -1.0 / theta

    def rows(w, sc):  # LSE_j(w_j + sc C_ij); +inf costs give -inf (sc < 0)
        return torch.logsumexp(w[None, :] + sc * C, 1)

    def cols(w, sc):
        return torch.logsumexp(w[:, None] + sc * C, 0)

    finite = C[torch.isfinite(C)]
    eps = float(finite.max() - finite.min())
    g = torch.zeros(m, dtype=dtype, device=C.device)
    it = 0
    while eps > theta and it < max_iter:
        f = -eps * (rows(g / eps, -1.0 / eps) + log_b)
        g = -eps * (cols(f / eps, -1.0 / eps) + log_a)
        eps *= scaling
        it += 1
    v = g / theta
    u = -rows(v, s) - log_b
    u = u - u.mean()  # the gauge: mean(u) = 0 throughout
    acc = AndersonReference(anderson, reg, torch.finfo(dtype).tiny) if anderson else None
    converged, err, best, it_best = False, math.inf, math.inf, it
    for _ in range(max_iter - it):
        v = -cols(u, s) - log_a
        it += 1
        lse_row = rows(v, s)
        err = float(torch.expm1(u + lse_row + log_b).abs().mean())
        if err <= tol or it == stop_at:
            converged = True
            break
        if err < best:
            best, it_best = err, it
        elif it - it_best >= patience:
            acc = None  # stalled: plain Sinkhorn for good
        r = -lse_row - log_b - u
        if acc is None:
            u = u + r
            u = u - u.mean()
            continue
        u = acc.step(u, r)
        if acc.restarted and trace is not None:
            trace.append(it)
    if not converged:  # u moved after the last column update: exact columns, err of the returned (u, v)
        v = -cols(u, s) - log_a
        err = float(torch.expm1(u + rows(v, s) + log_b).abs().mean())
    return u, v, it, err


# Residual norms of anderson_steps: decreasing, except at step 5, where the history must be dropped.
ANDERSON_NORMS = (4.0, 3.0, 2.5, 2.0, 1.5, 3.5, 1.0, 0.8, 0.5, 0.4, 0.3, 0.2)


def anderson_steps(n, memory, reg, seed, dtype=torch.float64, norms=ANDERSON_NORMS):
    """(x, r, want) for successive steps of :class:`AndersonReference`: x and r drawn in ``dtype`` with
    residual norms ``norms``, want computed in float64 from them (tiny: that of ``dtype``)."""
    g = torch.Generator().manual_seed(seed)
    ref = AndersonReference(memory, reg, torch.finfo(dtype).tiny)
    out = []
    for norm in norms:
        x = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
        r = torch.randn(n, generator=g, dtype=torch.float64)
        r = (r * norm / r.norm()).to(dtype)
        out.append((x, r, ref.step(x.double(), r.double())))
    return out


def annealing_sweeps(C, theta, scaling=0.7):
    finite = C[torch.isfinite(C)]
    eps, k = float(finite.max() - finite.min()), 0
    while eps > theta:
        eps, k = eps * scaling, k + 1
    return k


def got_cost(n, m, seed, masked=False, adversarial=False, device="cpu"):
    """A GOT-like float64 cost, cosine feature distance + KL between class posteriors; masked: +inf
    between different labels, with uneven classes in the same proportions on both sides (so that the
    uniform marginals are feasible)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.normalize(torch.randn(n, 16, generator=g, dtype=torch.float64), dim=1)
    logits = 2 * torch.randn(n, 5, generator=g, dtype=torch.float64)
    if adversarial:  # the second side is a perturbed copy: near-diagonal plans, slow plain Sinkhorn
        assert n == m
        za = torch.nn.functional.normalize(z + 0.2 * torch.randn(n, 16, generator=g, dtype=torch.float64), dim=1)
        logits_a = logits + 0.3 * torch.randn(n, 5, generator=g, dtype=torch.float64)
    else:
        za = torch.nn.functional.normalize(torch.randn(m, 16, generator=g, dtype=torch.float64), dim=1)
        logits_a = 2 * torch.randn(m, 5, generator=g, dtype=torch.float64)
    lp, lq = torch.log_softmax(logits, 1), torch.log_softmax(logits_a, 1)
    C = (1 - z @ za.T) + ((lp.exp() * lp).sum(1, keepdim=True) - lp.exp() @ lq.T)
    if masked:
        C = C.masked_fill(~label_mask(n, m), math.inf)
    return C.to(device)


def block_cost(n, seed, device="cpu"):
    """Three well-separated classes; an eighth of the second side sits in the next class, so mass has to
    move between blocks: plain Sinkhorn is slow there, Anderson acceleration much faster."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    ya = y.clone()
    ya[: n // 8] = (ya[: n // 8] + 1) % 3
    centres = 3.0 * torch.randn(3, 8, generator=g, dtype=torch.float64)
    z = centres[y] + 0.3 * torch.randn(n, 8, generator=g, dtype=torch.float64)
    za = centres[ya] + 0.3 * torch.randn(n, 8, generator=g, dtype=torch.float64)
    return (torch.cdist(z, za) ** 2 / 8).to(device)


def label_mask(n, m):
    """Classes of shares 1/2, 1/4, 1/4 on both sides (block diagonal, uneven); n == m may be anything."""

    def labels(k):
        return torch.tensor([0 if i < k // 2 else (1 if i < 3 * k // 4 else 2) for i in range(k)])

    if n == m:
        y = labels(n)
        return y[:, None] == y[None, :]
    assert n % 4 == 0 and m % 4 == 0, "shares must match exactly"
    return labels(n)[:, None] == labels(m)[None, :]


def plan(u, v, C, theta):
    """P_ij = a_i b_j exp(u_i − C_ij/θ + v_j) in float64 from scaled potentials (any dtype)."""
    n, m = C.shape
    return torch.exp(u.double()[:, None] - C / theta + v.double()[None, :] - math.log(n) - math.log(m))


def exact_solution(C64, theta):
    """(value, f) of the entropic problem (f its optimal potential in cost units), solved far below the
    tolerances judged here (1e-3 to 1e-5): the loop in float64 to 1e-8, where the gap bound of its value is
    negligible. The residual certifies it whatever the algorithm (a plan with exact columns and that row
    error is the optimum); the accelerated one is used because plain Sinkhorn can take 10⁵ sweeps."""
    u, v, _, err = reference_solve(C64, theta, max_iter=20_000, tol=1e-8)
    assert err <= 1e-8, f"the exact reference did not converge (err {err:.1e})"
    return theta * float(u.mean() + v.mean()), theta * u


def value_gap_bound(err, f, f_star):
    """How far the dual value θ(mean u + mean v) of potentials with exact columns and row error ``err`` (L1) can be
    from the optimum: their plan is optimal for its own row marginal a', so value = W(a', b) + <f, a − a'>,
    and |W(a', b) − W(a, b)| ≤ <f*, a − a'>-like terms; each <·, a − a'> is at most osc(·)/2 · err since
    a − a' sums to 0. Hence |value − W| ≤ err · (osc f + osc f*) / 2, f = θu in cost units."""
    return err * (float(f.max() - f.min()) + float(f_star.max() - f_star.min())) / 2


def judge_fused(C64, theta, fused, *, max_iter, tol, same_path=False, **kw):
    """Hold a kernel solve ``fused`` = (u, v, iterations, err) of the float64 cost C64 to the reference.

    Always: finite potentials; ``err`` what it claims (the row error of the returned potentials, measured
    again in float64) with exact columns, both to the rounding of float32 potentials.

    ``same_path``: sweep for sweep the reference's path: the same count, the float32 loop's potentials to
    rounding, and the float64 loop over the same sweeps to 1e-5 (value, plan L1). That holds for plain
    Sinkhorn (``anderson=0``) and for the first sweeps of an accelerated one; over a whole accelerated
    solve rounding differences grow (Anderson's least squares amplify them), and what is checked instead
    is the answer, in at most about twice the float32 loop's sweeps: when converged, a value within
    :func:`value_gap_bound` of the exact one (:func:`exact_solution`), else an error no worse than the
    float32 loop's. (The plan itself is not
    held to the exact one: a marginal error of err can leave it 30·err away in L1 on near-diagonal
    problems, whatever the solver.)

    Returns (ok, detail).
    """
    C64 = C64.double().cpu()
    u, v, it, err = fused[0].cpu(), fused[1].cpu(), int(fused[2]), float(fused[3])
    n, m = C64.shape
    P = plan(u, v, C64, theta)
    row_err = float((P.sum(1) * n - 1).abs().mean())
    col_err = float((P.sum(0) * m - 1).abs().mean())
    value = theta * float(u.double().mean() + v.double().mean())
    u32, v32, it32, err32 = reference_solve(C64.float(), theta, max_iter=max_iter, tol=tol, dtype=torch.float32, **kw)
    # float32 potentials are rounded to ulp(|u|): the plan's entries then carry a relative error of about that.
    rounding = 4 * torch.finfo(torch.float32).eps * (1 + max(float(u.abs().max()), float(v.abs().max())))
    checks = {
        "finite": bool(torch.isfinite(u).all() and torch.isfinite(v).all()),
        f"err {err:.2e} = measured {row_err:.2e}": abs(err - row_err) <= 1e-3 * row_err + rounding + 1e-6,
        f"columns exact ({col_err:.1e})": col_err <= rounding + 1e-6,
    }
    converged = err <= tol
    if same_path:
        checks[f"sweeps {it} = fp32 loop {it32}"] = it == it32
        if it == it32:
            scale = 1.0 + max(float(u32.abs().max()), float(v32.abs().max()))
            dev = max(float((u - u32).abs().max()), float((v - v32).abs().max()))
            checks[f"potentials vs fp32 loop {dev:.1e}"] = dev <= 2e-6 * scale
        # The float32 weight in float64 too: the same algorithm, sweep for sweep.
        u64, v64, it64, _ = reference_solve(
            C64,
            theta,
            max_iter=it if converged else max_iter,
            tol=-1.0,
            stop_at=it if converged else None,
            **{"reg": REG[torch.float32], **kw},
        )
        value64 = theta * float(u64.mean() + v64.mean())
        l1 = float((P - plan(u64, v64, C64, theta)).abs().sum())
        checks[f"fp64 same sweeps ({it64}): value rel {abs(value - value64) / max(abs(value64), 1e-12):.1e}"] = (
            it64 == it and abs(value - value64) <= 1e-5 * abs(value64) + 1e-7
        )
        checks[f"fp64 same sweeps: plan L1 {l1:.1e}"] = l1 <= 1e-5
    else:
        # Not the same count: near float32's floor the extrapolation works on rounding noise and the paths part.
        checks[f"sweeps {it} <= 2 x fp32 loop {it32} + 10"] = it <= 2 * it32 + 10
        if converged:
            value_star, f_star = exact_solution(C64, theta)
            dval, bound = abs(value - value_star), value_gap_bound(err, theta * u.double(), f_star)
            checks[f"value to exact {dval:.1e} <= {bound:.1e}"] = dval <= bound + 2e-6 * (1 + abs(value_star))
        else:
            checks[f"unconverged err {err:.2e} vs fp32 loop {err32:.2e}"] = err <= 1.5 * err32 + 1e-6
    failed = [k for k, ok in checks.items() if not ok]
    return not failed, "; ".join(checks) if not failed else "FAILED: " + "; ".join(failed)
