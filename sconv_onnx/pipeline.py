"""Orchestration: load -> find -> candidates -> (calibrate) -> select -> rewrite -> verify.

One direction of flow (docs/DESIGN.md section 3).  :func:`analyse` does the
expensive, decision-free part once per run: shapes, the graph view, every
family's sites and candidates, and their output errors on calibration
data.  :func:`plan` (the selector) and :func:`rewrite` are then cheap, so
that ``select="measured"`` can re-plan after its whole-model check
(:mod:`sconv_onnx.revert`) without re-reading, re-importing or re-searching
anything.  :func:`optimize` is the whole run behind
:func:`sconv_onnx.optimize`.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import onnx
import onnx_graphsurgeon as gs

from . import endtoend, layercheck, revert
from .calibration import accuracy_proxy, load_calibration, run_batches, sample_tensors
from .context import context_feeds, context_shapes, with_observed
from .errors import InputError, VerificationError, first_line, param
from .layercheck import FAIL
from .measure import Measurer
from .modelio import LARGE_MODEL_BYTES, load_model, read_mapped, restore_model_fields, weightless
from .options import DEFAULT_TOL, Options, default_max_error
from .passes import resolve
from .passes.base import Emitter
from .passes.batchnorm import fold_remaining
from .passes.graphs import is_sorted
from .plan import Plan
from .progress import LOG, phase, track
from .report import Report
from .runtime import run
from .select import Settings, SiteEntry, select
from .shapes import (
    ResolvedShapes,
    graph_inputs,
    infer_tensor_shapes,
    parse_shape_hints,
    resolve_input_shapes,
)
from .stats import model_stats
from .verify import compare_outputs, random_feeds, user_feeds
from .view import ModelView


@dataclass
class Analysis:
    """A model, its view, and every family's sites with their candidates (decision-free)."""

    view: ModelView
    #: the settings the candidates were made with (their tolerance, families, budget)
    options: Options
    #: the names of the families asked, in order
    families: tuple[str, ...]
    entries: list[SiteEntry]
    shapes: ResolvedShapes
    feeds: dict | None
    #: the calibration data, split into runnable batches (None without)
    batches: list[dict] | None = None
    notes: list[str] = field(default_factory=list)

    def verification_feeds(self, seed: int) -> dict:
        """The user's inputs, or seeded random ones at the resolved shapes."""
        return self.feeds or random_feeds(self.view.model, self.shapes.shapes, seed)


def resolve_inputs(model: onnx.ModelProto, input_shapes, inputs,
                   strict: bool) -> tuple[dict | None, ResolvedShapes]:
    """User arrays (from a dict or an ``.npz``) and the concrete input shapes."""
    feeds = None if inputs is None else user_feeds(model, inputs)
    hints = parse_shape_hints(input_shapes.items() if isinstance(input_shapes, dict) else input_shapes)
    return feeds, resolve_input_shapes(model, hints, feeds, strict=strict)


def view_of(model: onnx.ModelProto, input_shapes=None, inputs=None, strict: bool = False,
            seed: int = 0) -> tuple[ModelView, dict | None, ResolvedShapes]:
    """The graph view of ``model`` at its MAC context shapes, the user's feeds and the
    resolved input shapes."""
    feeds, shapes = resolve_inputs(model, input_shapes, inputs, strict)
    context = context_shapes(model, shapes.shapes)
    return ModelView.of(model, context, observer(model, context, feeds, seed)), feeds, shapes


def analyse(model: onnx.ModelProto, options: Options, input_shapes=None, inputs=None,
            strict: bool = True, batches: list[dict] | None = None) -> Analysis:
    """Shapes, the graph view, each family's sites and candidates; with calibration
    ``batches``, the candidates' output errors (and a budget's approximate candidates)."""
    view, feeds, shapes = view_of(model, input_shapes, inputs, strict, options.seed)
    context = view.context
    families = resolve(options.families)
    entries = []
    with phase("structure search", unit="sites") as running:
        for family in families:
            running.note(family.name)
            started, count = time.perf_counter(), len(entries)
            for site in family.find(view):
                entries.append(SiteEntry(family, site, _for_int8(
                    site, family.candidates(site, float(options.tol)), options.int8)))
                view.release_pages()
                running.advance()
            found = entries[count:]
            LOG.debug("  %s: %d sites, %d candidates in %.1f s", family.name, len(found),
                      sum(len(entry.candidates) for entry in found),
                      time.perf_counter() - started)
    analysis = Analysis(view, options, tuple(family.name for family in families), entries, shapes,
                        feeds, batches, list(shapes.notes) + context_notes(shapes.shapes, context,
                                                                           view.observed))
    if batches is not None:
        calibrate(analysis)
    return analysis


def _for_int8(site, candidates: list, int8: bool) -> list:
    """``candidates`` less those int8 cannot hold, when ``int8``; a site left with none says
    why in :attr:`~sconv_onnx.passes.base.Site.filtered` (the candidates' ``int8_risk``)."""
    if not int8:
        return candidates
    kept = [candidate for candidate in candidates if candidate.int8_safe]
    if candidates and not kept:
        risks = dict.fromkeys(candidate.int8_risk for candidate in candidates)
        site.filtered = f"{param('int8')}: {'; '.join(risks)}"
    return kept


def observer(model: onnx.ModelProto, context: dict, feeds: dict | None, seed: int):
    """A maker of inputs at the MAC ``context`` shapes for onnxruntime to observe shapes
    (:func:`sconv_onnx.context.with_observed`): None when an input has no shape."""
    if any(inp.name not in context for inp in graph_inputs(model)):
        return None
    return lambda: context_feeds(model, context, feeds, seed)


def context_notes(shapes: dict, context: dict, observed: int) -> list[str]:
    """What the report says of the MAC context, when it is not the run's input shapes."""
    notes = []
    if context != shapes:
        notes.append("MACs are counted at batch 1 (the verification or calibration inputs "
                     "have a larger batch)")
    if observed:
        notes.append(f"shapes of {observed} layer tensors observed in onnxruntime (shape "
                     f"inference could not tell them)")
    return notes


def budget_notes(target: float | None, before: int | None, after: int | None) -> list[str]:
    """What a MAC budget reached, counted afresh on the written model (all counted ops,
    :mod:`sconv_onnx.macs`, in the MAC context): never claimed unless met."""
    if target is None:
        return []
    if not before or after is None:
        return [(f"MAC budget {target:g}: the written model's MACs cannot be counted, so "
                 f"the target is not claimed")]
    ratio = after / before
    verdict = "met" if ratio <= target else "NOT met"
    return [(f"MAC budget {target:g} {verdict}: the written model has {ratio:.3f} of the "
             f"original's MACs (every counted op, counted on both models; the budget itself "
             f"weighs the layers it can move)")]


def calibrate(analysis: Analysis) -> None:
    """Sample every site's calibration request in one pass over the batches, then let each
    family score (and, for a budget, extend) its candidates."""
    options = analysis.options
    wanted = [(entry, entry.family.calibration(entry.site, options.seed))
              for entry in analysis.entries]
    wanted = [(entry, request) for entry, request in wanted if request is not None]
    with phase("calibration inputs"):
        samples = sample_tensors(analysis.view.model, analysis.batches,
                                 [(request.tensor, request.sampler) for _, request in wanted])
    for (entry, _), sample in track(list(zip(wanted, samples)), "calibration", unit="sites"):
        entry.candidates = _for_int8(entry.site, entry.family.calibrate(
            entry.site, entry.candidates, sample, options.target_macs is not None,
            options.alpha_fit), options.int8)


def plan(analysis: Analysis, excluded: dict[str, str] | None = None,
         measurer: Measurer | None = None, max_error: float | None = None) -> Plan:
    """The selector's decisions (:func:`sconv_onnx.select.select`), with the settings the
    analysis was made with; a MAC budget's chosen, fitted and bounded end to end
    (:mod:`sconv_onnx.endtoend`, ``max_error`` part of its bound)."""
    options = analysis.options
    settings = Settings(float(options.tol), options.select, options.target_macs,
                        options.alpha_fit if options.target_macs is not None else None,
                        int8=options.int8)
    if options.target_macs is None:
        return select(analysis.entries, settings, excluded, measurer, analysis.families)

    def decide(sensitivity, max_moves):
        return select(analysis.entries, dataclasses.replace(
            settings, sensitivity=sensitivity, max_moves=max_moves), excluded, measurer,
            analysis.families)

    owners = {id(candidate): entry for entry in analysis.entries for candidate in entry.candidates}
    sequential = options.sequential_fit and options.alpha_fit == "data"
    with phase("budget"):
        trial = endtoend.choose(decide, lambda chosen, refits: rewrite(analysis, chosen, refits),
                                lambda candidate: owners[id(candidate)], analysis.view.model,
                                analysis.batches, options.min_agreement, max_error, sequential,
                                options.seed)
    for layer in trial.plan.layers:
        if layer.key in trial.held and not layer.rewritten:
            layer.reason = f"budget: left alone: {trial.held[layer.key]}"
    for layer in trial.plan.rewritten:
        refit = trial.refits.get(id(layer.chosen))
        if refit is None:
            continue
        trial.plan.refit_of[id(refit)] = layer.chosen
        layer.reason = (f"budget: output error {refit.output_error:.3g} fitted on the compressed "
                        f"model's inputs (one-shot: {layer.output_error:.3g}; weight-space: "
                        f"{layer.output_error_weight_alpha:.3g})")
        layer.chosen, layer.output_error = refit, refit.output_error
    return trial.plan


def rewrite(analysis: Analysis, plan: Plan, refits: dict | None = None,
            fold_all: bool = False) -> onnx.ModelProto:
    """The model with every rewrite of ``plan`` emitted (on a copy of the graph view);
    with none, the analysed model itself.  ``refits`` maps a chosen candidate's ``id``
    to the candidate to emit in its place (a budget's sequential fit).  ``fold_all``:
    also fold every BatchNormalization left after a kept Conv
    (:func:`~sconv_onnx.passes.batchnorm.fold_remaining`; the written model's, noted in
    ``plan.notes``), where the trials of a plan leave them to onnxruntime.

    Sites emit in the order found, each its chosen candidate (a group site once
    for the layers its candidate covers: all, or its ``members``).  Families insert nodes before their site's node; a
    graph some emit left out of order (a shared tensor first used above where
    it was made) is sorted.
    """
    if not plan.rewritten and not (fold_all and _has_batchnorm(analysis.view)):
        return analysis.view.model
    chosen = {layer.key: layer.chosen for layer in plan.rewritten}
    emitter = Emitter(analysis.view.graph)
    for entry in analysis.entries:
        covered = _covered(entry.site, chosen)
        candidate = chosen.get(covered[0]) if covered else None
        source = plan.refit_of.get(id(candidate), candidate)
        mine = candidate is not None and any(
            source is own or (source.members is not None and source.family == own.family
                              and source.payload is own.payload)
            for own in entry.candidates)
        if mine and all(chosen.get(key) is candidate for key in covered):
            entry.family.emit(entry.site, (refits or {}).get(id(candidate), candidate), emitter)
            analysis.view.release_pages()
    if fold_all:
        folded = fold_remaining(emitter, set(chosen))
        if folded:
            plan.notes.append(f"folded {len(folded)} more BatchNormalization node"
                              f"{'s' * (len(folded) != 1)} into the kept convs before them "
                              f"(exact; onnxruntime does the same when it loads a model)")
        elif not plan.rewritten:
            return analysis.view.model
    if not is_sorted(emitter.graph):
        emitter.graph.toposort()
    rewritten = gs.export_onnx(emitter.graph, do_type_check=False)
    restore_model_fields(analysis.view.model, rewritten)
    return rewritten


def _has_batchnorm(view) -> bool:
    return any(node.op == "BatchNormalization" for _, node in view.nodes())


def _covered(site, chosen: dict) -> list[str]:
    """The layer keys of ``site`` its chosen candidate covers: the ``members`` of a group
    candidate taken for some of its layers, else all the site's layers."""
    keys = [info.key for info in site.layers]
    for key in keys:
        candidate = chosen.get(key)
        if candidate is not None and candidate.members is not None and key in candidate.members:
            return list(candidate.members)
    return keys


def model_stats_of(model: onnx.ModelProto, shapes: dict):
    """:func:`~sconv_onnx.stats.model_stats` of ``model``, read on its weightless copy.

    ``ByteSize`` serializes the whole model (and fails above 2 GiB); the
    copy has the same ops and tensor dims, and knows the size.
    """
    skeleton = weightless(model)
    stats = model_stats(skeleton.model, shapes)
    stats.size = skeleton.serialized_size
    return stats


def verify_outputs(original, rewritten, feeds: dict, notes: list[str]):
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


def calibration_batches(model: onnx.ModelProto, calib_data, inputs):
    """``(calibration batches or None, inputs)``: without ``inputs`` of their own, the
    first calibration batch resolves the shapes and is verified on."""
    if calib_data is None:
        return None, inputs
    batches = load_calibration(model, calib_data)
    return batches, batches[0] if inputs is None else inputs


def optimize(model_or_path, options: Options, *, input_shapes=None, inputs=None,
             verify: bool = True, max_error: float | None = None,
             calib_data=None) -> tuple[onnx.ModelProto, Report]:
    """Load, plan, rewrite and verify a model; see :func:`sconv_onnx.optimize`.

    A model given as a path is run by onnxruntime from its file, and its
    external data, above :data:`~sconv_onnx.modelio.LARGE_MODEL_BYTES`, is read
    in place (no copy of its weights: pages of the file, released between
    layers); a ``ModelProto`` is copied first, never modified.  With
    ``select="measured"``, the whole-model check may exclude layers and plan
    again (:mod:`sconv_onnx.revert`); the analysis is not repeated.
    """
    # the only reference, freed before verification; a large path's external data stays
    # in its files (modelio.mapped_file)
    source = load_model(model_or_path, mapped=True)
    given = isinstance(model_or_path, onnx.ModelProto)
    if given:
        # graphsurgeon's export writes into tensors it imported lazily (a Constant node's
        # value): work on a copy, so that the caller's model is never modified
        duplicate = onnx.ModelProto()
        duplicate.CopyFrom(source)
        source = duplicate
    batches, inputs = calibration_batches(source, calib_data, inputs)
    runnable = source if given else model_or_path
    analysis = analyse(source, options, input_shapes, inputs, strict=verify, batches=batches)
    measurer = Measurer(threads=options.threads) if options.select == "measured" else None
    excluded: dict[str, str] = {}
    checked: list[tuple[float, int]] = []  # the whole-model checks: (ratio, layers for speed)
    while True:
        timing = phase("timing candidates", unit="timings") if measurer else nullcontext()
        with timing as running:
            if measurer is not None:
                measurer.progress = running
            decided = plan(analysis, excluded, measurer, max_error)
        rewritten = rewrite(analysis, decided, fold_all=True)
        if measurer is None or not revert.for_speed(decided):
            break
        with phase("whole-model check"):
            decided.model_ratio = revert.whole_model_ratio(
                runnable, rewritten, analysis.verification_feeds(options.seed), measurer.threads)
        checked.append((decided.model_ratio, len(revert.for_speed(decided))))
        if decided.model_ratio <= revert.WHOLE_MODEL_MARGIN:
            break
        revert.exclude_least_gainful(decided, decided.model_ratio, excluded)
    if checked:
        decided.notes.append(revert.check_note(checked, decided.model_ratio is not None))
    layer_base = default_max_error(source, decided)
    if max_error is None and options.tol <= DEFAULT_TOL and options.target_macs is None:
        max_error = layer_base
    report = Report(
        plan=decided,
        before=model_stats_of(source, analysis.view.concrete_shapes),
        after=model_stats_of(rewritten, with_observed(
            rewritten, infer_tensor_shapes(rewritten, analysis.view.context),
            observer(rewritten, analysis.view.context, analysis.feeds, options.seed))[0]),
        input_shapes=dict(analysis.shapes.shapes),
        notes=analysis.notes + decided.notes,
        max_error=max_error,
    )
    report.notes += budget_notes(options.target_macs, report.before.macs, report.after.macs)
    unmet = _unmet_target(options, report)
    feeds = analysis.verification_feeds(options.seed) if verify else None
    shapes = analysis.shapes.shapes
    # The graph view holds its own copy of every weight a family read and is cyclic (nodes and
    # tensors point at each other): for a large model, collect it before the layer checks, and
    # drop the loaded model after them, before onnxruntime loads the models (a path input is
    # run from its file).  A collection takes ~0.1 s in a busy process: not worth it for a
    # small model.
    large = report.before.size > LARGE_MODEL_BYTES
    del analysis
    if large:
        gc.collect()
    if verify:
        with phase("layer checks"):
            report.layer_checks = layercheck.check_layers(
                source, rewritten, decided.rewritten, shapes,
                layer_base if max_error is None else max_error, options.seed, feeds)
    del source
    if large:
        gc.collect()
    if verify:
        with phase("verification"):
            report.errors = verify_outputs(runnable, rewritten, feeds, report.notes)
            if batches is not None:
                report.calibration = accuracy_proxy(run_batches(runnable, batches),
                                                    run_batches(rewritten, batches))
        if report.status == FAIL:
            raise VerificationError(f"verification failed: {report.outcome()}", report)
    if unmet:
        raise VerificationError(unmet, report)
    # the caller's model holds its weights (the input, when nothing was rewritten, would
    # still point at its file; both models are this run's own)
    return read_mapped(rewritten), report


def _unmet_target(options: Options, report: Report) -> str | None:
    """With ``strict_target``, why the MAC budget failed (None when met or not strict)."""
    if not options.strict_target:
        return None
    before, after = report.before.macs, report.after.macs
    if before and after is not None and after / before <= options.target_macs:
        return None
    reached = f"{after / before:.3f}" if before and after is not None else "an uncounted ratio"
    return (f"MAC budget {options.target_macs:g} not met (strict target): the model would have "
            f"{reached} of the original's MACs; see the report's notes for what stopped it")
