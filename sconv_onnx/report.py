"""The report of a run (plan, stats before/after, measured errors) and its tables."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .errors import param
from .layercheck import FAIL, PASS, SKIPPED, UNBOUNDED, LayerCheck
from .plan import Plan
from .stats import ModelStats
from .verify import OutputError


def human(value: float | None) -> str:
    """``1234567 -> '1.23M'``; None -> ``'?'``."""
    if value is None:
        return "?"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def ratio(after: float | None, before: float | None) -> str:
    if after is None or before in (None, 0):
        return ""
    return f"{after / before:.3f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    """Plain text table, columns left-aligned, widths from the content."""
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()
             for row in [header] + rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def layer_table(plan: Plan) -> str:
    """One row per analysed layer, and a totals row.  ``family`` and ``structure`` are
    the chosen candidate's (else the best one's); with calibration data, the ``out err``
    column is the layer's relative output error (weight-space alpha's in brackets when
    the written alpha differs)."""
    calibrated = any(layer.output_error is not None for layer in plan.layers)
    rows = []
    for layer in plan.layers:
        candidate = layer.chosen or layer.best
        rows.append([
            layer.node,
            layer.op,
            candidate.family if candidate else "-",
            "x".join(map(str, layer.weight_shape)),
            candidate.label if candidate else "-",
            f"{candidate.residual:.1e}" if candidate else "-",
            *([_output_error(layer)] if calibrated else []),
            f"{human(layer.params_before)} -> {human(layer.params_after)}" if layer.rewritten
            else human(layer.params_before),
            f"{human(layer.macs_before)} -> {human(layer.macs_after)}" if layer.rewritten
            else human(layer.macs_before),
            (layer.chosen.lowering or "-") if layer.rewritten else "-",
            layer.decision,
            layer.reason,
        ])
    totals = plan.totals()
    rows.append([
        "TOTAL", "", "", "", "", "", *([""] if calibrated else []),
        f"{human(totals['params_before'])} -> {human(totals['params_after'])}",
        f"{human(totals['macs_before'])} -> {human(totals['macs_after'])}",
        "", f"{totals['rewritten']}/{totals['layers']}", "",
    ])
    header = ["node", "op", "family", "weight", "structure", "residual",
              *(["out err"] if calibrated else []), "params", "MACs", "lowering", "decision",
              "reason"]
    return table(header, rows)


def _output_error(layer) -> str:
    if layer.output_error is None:
        return "-"
    text = f"{layer.output_error:.1e}"
    weight = layer.output_error_weight_alpha
    if weight is not None and abs(weight - layer.output_error) > 1e-3 * max(weight, 1e-30):
        text += f" ({weight:.1e})"
    return text


def summary_table(before: ModelStats, after: ModelStats) -> str:
    """onnxsim-style before/after table: op counts, params, MACs, size."""
    rows = []
    for op in sorted(set(before.ops) | set(after.ops)):
        rows.append([op, str(before.ops.get(op, 0)), str(after.ops.get(op, 0)), ""])
    rows.append(["params", human(before.params), human(after.params), ratio(after.params, before.params)])
    rows.append(["MACs", human(before.macs), human(after.macs), ratio(after.macs, before.macs)])
    rows.append(["size (bytes)", human(before.size), human(after.size), ratio(after.size, before.size)])
    return table(["", "before", "after", "ratio"], rows)


def calibration_line(proxy: dict) -> str:
    """The accuracy proxy in one line."""
    top1, position = proxy.get("top1_agreement"), proxy.get("position_agreement")
    agreement = ""
    if top1 is not None:
        agreement = f"top-1 agreement {100 * top1:.1f}% on {proxy['output']!r}, "
    elif position is not None:
        agreement = (f"per-position arg-max agreement {100 * position:.2f}% (positions both "
                     f"models leave in a background class left out) on {proxy['output']!r}, ")
    return (f"on the calibration data ({proxy['samples']} samples): {agreement}"
            f"relative output error {proxy['rel_error']:.3g}")


@dataclass
class Report:
    """What :func:`sconv_onnx.optimize` did: the plan and what was measured.

    ``errors`` (the end-to-end check) and ``layer_checks`` (each rewritten
    layer on its own, :mod:`sconv_onnx.layercheck`) are None when
    verification was skipped.  ``bench``: the original and rewritten models
    timed side by side (:meth:`sconv_onnx.bench.BenchResult.to_dict`), when
    they were.  :meth:`to_dict` follows :data:`SCHEMA_PATH`.
    """

    plan: Plan
    before: ModelStats
    after: ModelStats
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    errors: list[OutputError] | None = None
    max_error: float | None = None
    #: with calibration data: :func:`sconv_onnx.calibration.accuracy_proxy` on all of it
    calibration: dict | None = None
    layer_checks: list[LayerCheck] | None = None
    bench: dict | None = None

    @property
    def max_rel_error(self) -> float | None:
        if self.errors is None:
            return None
        return max((e.max_rel for e in self.errors), default=0.0)

    def failures(self) -> list[str]:
        """Why verification failed, one entry per reason (empty: it did not)."""
        failed = [f"output {e.name!r}: {e.problem}" for e in self.errors or () if e.problem]
        worst = self.max_rel_error
        if not failed and self.max_error is not None and worst is not None and worst > self.max_error:
            failed.append(f"max relative error {worst:.3g} exceeds {self.max_error:g}")
        for check in self.layer_checks or ():
            if check.status == FAIL:
                failed.append(f"layer {check.layer.node!r} alone: {check.summary()}")
            elif check.unverified:
                failed.append(f"layer {check.layer.node!r} sits in a subgraph the inputs may "
                              f"not reach and cannot be checked alone ({check.summary()})")
        return failed

    @property
    def status(self) -> str:
        """``PASS`` (every check met its bound: the outputs', and each rewritten layer's
        alone, or end to end for a main-graph layer that cannot run alone), ``FAIL``,
        ``UNBOUNDED`` (as PASS, but the outputs' error has no bound: ``max_error``
        None) or ``SKIPPED``."""
        if self.errors is None:
            return SKIPPED
        if self.failures():
            return FAIL
        return UNBOUNDED if self.max_error is None else PASS

    @property
    def verified(self) -> bool:
        """Verification ran and every check met its bound (:attr:`status` is ``PASS``)."""
        return self.status == PASS

    def to_dict(self) -> dict:
        return stamped({
            "plan": self.plan.to_dict(),
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
            "notes": list(self.notes),
            "calibration": self.calibration,
            "verification": None if self.errors is None else {
                "status": self.status,
                "outputs": [e.to_dict() for e in self.errors],
                "max_rel_error": self.max_rel_error,
                "max_error": self.max_error,
                "layers": [check.to_dict() for check in self.layer_checks or ()],
                "failures": self.failures(),
                "passed": self.verified,
            },
            "bench": self.bench,
        })

    def verification_lines(self) -> list[str]:
        if self.errors is None:
            return ["verification: skipped"]
        shapes = ", ".join(f"{k}:{','.join(map(str, v))}" for k, v in self.input_shapes.items())
        lines = [f"verification on {shapes}:"]
        for err in self.errors:
            problem = f" ({err.problem})" if err.problem else ""
            lines.append(f"  {err.name}: max abs {err.max_abs:.3g}, max rel {err.max_rel:.3g}{problem}")
        lines += layer_check_lines(self.layer_checks or [])
        lines.append(f"  {self.status}: {self.outcome()}")
        if self.calibration is not None:
            lines.append(calibration_line(self.calibration))
        return lines

    def outcome(self) -> str:
        """The verdict's words after the status (see :attr:`status`)."""
        status = self.status
        if status == SKIPPED:
            return f"not verified ({param('verify')})"
        worst = f"max rel error {self.max_rel_error:.3g}"
        if status == FAIL:
            failures = self.failures()
            more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
            return failures[0] + more
        if status == UNBOUNDED:
            return (f"{worst}, checked against NO bound (give {param('max_error')} to set one); "
                    f"no rewritten layer failed its own check")
        return f"{worst} <= {self.max_error:g}"

    def format(self) -> str:
        """The human-readable report: layers, before/after, verification."""
        parts = [layer_table(self.plan), "", summary_table(self.before, self.after), ""]
        parts += [f"note: {note}" for note in self.notes]
        parts += self.verification_lines()
        return "\n".join(parts)


def layer_check_lines(checks: list[LayerCheck]) -> list[str]:
    """The per-layer checks in one line, and a line per layer not passed."""
    if not checks:
        return []
    passed = sum(check.status == PASS for check in checks)
    lines = [f"  rewritten layers alone: {passed}/{len(checks)} within their bounds"]
    lines += [f"    {check.layer.node}: {check.status} ({check.summary()})"
              for check in checks if check.status != PASS]
    return lines


#: The JSON report's schema (JSON Schema 2020-12), shipped with the package.
SCHEMA_PATH = Path(__file__).with_name("report.schema.json")
#: Bumped when a field is removed or changes meaning (not when one is added).
SCHEMA_VERSION = 1


def tool_info() -> dict:
    """This tool's name and version, and the versions of the libraries it ran on."""
    import numpy
    import onnx
    import onnx_graphsurgeon
    import onnxruntime

    return {"name": "sconv-onnx", "version": __version__, "dependencies": {
        "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
        "onnx-graphsurgeon": onnx_graphsurgeon.__version__, "numpy": numpy.__version__,
        "python": sys.version.split()[0]}}


def stamped(data: dict) -> dict:
    """``data`` led by ``schema_version`` and ``tool`` (:func:`tool_info`)."""
    return {"schema_version": SCHEMA_VERSION, "tool": tool_info(), **data}


def schema() -> dict:
    """The JSON report's schema (:data:`SCHEMA_PATH`)."""
    return json.loads(SCHEMA_PATH.read_text())


def _json_safe(value):
    """``value`` with every non-finite float replaced by its name (``"inf"``, ``"nan"``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def json_text(data) -> str:
    """``data`` as strict JSON (non-finite floats as the strings ``"inf"``, ``"-inf"``,
    ``"nan"``: JSON has no such numbers)."""
    return json.dumps(_json_safe(data), indent=2, allow_nan=False) + "\n"
