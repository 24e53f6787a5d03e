"""OT solvers: entropic Sinkhorn (three backends, envelope gradient) and the learned semi-dual."""
from .dual import KantorovichPotential, semidual_plan, semidual_value, semidual_value_and_plan
from .sinkhorn import BACKENDS, SinkhornResult, entropic_ot, marginal_error, solve_sinkhorn

__all__ = [
    "BACKENDS", "SinkhornResult", "entropic_ot", "solve_sinkhorn", "marginal_error",
    "KantorovichPotential", "semidual_value", "semidual_plan", "semidual_value_and_plan",
]
