"""sconv-onnx: find layers whose constant weights have a known structure, rewrite them into
cheaper nodes, and prove with onnxruntime that the model still computes the same thing.

See :func:`sconv_onnx.optimize` and :func:`sconv_onnx.analyze`; structure families plug in
through :mod:`sconv_onnx.passes` (:class:`Family`, :func:`register`).
"""

from .api import DEFAULT_MAX_ERROR, DEFAULT_TOL, analyze, optimize, verify_models
from .errors import InputError, SconvError, VerificationError
from .passes import Family, register, registered, unregister
from .plan import Candidate, LayerPlan, Part, Plan
from .report import Report
from .structure import Structure

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MAX_ERROR",
    "DEFAULT_TOL",
    "Candidate",
    "Family",
    "InputError",
    "LayerPlan",
    "Part",
    "Plan",
    "Report",
    "SconvError",
    "Structure",
    "VerificationError",
    "analyze",
    "optimize",
    "register",
    "registered",
    "unregister",
    "verify_models",
]
