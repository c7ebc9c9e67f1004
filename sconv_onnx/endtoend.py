"""A MAC budget chosen, fitted and bounded on the whole model's output.

Per-layer output errors say little about what the model computes: an error
of 0.2 in a classifier's last layer changes its answers where 0.2 in an
early layer washes out.  So a budget (``target_macs = R``) runs in three
steps, each measured in onnxruntime on the calibration data:

1. **Sensitivity.**  Each layer the budget may move is rewritten alone onto
   one of its approximate candidates (the one nearest half its MACs) and the
   model run on the first :data:`PROBE_SAMPLES` calibration samples.  With
   ``e`` the layer's own relative output error and ``D`` how far the model's
   scores moved -- the mean KL divergence of the answers' distributions when
   the first output is a Softmax of logits, or class scores ``(N, K)`` /
   ``(N, T, K)`` themselves (:func:`divergence`: only classes that hold mass
   count), else the output's squared relative error, plus the
   squared relative error of any other output -- the layer's sensitivity is
   ``k = D / e^2``.  The greedy step
   (:func:`sconv_onnx.budget.greedy`) then weighs each move's added
   ``k (e_new^2 - e_now^2)`` per MAC saved: both measures are second order
   in a small change, so the layers' contributions add up.  A layer whose best move
   saves under :data:`MIN_SHARE` of the layers' MACs is not measured nor
   moved.
2. **Bound.**  The model is compared with the original on all the
   calibration data (:func:`sconv_onnx.calibration.accuracy_proxy`): the
   agreement of its answers (top-1, or per position for sequences) must be
   at least ``min_agreement`` (default :data:`DEFAULT_MIN_AGREEMENT`) where
   the first output has classes, and the outputs' relative error
   ``||y - y0||_F / ||y0||_F`` at most ``max_error`` where one is set (default
   :data:`DEFAULT_MAX_ERROR` for outputs without classes, where an agreement
   means nothing).  When the greedy sequence that meets
   the target breaks the bound (even fitted as in step 3), the longest
   prefix of it that holds is found by bisection (the error grows with the
   moves taken): over one-shot fits first, which are cheap, then above that
   prefix over sequentially fitted ones, which hold longer (PP-OCRv6 at
   ``min_agreement=0.97``: 6 of 41 moves one-shot); the plan says which MAC
   ratio that reached.
3. **Sequential fit.**  The layers taken are fitted again, one after the
   other in graph order (:meth:`~sconv_onnx.passes.base.Family.refit`), on
   the inputs each receives in the compressed model once those before it
   are refitted, to match what the original layer computed in the original
   model at the same positions: each also corrects the error of the layers
   before it.  (Refitting all layers at once on one compressed model's
   inputs overshoots: each corrects an upstream error that its upstream
   layers, refitted too, no longer make.)  The fit is kept when it brings
   the model's scores closer to the original's on the calibration data
   within the bound; one ORT run per layer taken, so it runs once, on the
   plan chosen.

The classifier (the layer computing a Softmax's logits) is never moved when
the calibration data has fewer than half its classes as answers
(:func:`unseen_classes`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx

from .calibration import accuracy_proxy, has_classes, sample_tensors
from .datafit import MAX_POSITIONS
from .runtime import session_with_outputs
from .shapes import graph_inputs

#: Calibration samples the sensitivity runs use (whole batches: at least this many).
PROBE_SAMPLES = 8
#: A layer whose best move saves less than this fraction of the layers' MACs is left alone.
MIN_SHARE = 1e-3
#: The default bound for outputs with classes: at most 1 answer in 100 may change.
DEFAULT_MIN_AGREEMENT = 0.99
#: The default bound for other outputs: relative error of the outputs.
DEFAULT_MAX_ERROR = 0.05
#: Calibration samples (float64) held at once by a sequential-fit pass, in bytes.
SAMPLE_BYTES = 256 << 20


@dataclass(frozen=True)
class Bound:
    """What a budget's model must keep on the calibration data (see the module doc)."""

    min_agreement: float | None = None
    max_error: float | None = None

    @staticmethod
    def of(min_agreement: float | None, max_error: float | None, has_classes: bool) -> Bound:
        """The bound for the kind of output: agreement (``min_agreement``, else
        :data:`DEFAULT_MIN_AGREEMENT`) where the first output has classes, plus
        ``max_error`` where given; the relative error alone (``max_error``, else
        :data:`DEFAULT_MAX_ERROR`) where it has none (an agreement means nothing there)."""
        if has_classes:
            return Bound(DEFAULT_MIN_AGREEMENT if min_agreement is None else min_agreement,
                         max_error)
        return Bound(None, DEFAULT_MAX_ERROR if max_error is None else max_error)

    def holds(self, proxy: dict) -> bool:
        agreement = agreement_of(proxy)
        if self.min_agreement is not None and agreement is not None and agreement < self.min_agreement:
            return False
        return self.max_error is None or proxy["rel_error"] <= self.max_error

    def describe(self) -> str:
        parts = []
        if self.min_agreement is not None:
            parts.append(f"agreement >= {self.min_agreement:g}")
        if self.max_error is not None:
            parts.append(f"relative error <= {self.max_error:g}")
        return " and ".join(parts)

    def to_dict(self) -> dict:
        return {"min_agreement": self.min_agreement, "max_error": self.max_error}


def agreement_of(proxy: dict) -> float | None:
    """The task-level agreement of an :func:`~sconv_onnx.calibration.accuracy_proxy`."""
    for key in ("top1_agreement", "position_agreement"):
        if proxy.get(key) is not None:
            return proxy[key]
    return None


def score_tensor(model: onnx.ModelProto) -> tuple[str, int | None]:
    """The tensor the sensitivities compare and, when it holds logits, their class axis:
    the input of a Softmax (or LogSoftmax) that makes the first output, else the
    first output itself (axis None here; :class:`Scorer` takes class scores of shape
    ``(N, K)`` or ``(N, T, K)``, as :func:`~sconv_onnx.calibration.accuracy_proxy`
    does, as logits along the last axis)."""
    first = model.graph.output[0].name
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    for node in model.graph.node:
        if first in node.output and node.op_type in ("Softmax", "LogSoftmax") and node.input:
            axis = next((a.i for a in node.attribute if a.name == "axis"), -1 if opset >= 13 else 1)
            return node.input[0], axis
    return first, None


def relative_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    reference, candidate = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    scale = float(np.linalg.norm(reference))
    return float(np.linalg.norm(candidate - reference)) / scale if scale > 0 else 0.0


def divergence(reference: np.ndarray, candidate: np.ndarray, axis: int) -> float:
    """The mean Kullback-Leibler divergence ``KL(p0 || p1)`` (nats) of the softmax
    distributions of logits ``reference`` and ``candidate`` along ``axis``: what a
    classifier's answers feel of a change, weighted by the classes that hold mass
    (an error in the logits of classes nobody picks costs nothing)."""
    def log_softmax(logits):
        logits = np.asarray(logits, np.float64)
        shifted = logits - logits.max(axis=axis, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))

    log_p, log_q = log_softmax(reference), log_softmax(candidate)
    return float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=axis)))


#: Ops a layer's output may pass through on its way to the scores and still be "the
#: layer that computes the scores" (a bias, a reshaping).
PASS_THROUGH = ("Add", "Identity", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze")


def scoring_layer(model: onnx.ModelProto, score: str) -> str | None:
    """The output of the Conv, ConvTranspose, Gemm or MatMul that computes ``score``
    through :data:`PASS_THROUGH` ops only (the classifier); None when there is none."""
    producers = {out: node for node in model.graph.node for out in node.output}
    constants = {init.name for init in model.graph.initializer}
    name = score
    for _ in range(8):
        node = producers.get(name)
        if node is None:
            return None
        if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            return node.output[0]
        if node.op_type not in PASS_THROUGH:
            return None
        varying = [inp for inp in node.input if inp and inp not in constants
                   and (inp not in producers or producers[inp].op_type != "Constant")]
        if len(varying) != 1:
            return None
        name = varying[0]
    return None


def unseen_classes(scores: np.ndarray, axis: int) -> str | None:
    """Why a fit of the layer computing ``scores`` (logits along ``axis``) cannot be
    judged on them: fewer than half the classes are ever the answer, so its errors
    on the others go unseen (an OCR head of 18710 characters, calibrated on words
    that use 40 of them).  None when the data covers the classes."""
    classes = scores.shape[axis]
    seen = len(np.unique(np.asarray(scores).argmax(axis)))
    if seen * 2 >= classes:
        return None
    return (f"computes the answers, and the calibration data has only {seen} of its "
            f"{classes} classes as an answer: its errors on the others would go unseen")


class Scorer:
    """Runs models on the calibration batches and compares them with the original's run."""

    def __init__(self, original: onnx.ModelProto, batches: list[dict]):
        self.batches = batches
        self.outputs = [out.name for out in original.graph.output]
        self.score, self.axis = score_tensor(original)
        counted, self.probe = 0, 0
        while self.probe < len(batches) and counted < PROBE_SAMPLES:
            counted += len(next(iter(batches[self.probe].values())))
            self.probe += 1
        self.reference = self._run(original, batches)
        self.classes = has_classes(self.reference[self.outputs[0]])
        if self.axis is None and self.classes:
            self.axis = -1  # class scores without a Softmax: compared as the logits they are

    def _run(self, model: onnx.ModelProto, batches: list[dict]) -> dict[str, np.ndarray]:
        sess = session_with_outputs(model, [self.score])
        names = [out.name for out in sess.get_outputs()]
        runs = [dict(zip(names, sess.run(names, feeds))) for feeds in batches]
        return {name: np.concatenate([run[name] for run in runs]) for name in names}

    def distance(self, values: dict[str, np.ndarray], rows: int | None = None) -> float:
        """How far a run's ``values`` are from the reference's first ``rows`` samples: for
        the scores, :func:`divergence` of logits, else the squared relative error; plus
        the squared relative error of every other output (all second order in a small
        change, so that layers add up)."""
        def reference(name):
            return self.reference[name][:rows]

        if self.axis is not None:
            moved = divergence(reference(self.score), values[self.score], self.axis)
        else:
            moved = relative_error(reference(self.score), values[self.score]) ** 2
        others = [name for name in self.outputs if name not in (self.score, self.outputs[0])]
        return moved + sum(relative_error(reference(name), values[name]) ** 2 for name in others)

    def probe_distance(self, model: onnx.ModelProto) -> float:
        """The scores' :meth:`distance` on the probe samples (the first batches)."""
        values = self._run(model, self.batches[:self.probe])
        return self.distance(values, len(values[self.score]))

    def fidelity(self, model: onnx.ModelProto) -> dict:
        """:func:`~sconv_onnx.calibration.accuracy_proxy` on all the batches, with the
        :meth:`distance` (``score_distance``)."""
        values = self._run(model, self.batches)
        proxy = accuracy_proxy({name: self.reference[name] for name in self.outputs},
                               {name: values[name] for name in self.outputs})
        proxy["score_distance"] = self.distance(values)
        return proxy


@dataclass(frozen=True)
class Chosen:
    """One layer's choice, as :func:`sconv_onnx.pipeline.rewrite` reads a plan's layers."""

    key: str
    chosen: object


@dataclass
class SinglePlan:
    """A plan of one rewritten layer, for a sensitivity run."""

    rewritten: list[Chosen]
    refit_of: dict = field(default_factory=dict)


def sensitivities(options: dict, layer_macs: dict[str, int], scorer: Scorer,
                  rewrite) -> dict[str, float]:
    """Per layer key of ``options`` (its approximate candidates), ``k = D / e^2`` (module
    doc); ``inf`` for a layer whose best move saves under :data:`MIN_SHARE` of the
    layers' MACs (``layer_macs``: every layer's, None where unknown).  ``rewrite(plan)``
    makes the model of a plan."""
    macs_total = sum(macs for macs in layer_macs.values() if macs)
    measured: dict[str, float] = {}
    for key, candidates in options.items():
        before = layer_macs[key]
        if before - min(candidate.macs() for candidate in candidates) < MIN_SHARE * macs_total:
            measured[key] = math.inf
            continue
        probe = min(candidates, key=lambda c: abs(c.macs() - before / 2))
        moved = scorer.probe_distance(rewrite(SinglePlan([Chosen(key, probe)])))
        measured[key] = moved / max(probe.output_error or 0.0, 1e-6) ** 2
    return measured


def _sample_bytes(site) -> int:
    """A bound on what one layer's calibration sample holds (float64)."""
    geometry = getattr(site, "geometry", None)
    group = getattr(geometry, "group", 1) or 1
    weight = site.weight
    return MAX_POSITIONS * 8 * max(1, weight.size // max(1, weight.shape[0])) * group


def sequential_fit(original: onnx.ModelProto, batches: list[dict], taken: list, seed: int,
                   rewrite) -> dict[int, object]:
    """Refits of the budget's layers (``taken``: ``(entry, candidate)`` in graph order),
    keyed by the candidate's ``id`` (module doc, step 3): one layer after the other,
    each on the inputs it receives once the layers before it are refitted.
    ``rewrite(refits)`` makes the compressed model with the refits so far."""
    refits: dict[int, object] = {}
    inputs = {inp.name for inp in graph_inputs(original)}
    requests = [(entry, candidate, entry.family.calibration(entry.site, seed))
                for entry, candidate in taken]
    requests = [item for item in requests if item[2] is not None and item[2].tensor not in inputs]
    for chunk in _chunks(requests):
        originals = sample_tensors(original, batches,
                                   [(request.tensor, request.sampler) for _, _, request in chunk])
        for (entry, candidate, request), before in zip(chunk, originals):
            now = sample_tensors(rewrite(refits), batches, [(request.tensor, request.sampler)])[0]
            refits[id(candidate)] = entry.family.refit(entry.site, candidate, now, before)
            del now
        del originals
    return refits


def _chunks(requests: list) -> list[list]:
    """``requests`` in runs of at most :data:`SAMPLE_BYTES` of samples."""
    chunks, size = [[]], 0
    for item in requests:
        need = _sample_bytes(item[0].site)
        if chunks[-1] and size + need > SAMPLE_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].append(item)
        size += need
    return [chunk for chunk in chunks if chunk]


@dataclass
class Trial:
    """A budget plan cut after ``moves`` greedy moves, its refits and its fidelity."""

    moves: int
    plan: object
    refits: dict
    fidelity: dict
    #: layers the budget may not move, with the reason (the classifier of unseen classes)
    held: dict = field(default_factory=dict)


def choose(decide, rewrite, entry_of, original: onnx.ModelProto, batches: list[dict],
           min_agreement: float | None, max_error: float | None, sequential: bool,
           seed: int) -> Trial:
    """The budget's plan, fitted and within the bound (module doc).

    ``decide(sensitivity, max_moves)`` is the selector with those settings;
    ``rewrite(plan, refits)`` the model of a plan; ``entry_of(candidate)`` the
    site entry a candidate belongs to; ``sequential``: try the sequential fit.
    """
    scorer = Scorer(original, batches)
    first = decide(None, None)
    layer_macs = {layer.key: layer.macs_before for layer in first.layers}
    held = {}
    classifier = scoring_layer(original, scorer.score)
    if scorer.axis is not None and classifier in first.budget_options:
        reason = unseen_classes(scorer.reference[scorer.score], scorer.axis)
        if reason:
            held[classifier] = reason
    options = {key: value for key, value in first.budget_options.items() if key not in held}
    sensitivity = sensitivities(options, layer_macs, scorer, lambda plan: rewrite(plan, {}))
    sensitivity.update(dict.fromkeys(held, math.inf))
    bound = Bound.of(min_agreement, max_error, scorer.classes)
    order = {out: index for index, node in enumerate(original.graph.node) for out in node.output}

    tried: dict[tuple, dict] = {}  # every trial scored, by (moves, refitted): the budget curve

    def scored(trial: Trial) -> Trial:
        tried[trial.moves, bool(trial.refits)] = {
            "moves": trial.moves, "macs_ratio": macs_ratio(trial.plan),
            "sequential_fit": bool(trial.refits), "holds": bound.holds(trial.fidelity),
            "agreement": agreement_of(trial.fidelity), "rel_error": trial.fidelity["rel_error"],
            "score_distance": trial.fidelity["score_distance"]}
        return trial

    def one_shot(moves: int | None) -> Trial:
        plan = decide(sensitivity, moves)
        return scored(Trial(plan.budget_moves if moves is None else moves, plan, {},
                            scorer.fidelity(rewrite(plan, {}))))

    def refitted(trial: Trial) -> Trial:
        """``trial`` fitted sequentially, where that brings the scores closer."""
        taken = sorted(((entry_of(layer.chosen), layer.chosen) for layer in trial.plan.rewritten
                        if layer.decided_by == "budget"), key=lambda item: order.get(
                            item[0].site.layers[0].key, 0))
        if not (sequential and taken):
            return trial
        refits = sequential_fit(original, batches, taken, seed,
                                lambda done: rewrite(trial.plan, done))
        fitted = scored(Trial(trial.moves, trial.plan, refits,
                              scorer.fidelity(rewrite(trial.plan, refits))))
        better = fitted.fidelity["score_distance"] < trial.fidelity["score_distance"]
        return fitted if better and (bound.holds(fitted.fidelity) or not bound.holds(
            trial.fidelity)) else trial

    def longest(low: int, high: int, attempt, best: Trial | None) -> Trial | None:
        """The trial of the longest prefix in ``[low, high)`` that holds, by bisection
        (``best``: the one at ``low``, None where not tried)."""
        while high - low > 1:
            middle = (low + high) // 2
            trial = attempt(middle)
            if bound.holds(trial.fidelity):
                low, best = middle, trial
            else:
                high = middle
        return best

    best = one_shot(None)
    complete = best.moves
    if not bound.holds(best.fidelity):
        best = refitted(best)
    if not bound.holds(best.fidelity):
        # one-shot fits first (cheap), then the longer prefixes that only their
        # sequential fit brings within the bound
        best = longest(0, complete, one_shot, None) or one_shot(0)
        if sequential:
            best = longest(best.moves, complete, lambda moves: refitted(one_shot(moves)), best)
    if not best.refits:
        best = refitted(best)
    best.held = held
    best.plan.budget_check = {
        "bound": bound.to_dict(), "holds": bound.holds(best.fidelity),
        "moves_taken": best.moves, "moves_to_target": complete,
        "sequential_fit": bool(best.refits), "calibration": best.fidelity,
        "sensitivities": {key: (value if math.isfinite(value) else None)
                          for key, value in sensitivity.items()},
        "trials": [tried[key] for key in sorted(tried)],
    }
    fit = ("layers refitted sequentially" if best.refits
           else "one-shot fits" + (" (the sequential fit was not kept)"
                                   if sequential and best.moves else ""))
    best.plan.notes.append(f"MAC budget bound ({bound.describe()} on the calibration data) "
                           f"{'holds' if bound.holds(best.fidelity) else 'BROKEN'}; {fit}")
    if best.moves < complete:
        best.plan.notes.append(
            f"MAC budget stopped at its bound ({bound.describe()} on the calibration data): "
            f"{best.moves} of the {complete} moves of its greedy sequence taken, "
            f"{macs_ratio(best.plan):.3f} of the layers' MACs")
    return best


def macs_ratio(plan) -> float:
    """The MACs of a plan's layers after over before (layers of known shapes only)."""
    known = [layer for layer in plan.layers if layer.macs_before is not None]
    before = sum(layer.macs_before for layer in known)
    after = sum(layer.macs_after if layer.rewritten else layer.macs_before for layer in known)
    return after / max(before, 1)
