"""sconv-onnx: find layers whose constant weights have a known structure, rewrite them into
cheaper nodes, and prove with onnxruntime that the model still computes the same thing.

See :func:`sconv_onnx.optimize` and :func:`sconv_onnx.analyze`; structure families plug in
through :mod:`sconv_onnx.passes` (:class:`Family`, :func:`register`).

The names below load on first use (PEP 562), so that importing the package
is cheap: the command line installs its signal handlers before onnx and
onnxruntime load (:mod:`sconv_onnx.entry`).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS = {
    "DEFAULT_MAX_ERROR": "api", "DEFAULT_TOL": "api", "analyze": "api", "optimize": "api",
    "verify_models": "api", "distances": "api",
    "InputError": "errors", "SconvError": "errors", "VerificationError": "errors",
    "Family": "passes", "register": "passes", "registered": "passes", "unregister": "passes",
    "Candidate": "plan", "LayerPlan": "plan", "Part": "plan", "Plan": "plan",
    "Report": "report",
    "Structure": "structure",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sconv_onnx' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
