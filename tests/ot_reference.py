"""Independent references for the tests: nothing here calls got_reg's solvers.

* :func:`newton_ot`: entropic OT between uniform weights by damped Newton on the semi-dual, in float64.
  A different algorithm from Sinkhorn (second order, with a line search), it reaches round-off
  (marginal error ~1e-15) in 10-30 steps even on the near-diagonal plans where Sinkhorn crawls.
* :func:`pot_solve`: POT's ``ot.solve`` in float64 with a forbidden-pair mask turned into a large cost.
* :func:`semidual_formula`: eq. (2) of ``got_reg.solvers.dual`` written out with ``torch.logsumexp``.
* :func:`brute_feature_cost`, :func:`brute_prob_cost`: the pairwise costs by explicit loops in numpy.
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import numpy as np
import ot
import torch


class Reference(NamedTuple):
    value: float
    plan: torch.Tensor  # float64, exact zeros on forbidden pairs
    marginal_error: float


def _row_col_error(P: torch.Tensor) -> float:
    B, Bp = P.shape
    return max(float((P.sum(1) - 1 / B).abs().sum()), float((P.sum(0) - 1 / Bp).abs().sum()))


def semidual_formula(C: torch.Tensor, phi: torch.Tensor, theta: float, mask: torch.Tensor | None = None):
    """S_θ(φ) = mean_i φ_i + mean_j[−θ log mean_i exp((φ_i − C_ij)/θ)], differentiable by autograd."""
    X = (phi[:, None] - C) / theta
    if mask is not None:
        X = X.masked_fill(~mask, -math.inf)
    return phi.mean() - theta * (torch.logsumexp(X, dim=0) - math.log(C.shape[0])).mean()


def newton_ot(
    C: torch.Tensor, theta: float, mask: torch.Tensor | None = None, *, tol: float = 1e-13, max_iter: int = 300
) -> Reference:
    """W_θ(C) = min_P <P, C> + θ KL(P ‖ abᵀ) by damped Newton ascent on the semi-dual S_θ(f), float64.

    The Hessian of S_θ is −(diag(P·1) − Q diag(b) Qᵀ)/θ (Q the column softmax), singular along constants
    (on each block of a block mask), directions in which the gradient has no component. The plan
    P_ij = b_j softmax_i((f_i − C_ij)/θ) has exact columns; the rows reach round-off at the optimum.
    """
    C = C.detach().to(torch.float64)
    if mask is not None:
        C = C.masked_fill(~mask, math.inf)
    B, Bp = C.shape
    a, b = 1.0 / B, 1.0 / Bp
    f = torch.zeros(B, dtype=torch.float64)
    with torch.no_grad():
        s = semidual_formula(C, f, theta)
        for _ in range(max_iter):
            Q = torch.softmax((f[:, None] - C) / theta, dim=0)
            r = (Q * b).sum(1)
            g = a - r
            if float(g.abs().sum()) < tol:
                break
            # Singular along constants on each block of a block mask (one per class under label
            # matching), along which S_θ and g are flat: 11ᵀ/B and a tiny ridge make it invertible.
            H = (torch.diag(r) - (Q * b) @ Q.T) / theta + torch.full((B, B), 1.0 / B, dtype=torch.float64)
            H.diagonal().add_(1e-10)
            d = torch.linalg.solve(H, g)
            t = 1.0
            gain = float(g @ d)  # the predicted increase of a full step (≥ 0: H is positive definite)
            while True:  # Armijo backtracking: S_θ is concave
                s_new = semidual_formula(C, f + t * d, theta)
                # Near the optimum the gain is below round-off of S_θ and cannot be measured: full steps.
                if s_new >= s + 1e-4 * t * gain or gain < 1e-13 * max(1.0, abs(float(s))) or t < 1e-12:
                    break
                t *= 0.5
            f, s = f + t * d, s_new
        else:
            raise AssertionError("the Newton reference did not converge")
        P = torch.softmax((f[:, None] - C) / theta, dim=0) * b
    return Reference(float(s), P, _row_col_error(P))


def pot_solve(
    C: torch.Tensor, theta: float, mask: torch.Tensor | None = None, *, tol: float = 1e-12, max_iter: int = 200_000
) -> Reference:
    """POT's ``ot.solve(method="sinkhorn_log")`` in float64; forbidden pairs get C_max + 1000θ (plan 0 there)."""
    C = C.detach().to(torch.float64)
    if mask is not None:
        C = C.masked_fill(~mask, float(C[mask].max()) + 1000 * theta)
    res = ot.solve(C, reg=theta, method="sinkhorn_log", max_iter=max_iter, tol=tol)
    P = res.plan if mask is None else res.plan.masked_fill(~mask, 0.0)
    return Reference(float(res.value), P, _row_col_error(P))


def primal_value(C: torch.Tensor, P: torch.Tensor, theta: float) -> float:
    """<P, C> + θ KL(P ‖ abᵀ) of a plan, with 0 log 0 = 0 (and C ignored where P = 0)."""
    C, P = C.detach().double(), P.detach().double()
    B, Bp = P.shape
    pos = P > 0
    return float((P[pos] * C[pos]).sum() + theta * (P[pos] * torch.log(P[pos] * B * Bp)).sum())


def brute_feature_cost(name: str, z: np.ndarray, za: np.ndarray) -> np.ndarray:
    """1 − cos(z_i, za_j) or |z_i − za_j|, pair by pair."""
    out = np.zeros((len(z), len(za)))
    for i, j in itertools.product(range(len(z)), range(len(za))):
        a, b = z[i], za[j]
        if name == "cosine":
            out[i, j] = 1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
        else:
            out[i, j] = np.linalg.norm(a - b)
    return out


def np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def brute_prob_cost(name: str, lg: np.ndarray, lga: np.ndarray) -> np.ndarray:
    """KL(p_i ‖ q_j) or |p_i − q_j|_1 of the softmaxes of two logit batches, pair by pair."""
    p, q = np_softmax(lg), np_softmax(lga)
    out = np.zeros((len(p), len(q)))
    for i, j in itertools.product(range(len(p)), range(len(q))):
        if name == "kl":
            out[i, j] = np.sum(p[i] * (np.log(p[i]) - np.log(q[j])))
        else:
            out[i, j] = np.abs(p[i] - q[j]).sum()
    return out
