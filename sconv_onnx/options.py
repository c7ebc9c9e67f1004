"""The settings of a run, their defaults and their checks."""

from __future__ import annotations

import math
from dataclasses import dataclass

import onnx

from .budget import ALPHA_FITS
from .errors import InputError, param
from .passes import resolve
from .plan import SELECT_MODES, Plan, SelectMode

#: Default bound on each layer's relative weight residual: exact structure.
DEFAULT_TOL = 1e-4
#: Default bound on the verified relative output error at the default tolerance.
DEFAULT_MAX_ERROR = 1e-3
#: Default verification bounds for low-precision outputs or rewritten weights
#: (float16 keeps ~3 decimal digits, bfloat16 ~2; a rewrite re-rounds every
#: sum, and alpha fits a weight rounded to its storage dtype).
LOW_PRECISION_MAX_ERROR = {"float16": 1e-2, "bfloat16": 5e-2}


@dataclass(frozen=True)
class Options:
    """How :func:`sconv_onnx.optimize` and :func:`sconv_onnx.analyze` plan a model.

    ``families``: the structure families to ask (names; None: every registered
    one, :func:`sconv_onnx.passes.registered`).  ``target_macs`` needs
    calibration data.  ``threads`` is for ``select="measured"`` timings.
    """

    tol: float = DEFAULT_TOL
    select: SelectMode = "cost"
    families: tuple[str, ...] | None = None
    target_macs: float | None = None
    alpha_fit: str = "data"
    seed: int = 0
    threads: int | None = None
    #: a budget's bound: the least agreement of the model's answers on the calibration
    #: data (None: :data:`~sconv_onnx.endtoend.DEFAULT_MIN_AGREEMENT` unless ``max_error``)
    min_agreement: float | None = None
    #: an unmet MAC budget fails the run (exit 1) instead of being reported
    strict_target: bool = False
    #: a budget's layers fitted again, one after the other, on the inputs they receive in
    #: the compressed model (False: one-shot fits on the original model's inputs)
    sequential_fit: bool = True
    #: the model will be quantized to int8: only candidates whose tensors int8 holds
    #: (:attr:`sconv_onnx.plan.Candidate.int8_risk`)
    int8: bool = False

    def check(self, calibration: bool = False) -> Options:
        """Raise :class:`InputError` on a bad setting; ``calibration``: data was given."""
        if not (_is_number(self.tol) and self.tol >= 0):
            raise InputError(f"{param('tol')} must be a finite number >= 0, got {self.tol!r}")
        if self.select not in SELECT_MODES:
            raise InputError(f"{param('select')} must be one of {', '.join(SELECT_MODES)}, "
                             f"got {self.select!r}")
        if self.target_macs is not None:
            if not (_is_number(self.target_macs) and 0 < self.target_macs <= 1):
                raise InputError(f"{param('target_macs')} must be a fraction in (0, 1], "
                                 f"got {self.target_macs!r}")
            if not calibration:
                raise InputError(f"{param('target_macs')} needs {param('calib_data')} "
                                 f"(a batch of real inputs)")
        if self.alpha_fit not in ALPHA_FITS:
            raise InputError(f"{param('alpha_fit')} must be one of {', '.join(ALPHA_FITS)}, "
                             f"got {self.alpha_fit!r}")
        if not (isinstance(self.seed, int) and not isinstance(self.seed, bool) and self.seed >= 0):
            raise InputError(f"{param('seed')} must be an integer >= 0, got {self.seed!r}")
        check_count("threads", self.threads, minimum=1)
        for name in ("sequential_fit", "strict_target"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{param(name)} must be True or False, "
                                 f"got {getattr(self, name)!r}")
        if self.min_agreement is not None and not (
                _is_number(self.min_agreement) and 0 <= self.min_agreement <= 1):
            raise InputError(f"{param('min_agreement')} must be a fraction in [0, 1], "
                             f"got {self.min_agreement!r}")
        if self.target_macs is None and (self.min_agreement is not None or self.strict_target):
            raise InputError(f"{param('min_agreement')} and {param('strict_target')} bound a "
                             f"MAC budget: give {param('target_macs')} too")
        if self.families is not None:
            resolve(self.families)  # unknown or no names: an InputError before any work
        return self


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def check_bound(max_error) -> float | None:
    """``max_error`` if it is None or a finite number >= 0; else :class:`InputError`."""
    if max_error is not None and not (_is_number(max_error) and max_error >= 0):
        raise InputError(f"{param('max_error')} must be a finite number >= 0, got {max_error!r}")
    return max_error


def check_timing(settings) -> None:
    """:func:`check_count` for the timing settings (``threads``, ``runs``, ``warmup``)
    that ``settings`` (a mapping) holds."""
    for name, minimum in (("threads", 1), ("runs", 1), ("warmup", 0)):
        check_count(name, settings.get(name), minimum)


def check_count(name: str, value, minimum: int) -> int | None:
    """``value`` if it is None or an integer >= ``minimum``; else :class:`InputError`
    naming the setting ``name``."""
    if value is not None and not (isinstance(value, int) and not isinstance(value, bool)
                                  and value >= minimum):
        raise InputError(f"{param(name)} must be an integer >= {minimum}, got {value!r}")
    return value


def default_max_error(model: onnx.ModelProto, plan: Plan | None = None) -> float:
    """:data:`DEFAULT_MAX_ERROR`, or looser when an output, or the stored weight of
    a rewritten layer, is in low precision (:data:`LOW_PRECISION_MAX_ERROR`)."""
    dtypes = [onnx.helper.tensor_dtype_to_np_dtype(out.type.tensor_type.elem_type).name
              for out in model.graph.output if out.type.tensor_type.elem_type]
    if plan is not None:
        dtypes += [layer.weight_dtype for layer in plan.rewritten]
    return max([DEFAULT_MAX_ERROR] + [LOW_PRECISION_MAX_ERROR.get(name, 0.0) for name in dtypes])
