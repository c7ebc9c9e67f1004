"""The settings of a run, their defaults and their checks."""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from .budget import ALPHA_FITS
from .errors import InputError
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

    def check(self, calibration: bool = False) -> Options:
        """Raise :class:`InputError` on a bad setting; ``calibration``: data was given."""
        if not (isinstance(self.tol, (int, float)) and self.tol >= 0):
            raise InputError(f"--tol must be a number >= 0, got {self.tol!r}")
        if self.select not in SELECT_MODES:
            raise InputError(f"--select must be one of {', '.join(SELECT_MODES)}, got {self.select!r}")
        if self.target_macs is not None:
            if not (isinstance(self.target_macs, (int, float)) and 0 < self.target_macs <= 1):
                raise InputError(f"--target-macs must be a fraction in (0, 1], got {self.target_macs!r}")
            if not calibration:
                raise InputError("--target-macs needs --calib-data (a batch of real inputs, .npz)")
        if self.alpha_fit not in ALPHA_FITS:
            raise InputError(f"--alpha-fit must be one of {', '.join(ALPHA_FITS)}, got {self.alpha_fit!r}")
        if self.families is not None:
            resolve(self.families)  # unknown or no names: an InputError before any work
        return self


def default_max_error(model: onnx.ModelProto, plan: Plan | None = None) -> float:
    """:data:`DEFAULT_MAX_ERROR`, or looser when an output, or the stored weight of
    a rewritten layer, is in low precision (:data:`LOW_PRECISION_MAX_ERROR`)."""
    dtypes = [onnx.helper.tensor_dtype_to_np_dtype(out.type.tensor_type.elem_type).name
              for out in model.graph.output if out.type.tensor_type.elem_type]
    if plan is not None:
        dtypes += [layer.weight_dtype for layer in plan.rewritten]
    return max([DEFAULT_MAX_ERROR] + [LOW_PRECISION_MAX_ERROR.get(name, 0.0) for name in dtypes])
