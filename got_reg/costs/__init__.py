"""Ground costs between clean and adversarial samples.

Feature costs d_x act on the hooked layer's flattened output z; probability costs d_y act on the
model's logits (turned into h(z) = softmax(logits) inside). Each is a small object with a
``pairwise(a, b) -> (B, B)`` method built from matrix products, and a factory takes their names. Costs
of the form row term + matrix product (cosine, KL) also give that form (``bilinear``), so that the
joint cost is one matrix product.
"""
from .feature_costs import Bilinear, CosineCost, FeatureCost, L2Cost, get_feature_cost, FEATURE_COSTS
from .prob_costs import KLCost, L1Cost, ProbCost, get_prob_cost, PROB_COSTS

__all__ = [
    "Bilinear", "FeatureCost", "CosineCost", "L2Cost", "get_feature_cost", "FEATURE_COSTS",
    "ProbCost", "KLCost", "L1Cost", "get_prob_cost", "PROB_COSTS",
]
