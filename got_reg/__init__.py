"""got-reg: the optimal-transport adversarial generalization (GOT) regulariser for PyTorch.

Bui et al., "Improving robustness with optimal transport based adversarial generalization".
"""
from . import costs, functional, solvers
from ._checks import GOTConvergenceWarning
from .hooks import FeatureCapture, resolve_layer, unwrap_model
from .regularizer import GOTRegularizer

__version__ = "0.1.0"

__all__ = [
    "GOTRegularizer", "GOTConvergenceWarning", "FeatureCapture", "resolve_layer", "unwrap_model",
    "functional", "costs", "solvers", "__version__",
]
