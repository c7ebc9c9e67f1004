"""Python API: :func:`optimize` and :func:`analyze` (shaped like ``onnxsim.simplify``),
:func:`verify_models` and :func:`bench_models`.

These take a model or a path and plain keyword arguments, check them
(:class:`~sconv_onnx.options.Options`), and hand over to
:mod:`sconv_onnx.pipeline`.
"""

from __future__ import annotations

import onnx

from . import pipeline
from .bench import bench
from .errors import InputError, first_line
from .measure import Measurer
from .modelio import load_model
from .options import DEFAULT_MAX_ERROR, DEFAULT_TOL, Options, check_bound, check_timing
from .passes import resolve
from .plan import Plan
from .report import Report
from .runtime import run
from .verify import compare_outputs, random_feeds


def _options(calib_data, families, **settings) -> Options:
    """Checked :class:`Options` from the API's keyword arguments."""
    if isinstance(families, str):
        families = families.split(",")
    options = Options(families=None if families is None else tuple(families), **settings)
    return options.check(calibration=calib_data is not None)


def distances(model_or_path, spec, *, input_shapes=None) -> list:
    """Each layer's relative residual to one box structure named for the whole model,
    ``spec`` such as ``"c=C/2,n=2"`` (:mod:`sconv_onnx.distance`): a list of
    :class:`~sconv_onnx.distance.Distance`: the Conv layers in graph order, then the
    ConvTranspose, then the Gemm and MatMul layers."""
    from . import distance

    parsed = spec if isinstance(spec, distance.Spec) else distance.parse_spec(spec)
    view, _, _ = pipeline.view_of(load_model(model_or_path, mapped=True), input_shapes)
    [box] = resolve(["box"])
    return distance.distances(box.find(view), parsed)


def analyze(
    model_or_path,
    *,
    tol: float = DEFAULT_TOL,
    select: str = "cost",
    families=None,
    input_shapes=None,
    inputs=None,
    threads: int | None = None,
    calib_data=None,
    target_macs: float | None = None,
    alpha_fit: str = "data",
    seed: int = 0,
    min_agreement: float | None = None,
    sequential_fit: bool = True,
    int8: bool = False,
) -> Plan:
    """Plan without rewriting: per layer the candidates, the choice, its cost and the reason.

    ``input_shapes``: ``{name: shape}`` or ``["name:d1,d2", ...]``, used for
    MAC counts (dynamic dims without a hint leave MACs unknown).
    ``families``: names (a list or ``"a,b"``) of the structure families to
    ask; every registered one by default.  ``calib_data`` (an ``.npz`` path or
    a dict of arrays) adds each layer's output error; with ``target_macs``,
    the budget's choices (see :func:`optimize`; ``min_agreement``,
    ``sequential_fit`` and ``int8`` as there).
    """
    options = _options(calib_data, families, tol=tol, select=select, target_macs=target_macs,
                       alpha_fit=alpha_fit, seed=seed, threads=threads,
                       min_agreement=min_agreement, sequential_fit=sequential_fit, int8=int8)
    model = load_model(model_or_path, mapped=True)  # a large model's weights read in place
    batches, inputs = pipeline.calibration_batches(model, calib_data, inputs)
    analysis = pipeline.analyse(model, options, input_shapes, inputs, strict=False, batches=batches)
    measurer = Measurer(threads=threads) if options.select == "measured" else None
    return pipeline.plan(analysis, measurer=measurer)


def optimize(
    model_or_path,
    *,
    tol: float = DEFAULT_TOL,
    select: str = "cost",
    families=None,
    input_shapes=None,
    inputs=None,
    verify: bool = True,
    max_error: float | None = None,
    seed: int = 0,
    threads: int | None = None,
    calib_data=None,
    target_macs: float | None = None,
    alpha_fit: str = "data",
    min_agreement: float | None = None,
    strict_target: bool = False,
    sequential_fit: bool = True,
    int8: bool = False,
) -> tuple[onnx.ModelProto, Report]:
    """Rewrite every layer the plan selects; verify with onnxruntime.

    Args:
        model_or_path: a ``ModelProto`` or a path to an ``.onnx`` file.
        tol: bound on each layer's relative weight residual
            ``||W - W'||_F / ||W||_F``; the default 1e-4 means exact
            structure.
        select: ``"cost"`` rewrites where the cost model predicts a gain,
            ``"all"`` every layer within ``tol``, ``"measured"`` where the
            cost model's best candidates, timed on the layer's real shapes,
            are faster (:mod:`sconv_onnx.select`).
        families: names (a list, or ``"a,b"``) of the structure families
            to ask (:func:`sconv_onnx.passes.registered`); all by default.
        input_shapes: ``{name: shape}`` or ``["name:d1,d2", ...]`` for
            dynamic dims (a dynamic leading batch dim defaults to 1).
        inputs: ``{name: array}`` or a path to an ``.npz`` of real inputs
            (seeded random inputs otherwise).
        verify: run original and rewritten model and compare the outputs.
        max_error: bound on the verified relative error
            ``max|y0 - y1| / max|y0|`` per output.  None means 1e-3 at the
            default ``tol`` (1e-2 with a float16 output, 5e-2 bfloat16) and
            no bound (errors only reported) when ``tol`` is loosened.
        seed: seed of the random verification inputs (and of the
            calibration patches' sampling).
        threads: intra-op threads for ``select="measured"`` timings
            (default: the cores available).
        calib_data: ``{name: array}`` or a path to an ``.npz`` holding a
            batch of real inputs (samples along the leading axis): each
            layer's output error is measured on it, and the rewritten model
            is compared with the original on all of it
            (``report.calibration``: top-1 agreement, relative error).
            Without ``inputs``, its first batch is also the verification input.
        target_macs: with ``calib_data``, a compression budget for weights
            that are not structured: layers are moved onto approximate
            candidates (box structures, low-rank factors), least added
            error at the model's output per MAC saved first (each layer's
            sensitivity measured in onnxruntime), until the layers' MACs are
            at most this fraction of the original's; the layers taken are
            then fitted again on the inputs they receive in the compressed
            model (:mod:`sconv_onnx.endtoend`).  The budget stops early
            where the model on the calibration data would leave its bound
            (``min_agreement``, ``max_error``) and the report says the MAC
            ratio reached.
        alpha_fit: ``"data"`` (default) fits a budget's factors on the
            layer's calibration inputs, ``"weights"`` in weight space (no
            sequential fit).
        min_agreement: a budget's bound: the least fraction of answers
            (top-1 class, or arg-max per position of an ``N x T x K``
            output) the compressed model must keep on the calibration data.
            Default 0.99; for outputs without classes the bound is instead
            ``max_error`` on the calibration data's relative error
            ``||y - y0|| / ||y0||`` (default 0.05).
        strict_target: raise :class:`VerificationError` when the written
            model's MACs are above ``target_macs`` (the bound stopped the
            budget, or the target is out of reach) instead of reporting it.
        sequential_fit: fit a budget's layers again, one after the other,
            on the inputs they receive in the compressed model, and keep
            that fit where it brings the model closer to the original on
            the calibration data (False: each layer fitted on the original
            model's inputs only).
        int8: the written model will be quantized to int8 (onnxruntime's
            ``quantize_static``/``quantize_dynamic``): leave out rewrites
            int8 cannot hold (:attr:`sconv_onnx.plan.Candidate.int8_risk`):
            pools over channels or input features, and weights rebuilt in
            the graph (shared generators); spatial pools stay.

    Returns:
        ``(model, report)``.  The input model is never modified.  Weights
        in external data files next to the input are read transparently;
        save a model above 2 GiB with
        :func:`sconv_onnx.modelio.save_model` (external data).

    Raises:
        InputError: bad input (exit code 2 on the CLI).
        VerificationError: a check failed: an output beyond ``max_error``,
            a NaN or differing infinities in an output, or a rewritten layer
            over its own bound when run alone (:mod:`sconv_onnx.layercheck`),
            or with ``strict_target`` a MAC budget not met; its ``report``
            attribute holds the report (exit code 1).
    """
    options = _options(calib_data, families, tol=tol, select=select, target_macs=target_macs,
                       alpha_fit=alpha_fit, seed=seed, threads=threads,
                       min_agreement=min_agreement, strict_target=strict_target,
                       sequential_fit=sequential_fit, int8=int8)
    check_bound(max_error)
    return pipeline.optimize(model_or_path, options, input_shapes=input_shapes, inputs=inputs,
                             verify=verify, max_error=max_error, calib_data=calib_data)


def verify_models(model_a, model_b, *, input_shapes=None, inputs=None, seed: int = 0):
    """Run two models on the same inputs; per-output errors of ``b`` against ``a``.

    Models given as paths are checked without reading their external data
    and run by onnxruntime from the files.
    """
    a = load_model(model_a, weights=False)
    load_model(model_b, weights=False)
    feeds, shapes = pipeline.resolve_inputs(a, input_shapes, inputs, strict=True)
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
    check_timing(options)
    first = load_model(models[0], weights=False)
    for model in models[1:]:
        load_model(model, weights=False)
    feeds, shapes = pipeline.resolve_inputs(first, input_shapes, inputs, strict=True)
    feeds = feeds or random_feeds(first, shapes.shapes, seed)
    try:
        return bench(list(models), feeds, names=names, **options)
    except Exception as exc:  # noqa: BLE001 - any onnxruntime failure
        raise InputError(f"onnxruntime cannot run a model: {first_line(exc)}") from None


__all__ = ["DEFAULT_MAX_ERROR", "DEFAULT_TOL", "analyze", "bench_models", "optimize", "verify_models"]
