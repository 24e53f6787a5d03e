"""The fused Sinkhorn kernel's solve as an eager torch loop, and the problems it is checked on.

Shared by ``tests/solvers/test_triton.py`` (CPU, Triton's interpreter) and ``benchmarks/triton_selfcheck.py``
(the same checks on a GPU), so that both hold the kernel to one reference. Nothing here calls got_reg.
"""

from __future__ import annotations

import math

import torch


def reference_solve(
    C,
    theta,
    *,
    max_iter,
    tol,
    scaling=0.8,
    relax=1.8,
    relax_after=10,
    check_every=5,
    patience=10,
    dtype=torch.float64,
    stop_at=None,
    trace=None,
):
    """The solve of ``got_reg.solvers._triton.sinkhorn_fused`` as an eager torch loop, in any dtype (the
    schedule constants are those of ``got_reg.solvers.sinkhorn``: RELAX_AFTER, CHECK_EVERY, PATIENCE).

    ``stop_at``: also stop at the check sweep that brings the count to this many (to follow a run that
    stopped there). ``trace``: a list that collects the sweep counts where the fall-back to plain
    Sinkhorn happened.
    """
    C = C.to(dtype)
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
    omega, best, stalled, err, exact, check = 1.0, math.inf, 0, math.inf, True, False
    for k in range(max_iter - it):
        if k == relax_after:
            omega = relax
        exact = omega == 1.0 or k % check_every == 0
        check = k % check_every == 0
        v_map = -cols(u, s) - log_a
        v = v_map if exact else v + omega * (v_map - v)
        it += 1
        lse_row = rows(v, s)
        if check:
            err = float(torch.expm1(u + lse_row + log_b).abs().mean())
            if err <= tol or it == stop_at:
                break
            if err < best:
                best, stalled = err, 0
            else:
                stalled += 1
                if stalled > patience:
                    omega = relax = 1.0
                    if trace is not None:
                        trace.append(it)
        u_map = -lse_row - log_b
        u = u_map if omega == 1.0 else u + omega * (u_map - u)
    if not exact or not check:  # relaxed last sweep: exact columns; either way err of the returned (u, v)
        if not exact:
            v = -cols(u, s) - log_a
        err = float(torch.expm1(u + rows(v, s) + log_b).abs().mean())
    return u, v, it, err


def annealing_sweeps(C, theta, scaling=0.8):
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
    move between blocks: plain Sinkhorn is slow there, over-relaxation much faster."""
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
