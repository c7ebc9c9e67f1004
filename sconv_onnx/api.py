"""Python API: :func:`optimize` and :func:`analyze` (shaped like ``onnxsim.simplify``)."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import onnx
import onnx_graphsurgeon as gs

from .bench import bench
from .budget import ALPHA_FITS, calibrate
from .calibration import accuracy_proxy, load_calibration, run_batches
from .errors import InputError, VerificationError, first_line
from .measure import Measurer
from .modelio import LARGE_MODEL_BYTES, load_model, restore_model_fields, weightless
from .passes import PASSES
from .passes.structured_conv import PlanContext
from .plan import Plan
from .report import Report
from .shapes import (
    ResolvedShapes,
    infer_tensor_shapes,
    load_inputs_file,
    parse_shape_hints,
    resolve_input_shapes,
)
from .stats import model_stats
from .verify import check_feeds, compare_outputs, random_feeds, run

#: Default bound on each layer's relative weight residual: exact structure.
DEFAULT_TOL = 1e-4
#: Default bound on the verified relative output error at the default tolerance.
DEFAULT_MAX_ERROR = 1e-3
SELECT_MODES = ("cost", "all", "measured")
#: Default verification bounds for low-precision outputs or rewritten weights
#: (float16 keeps ~3 decimal digits, bfloat16 ~2; a rewrite re-rounds every
#: sum, and alpha fits a weight rounded to its storage dtype).
LOW_PRECISION_MAX_ERROR = {"float16": 1e-2, "bfloat16": 5e-2}
#: Rounds of the whole-model A/B check that ``select="measured"`` ends with.
WHOLE_MODEL_RUNS = 20
#: The whole rewritten model must measure below this fraction of the original.
#: Looser than the per-layer margin: the layers' gains add up, and a model
#: only a few percent faster (MobileNetV2) must not be reverted by noise.
WHOLE_MODEL_MARGIN = 0.99


@dataclass
class _Analysis:
    """A loaded model, its graph view, the candidate sites and their plan."""

    model: onnx.ModelProto
    graph: gs.Graph
    sites: list  # (pass module, site) pairs, in plan order
    plan: Plan
    shapes: ResolvedShapes
    concrete_shapes: dict
    feeds: dict | None


def _default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    raise InputError("model imports no default-domain opset")


def _resolve_inputs(model, input_shapes, inputs, strict: bool) -> tuple[dict | None, ResolvedShapes]:
    """User arrays (from a dict or an ``.npz``) and the concrete input shapes."""
    feeds = None
    if inputs is not None:
        feeds = load_inputs_file(inputs) if isinstance(inputs, (str, os.PathLike)) else dict(inputs)
        feeds = check_feeds(model, feeds)
    hints = parse_shape_hints(input_shapes.items() if isinstance(input_shapes, dict) else input_shapes)
    return feeds, resolve_input_shapes(model, hints, feeds, strict=strict)


def _check_options(tol, select, calib_data=None, target_macs=None, alpha_fit="data") -> None:
    if not (isinstance(tol, (int, float)) and tol >= 0):
        raise InputError(f"--tol must be a number >= 0, got {tol!r}")
    if select not in SELECT_MODES:
        raise InputError(f"--select must be one of {', '.join(SELECT_MODES)}, got {select!r}")
    if target_macs is not None:
        if not (isinstance(target_macs, (int, float)) and 0 < target_macs <= 1):
            raise InputError(f"--target-macs must be a fraction in (0, 1], got {target_macs!r}")
        if calib_data is None:
            raise InputError("--target-macs needs --calib-data (a batch of real inputs, .npz)")
    if alpha_fit not in ALPHA_FITS:
        raise InputError(f"--alpha-fit must be one of {', '.join(ALPHA_FITS)}, got {alpha_fit!r}")


def _analyse(
    model, tol, select, input_shapes, inputs, strict, threads=None, measurer=None, excluded=None,
    calibration=None,
) -> _Analysis:
    """Resolve shapes, find every site of the loaded ``model`` and plan it.

    ``measurer`` (``select="measured"``) is created unless given, so that a
    caller planning twice reuses its timings; ``excluded`` maps node names
    that must be kept to the reason.  ``calibration``: ``(batches,
    target_macs, alpha_fit, seed)`` for :func:`sconv_onnx.budget.calibrate`,
    whose notes go to the shapes' notes.
    """
    feeds, shapes = _resolve_inputs(model, input_shapes, inputs, strict)
    static = infer_tensor_shapes(model)
    concrete = infer_tensor_shapes(model, shapes.shapes) if shapes.shapes else static
    graph = gs.import_onnx(model)
    opset = _default_opset(model)
    plan = Plan(tol=float(tol), select=select)
    if select == "measured" and measurer is None:
        measurer = Measurer(threads=threads)
    context = PlanContext(tol=float(tol), select=select, measurer=measurer,
                          excluded=dict(excluded or {}))
    sites = []
    for rewrite_pass in PASSES:
        for site in rewrite_pass.find(graph, static, concrete, opset):
            sites.append((rewrite_pass, site))
            plan.layers.append(rewrite_pass.plan(site, context))
    if calibration is not None:
        batches, target_macs, alpha_fit, seed = calibration
        shapes.notes.extend(calibrate(model, sites, plan, graph, batches, target_macs, alpha_fit, seed))
    return _Analysis(model, graph, sites, plan, shapes, concrete, feeds)


def analyze(
    model_or_path,
    *,
    tol: float = DEFAULT_TOL,
    select: str = "cost",
    input_shapes=None,
    inputs=None,
    threads: int | None = None,
    calib_data=None,
    target_macs: float | None = None,
    alpha_fit: str = "data",
    seed: int = 0,
) -> Plan:
    """Plan without rewriting: per layer the best structure, residual, cost and decision.

    ``input_shapes``: ``{name: shape}`` or ``["name:d1,d2", ...]``, used for
    MAC counts (dynamic dims without a hint leave MACs unknown).
    ``calib_data`` (an ``.npz`` path or a dict of arrays) adds each layer's
    output error; with ``target_macs``, the budget's choices (see
    :func:`optimize`).
    """
    _check_options(tol, select, calib_data, target_macs, alpha_fit)
    model = load_model(model_or_path)
    calibration, inputs = _calibration(model, calib_data, inputs, target_macs, alpha_fit, seed)
    return _analyse(model, tol, select, input_shapes, inputs, strict=False, threads=threads,
                    calibration=calibration).plan


def _calibration(model, calib_data, inputs, target_macs, alpha_fit, seed):
    """``(calibration settings for _analyse or None, inputs)``: without ``inputs`` of
    their own, the first calibration batch resolves the shapes and is verified on."""
    if calib_data is None:
        return None, inputs
    batches = load_calibration(model, calib_data)
    return (batches, target_macs, alpha_fit, seed), batches[0] if inputs is None else inputs


def _all_names(graph: gs.Graph, names: set[str] | None = None) -> set[str]:
    names = set() if names is None else names
    names.update(graph.tensors().keys())
    for node in graph.nodes:
        if node.name:
            names.add(node.name)
        for attr in node.attrs.values():
            if isinstance(attr, gs.Graph):
                _all_names(attr, names)
    return names


def optimize(
    model_or_path,
    *,
    tol: float = DEFAULT_TOL,
    select: str = "cost",
    input_shapes=None,
    inputs=None,
    verify: bool = True,
    max_error: float | None = None,
    seed: int = 0,
    threads: int | None = None,
    calib_data=None,
    target_macs: float | None = None,
    alpha_fit: str = "data",
) -> tuple[onnx.ModelProto, Report]:
    """Rewrite every structured Conv the plan selects; verify with onnxruntime.

    Args:
        model_or_path: a ``ModelProto`` or a path to an ``.onnx`` file.
        tol: bound on each layer's relative weight residual
            ``||W - A alpha||_F / ||W||_F``; the default 1e-4 means exact
            structure.
        select: ``"cost"`` rewrites where the cost model predicts a gain,
            ``"all"`` every layer within ``tol``, ``"measured"`` where the
            cost model's best candidates, timed on the layer's real shapes,
            are faster.
        input_shapes: ``{name: shape}`` or ``["name:d1,d2", ...]`` for
            dynamic dims (a dynamic leading batch dim defaults to 1).
        inputs: ``{name: array}`` or a path to an ``.npz`` of real inputs
            (seeded random inputs otherwise).
        verify: run original and rewritten model and compare the outputs.
        max_error: bound on the verified relative error
            ``max|y0 - y1| / max|y0|`` per output.  None means 1e-3 at the
            default ``tol`` (1e-2 with a float16 output, 5e-2 bfloat16) and
            no bound (errors only reported) when ``tol`` is loosened.
        seed: seed of the random verification inputs.
        threads: intra-op threads for ``select="measured"`` timings
            (default: the cores available).
        calib_data: ``{name: array}`` or a path to an ``.npz`` holding a
            batch of real inputs (samples along the leading axis): each
            layer's output error is measured on it, and the rewritten model
            is compared with the original on all of it
            (``report.calibration``: top-1 agreement, relative error).
            Without ``inputs``, its first batch is also the verification input.
        target_macs: with ``calib_data``, a compression budget for weights
            that are not structured: layers are forced onto approximate
            structures, least output error per MAC saved first, until the
            Conv/Gemm/MatMul MACs are at most this fraction of the
            original's (:mod:`sconv_onnx.budget`).  Errors are then
            reported, bounded only by ``max_error``.
        alpha_fit: ``"data"`` (default) solves a budget's alphas on the
            layer's calibration inputs, ``"weights"`` in weight space.

    Returns:
        ``(model, report)``.  The input model is never modified.  Weights
        in external data files next to the input are read transparently;
        save a model above 2 GiB with
        :func:`sconv_onnx.modelio.save_model` (external data).

    Raises:
        InputError: bad input (exit code 2 on the CLI).
        VerificationError: outputs differ beyond ``max_error``; its
            ``report`` attribute holds the report (exit code 1).
    """
    _check_options(tol, select, calib_data, target_macs, alpha_fit)
    measurer = Measurer(threads=threads) if select == "measured" else None
    excluded: dict[str, str] = {}
    source = load_model(model_or_path)  # once: the measured loop may plan several times
    given = isinstance(model_or_path, onnx.ModelProto)
    if given:
        # graphsurgeon's export writes into tensors it imported lazily (a Constant node's
        # value): work on a copy, so that the caller's model is never modified
        source = _copy(source)
    calibration, inputs = _calibration(source, calib_data, inputs, target_macs, alpha_fit, seed)
    # onnxruntime reads a model given as a path from the file: no copy of its weights
    runnable = source if given else model_or_path
    while True:
        analysis = _analyse(source, tol, select, input_shapes, inputs, strict=verify,
                            measurer=measurer, excluded=excluded, calibration=calibration)
        rewritten = _rewrite(analysis)
        if measurer is None or not analysis.plan.rewritten:
            break
        ratio = _whole_model_ratio(runnable, rewritten, analysis, measurer, seed)
        analysis.plan.model_ratio = ratio
        if ratio <= WHOLE_MODEL_MARGIN:
            break
        _exclude_least_gainful(analysis.plan, ratio, excluded)
    if max_error is None and tol <= DEFAULT_TOL and target_macs is None:
        max_error = default_max_error(source, analysis.plan)
    report = Report(
        plan=analysis.plan,
        before=_model_stats(source, analysis.concrete_shapes),
        after=_model_stats(rewritten, infer_tensor_shapes(rewritten, analysis.shapes.shapes)),
        input_shapes=dict(analysis.shapes.shapes),
        notes=list(analysis.shapes.notes),
        max_error=max_error,
    )
    feeds = _feeds(analysis, seed) if verify else None
    # The graph view holds its own copy of every weight a pass read and is cyclic (nodes and
    # tensors point at each other): for a large model, collect it and drop the loaded model
    # before onnxruntime loads the models (a path input is run from its file).  A collection
    # takes ~0.1 s in a busy process: not worth it for a small one.
    del source, analysis
    if report.before.size > LARGE_MODEL_BYTES:
        gc.collect()
    if verify:
        report.errors = _verify(runnable, rewritten, feeds, report.notes)
        if calibration is not None:
            report.calibration = accuracy_proxy(run_batches(runnable, calibration[0]),
                                                run_batches(rewritten, calibration[0]))
        if not report.verified:
            raise VerificationError(
                f"verification failed: max relative error {report.max_rel_error:.3g} "
                f"exceeds {max_error:g}",
                report,
            )
    return rewritten, report


def default_max_error(model: onnx.ModelProto, plan: Plan | None = None) -> float:
    """:data:`DEFAULT_MAX_ERROR`, or looser when an output, or the stored weight of
    a rewritten layer, is in low precision (:data:`LOW_PRECISION_MAX_ERROR`)."""
    dtypes = [onnx.helper.tensor_dtype_to_np_dtype(out.type.tensor_type.elem_type).name
              for out in model.graph.output if out.type.tensor_type.elem_type]
    if plan is not None:
        dtypes += [layer.weight_dtype for layer in plan.rewritten]
    return max([DEFAULT_MAX_ERROR] + [LOW_PRECISION_MAX_ERROR.get(name, 0.0) for name in dtypes])


def _model_stats(model: onnx.ModelProto, shapes: dict):
    """:func:`model_stats` of ``model``, read on its weightless copy.

    ``ByteSize`` serializes the whole model (and fails above 2 GiB); the
    copy has the same ops and tensor dims, and knows the size.
    """
    skeleton = weightless(model)
    stats = model_stats(skeleton.model, shapes)
    stats.size = skeleton.serialized_size
    return stats


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    duplicate = onnx.ModelProto()
    duplicate.CopyFrom(model)
    return duplicate


def _rewrite(analysis: _Analysis) -> onnx.ModelProto:
    """Apply every ``rewrite`` decision of the plan; with none, the analysed model itself."""
    taken, pools = _all_names(analysis.graph), {}
    for (rewrite_pass, site), layer in zip(analysis.sites, analysis.plan.layers):
        if layer.rewritten:
            rewrite_pass.rewrite(site, layer, taken, pools)
    if not analysis.plan.rewritten:
        return analysis.model
    rewritten = gs.export_onnx(analysis.graph, do_type_check=False)
    restore_model_fields(analysis.model, rewritten)
    return rewritten


def _feeds(analysis: _Analysis, seed: int) -> dict:
    """The user's inputs, or seeded random ones at the resolved shapes."""
    return analysis.feeds or random_feeds(analysis.model, analysis.shapes.shapes, seed)


def _whole_model_ratio(original, rewritten, analysis: _Analysis, measurer, seed: int) -> float:
    """Median per-round time ratio rewritten/original, side by side (``select="measured"``).

    ``original``: a ``ModelProto`` or the input's path.
    """
    result = bench([original, rewritten], _feeds(analysis, seed), threads=measurer.threads,
                   runs=WHOLE_MODEL_RUNS, warmup=3)
    return result.ratios[1]


def _exclude_least_gainful(plan: Plan, ratio: float, excluded: dict[str, str]) -> None:
    """Keep, from now on, the half of the rewritten layers with the least measured gain.

    Layers whose single-layer timing won can still lose inside the network
    (caches, layouts, scheduling): the whole model is the arbiter.
    """
    rewritten = sorted(plan.rewritten, key=lambda layer: layer.measured_ratio or 0.0, reverse=True)
    for layer in rewritten[: max(1, len(rewritten) // 2)]:
        excluded[layer.node] = (
            f"reverted: the whole model ran {ratio:.2f}x with {len(rewritten)} layers rewritten"
        )


def _verify(original, rewritten, feeds: dict, notes: list[str]):
    """Per-output errors of ``rewritten`` against ``original`` (a ``ModelProto`` or a path).

    How they were run, when it matters (bfloat16 widened), goes to ``notes``.
    """
    try:
        reference = run(original, feeds, notes)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises several unrelated types
        raise InputError(f"onnxruntime cannot run the input model: {first_line(exc)}") from None
    try:
        candidate = run(rewritten, feeds, notes)
    except Exception as exc:  # noqa: BLE001 - any onnxruntime failure
        raise VerificationError(
            f"verification failed: the rewritten model does not run: {first_line(exc)}"
        ) from None
    return compare_outputs(reference, candidate)


def verify_models(model_a, model_b, *, input_shapes=None, inputs=None, seed: int = 0):
    """Run two models on the same inputs; per-output errors of ``b`` against ``a``.

    Models given as paths are checked without reading their external data
    and run by onnxruntime from the files.
    """
    a = load_model(model_a, weights=False)
    load_model(model_b, weights=False)
    feeds, shapes = _resolve_inputs(a, input_shapes, inputs, strict=True)
    feeds = feeds or random_feeds(a, shapes.shapes, seed)
    outputs = []
    for label, model in (("first", model_a), ("second", model_b)):
        try:
            outputs.append(run(model, feeds, shapes.notes))
        except Exception as exc:  # noqa: BLE001 - any onnxruntime failure
            raise InputError(f"onnxruntime cannot run the {label} model: {first_line(exc)}") from None
    if set(outputs[0]) != set(outputs[1]):
        raise InputError("the two models have different output names")
    return compare_outputs(outputs[0], outputs[1]), shapes


def bench_models(models, *, names=None, input_shapes=None, inputs=None, seed: int = 0, **options):
    """Time models (``ModelProto`` or paths) side by side on the same inputs.

    ``options`` go to :func:`sconv_onnx.bench.bench` (threads, runs, warmup,
    profile).  Inputs are resolved from the first model.  Models given as
    paths are checked without reading their external data and timed by
    onnxruntime from the files.
    """
    first = load_model(models[0], weights=False)
    for model in models[1:]:
        load_model(model, weights=False)
    feeds, shapes = _resolve_inputs(first, input_shapes, inputs, strict=True)
    feeds = feeds or random_feeds(first, shapes.shapes, seed)
    try:
        return bench(list(models), feeds, names=names, **options)
    except Exception as exc:  # noqa: BLE001 - any onnxruntime failure
        raise InputError(f"onnxruntime cannot run a model: {first_line(exc)}") from None


__all__ = ["DEFAULT_MAX_ERROR", "DEFAULT_TOL", "analyze", "bench_models", "optimize", "verify_models"]
