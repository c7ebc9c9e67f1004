"""The whole-model check that ends ``select="measured"``, and what it reverts.

Layers whose single-layer timing won can still lose inside the network
(caches, layouts, scheduling): the whole model is the arbiter.  After each
rewrite, the original and the rewritten model run side by side
(:data:`WHOLE_MODEL_RUNS` rounds, :mod:`sconv_onnx.bench` rules).  Above
:data:`WHOLE_MODEL_MARGIN`, the half of the rewritten layers with the least
gain (measured, else predicted) is excluded, and the model is planned and
rewritten again.  Size-only rewrites (a shared generator, folded at load) are
not for speed: they are neither timed here nor reverted.  Excluded layers stay excluded (the selector keeps them,
whatever their family, and a MAC budget never picks them), so the loop ends
after at most as many rounds as there are layers.
"""

from __future__ import annotations

import os

import onnx

from .bench import bench
from .plan import Plan

#: Rounds of the whole-model A/B check.
WHOLE_MODEL_RUNS = 20
#: The whole rewritten model must measure below this fraction of the original.
#: Looser than the per-layer margin: the layers' gains add up, and a model
#: only a few percent faster (MobileNetV2) must not be reverted by noise.
WHOLE_MODEL_MARGIN = 0.99


def whole_model_ratio(original: onnx.ModelProto | str | os.PathLike, rewritten: onnx.ModelProto,
                      feeds: dict, threads: int) -> float:
    """Median per-round time ratio rewritten/original, side by side."""
    result = bench([original, rewritten], feeds, threads=threads, runs=WHOLE_MODEL_RUNS, warmup=3)
    return result.ratios[1]


def gain(layer) -> float:
    """A rewritten layer's time ratio: measured when it was, else predicted (lower: more gain)."""
    if layer.measured_ratio is not None:
        return layer.measured_ratio
    if layer.cost_before:
        return layer.cost_after / layer.cost_before
    return 1.0


def for_speed(plan: Plan) -> list:
    """``plan``'s rewritten layers that are rewritten for speed (not size-only)."""
    return [layer for layer in plan.rewritten if not layer.chosen.size_only]


def check_note(checked: list[tuple[float, int]], kept: bool) -> str:
    """The whole-model checks in words: each ``(ratio, layers rewritten for speed)`` in
    turn, and whether the last rewrite was kept (``kept``) or every speed layer reverted."""
    steps = "; then ".join(f"{ratio:.3f}x with {count} layers rewritten for speed"
                           for ratio, count in checked)
    verdict = ("kept" if kept else "every layer rewritten for speed reverted")
    return (f"whole-model check (side by side, rewritten over original; kept at most "
            f"{WHOLE_MODEL_MARGIN}): {steps}: {verdict}")


def exclude_least_gainful(plan: Plan, ratio: float, excluded: dict[str, str]) -> None:
    """Add the half of ``plan``'s layers rewritten for speed with the least gain (at least
    one) to ``excluded`` (layer key -> reason)."""
    rewritten = sorted(for_speed(plan), key=gain, reverse=True)
    for layer in rewritten[: max(1, len(rewritten) // 2)]:
        excluded[layer.key] = (
            f"reverted: the whole model ran {ratio:.2f}x with {len(rewritten)} layers rewritten"
        )
