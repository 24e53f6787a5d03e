"""OT solvers with one result type (:class:`OTResult`): entropic Sinkhorn (three backends, envelope
gradient) and the learned semi-dual, all built on the row log-sum-exp of :mod:`got_reg.solvers.lse`."""

from .dual import KantorovichPotential, semidual
from .result import OTResult, marginal_error, with_grad
from .sinkhorn import BACKENDS, SinkhornBackend, get_backend, sinkhorn_log, solve_sinkhorn

__all__ = [
    "OTResult",
    "marginal_error",
    "with_grad",
    "BACKENDS",
    "SinkhornBackend",
    "get_backend",
    "sinkhorn_log",
    "solve_sinkhorn",
    "semidual",
    "KantorovichPotential",
]
