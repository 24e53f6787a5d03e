"""got-reg: the optimal-transport adversarial generalization (GOT) regulariser for PyTorch.

Bui et al., "Improving robustness with optimal transport based adversarial generalization".
"""

from . import costs, functional, solvers
from ._checks import GOTConvergenceWarning
from .diagnostics import GOTDiagnostics
from .hooks import FeatureCapture
from .regularizer import GOTCollapseWarning, GOTRegularizer

__version__ = "0.2.0.dev0"

__all__ = [
    "GOTRegularizer",
    "GOTDiagnostics",
    "FeatureCapture",
    "GOTConvergenceWarning",
    "GOTCollapseWarning",
    "functional",
    "costs",
    "solvers",
    "__version__",
]
