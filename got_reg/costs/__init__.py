"""Ground costs between clean and adversarial samples.

One base class, :class:`PairwiseCost` (``pairwise(a, b) -> (B, B')``, optionally ``factorized``);
feature costs d_x (:class:`CosineCost`, :class:`L2Cost`) act on the hooked layer's output, probability
costs d_y (:class:`KLCost`, :class:`L1Cost`) on logits. :class:`JointCost` combines them into GOT's
λ·d_x + d_y. A custom cost is a subclass of :class:`PairwiseCost`, passed where a name is accepted.
"""

from .base import Factorized, PairwiseCost
from .feature import CosineCost, L2Cost
from .joint import JointCost, get_feature_cost, get_prob_cost
from .prob import KLCost, L1Cost

__all__ = [
    "PairwiseCost",
    "Factorized",
    "CosineCost",
    "L2Cost",
    "KLCost",
    "L1Cost",
    "JointCost",
    "get_feature_cost",
    "get_prob_cost",
]
