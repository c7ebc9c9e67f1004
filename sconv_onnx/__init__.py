"""sconv-onnx: rewrite structured convolutions in ONNX models as sum-pool + small conv.

See ``sconv_onnx.optimize`` and ``sconv_onnx.analyze``.
"""

from .api import DEFAULT_MAX_ERROR, DEFAULT_TOL, analyze, optimize, verify_models
from .errors import InputError, SconvError, VerificationError
from .plan import LayerPlan, Lowering, Plan
from .report import Report
from .structure import Structure

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MAX_ERROR",
    "DEFAULT_TOL",
    "InputError",
    "LayerPlan",
    "Lowering",
    "Plan",
    "Report",
    "SconvError",
    "Structure",
    "VerificationError",
    "analyze",
    "optimize",
    "verify_models",
]
