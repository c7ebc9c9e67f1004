"""The selector: one place that decides every layer, among every family's candidates.

Input: the sites the families found, each with its candidates (pure data,
computed once per run), in the order found.  Output: the
:class:`~sconv_onnx.plan.Plan`.  Rules, the same for every family:

* ``select="cost"`` (default): per layer the candidate of least predicted
  time (:mod:`sconv_onnx.cost`), rewritten when that is at most
  :data:`~sconv_onnx.cost.GAIN_MARGIN` of the original's.
* ``select="all"``: per layer the candidate of fewest MACs (then least
  time), always rewritten.
* ``select="measured"``: the cost model's best :data:`MEASURED_CANDIDATES`
  are timed on the layer alone (the family's ``measure`` hook); the cost
  model's choice stays unless another measured below :data:`MEASURED_SWITCH`
  of its time, and the layer is rewritten only when its choice measured at
  most :data:`MEASURED_MARGIN` of the original.  A layer whose family cannot
  time it is decided by the cost model (the reason says so).
* A MAC budget (``target_macs``) then moves layers that were not rewritten
  onto approximate candidates, least output error per MAC saved first
  (:func:`sconv_onnx.budget.greedy`).
* ``excluded`` layers (the whole-model check of ``select="measured"``,
  :mod:`sconv_onnx.revert`) are kept whatever the rule says, and the budget
  never picks them.

Layers are decided in the order found.  A candidate's parts that an earlier
rewritten layer already computes (a shared pool: same key) cost it nothing.
A group site's candidate (several layers, one joint move) is decided first:
it is taken when it costs less than the best single-layer candidates of its
layers together (fewer MACs for ``select="all"``), and those layers are then
its.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

from . import budget, cost
from .measure import Measurer
from .passes.base import Family, LayerInfo, Site
from .plan import KEEP, REWRITE, Candidate, LayerPlan, Plan, SelectMode
from .structure import effective_tol

#: Candidates (best predicted first) timed per layer by ``select="measured"``.
MEASURED_CANDIDATES = 4
#: A measured rewrite must run at most this fraction of the original's time.
MEASURED_MARGIN = 0.97
#: Another candidate replaces the cost model's choice only when it measured
#: below this fraction of that choice's time (single-layer timings vary by a
#: few percent from run to run and from isolation to the whole network).
MEASURED_SWITCH = 0.9


@dataclass
class SiteEntry:
    """A site, the family that found it and its candidates."""

    family: Family
    site: Site
    candidates: list[Candidate]

    @property
    def exact(self) -> list[Candidate]:
        """The candidates within the tolerance (not the budget's approximations)."""
        return [candidate for candidate in self.candidates if not candidate.approximate]


@dataclass(frozen=True)
class Settings:
    """How to select: the tolerance (for the reasons), the mode, and an optional MAC budget."""

    tol: float
    select: SelectMode
    target_macs: float | None = None
    alpha_fit: str | None = None


@dataclass
class _Layer:
    """A layer being decided: its info, its plan, and the sites that cover it."""

    info: LayerInfo
    plan: LayerPlan
    singles: list[SiteEntry] = field(default_factory=list)
    claimed: bool = False


def select(entries: list[SiteEntry], settings: Settings, excluded: dict[str, str] | None = None,
           measurer: Measurer | None = None) -> Plan:
    """Decide every layer that ``entries`` cover; see the module docstring."""
    excluded = dict(excluded or {})
    layers = _layers(entries)
    plan = Plan(tol=settings.tol, select=settings.select,
                families=tuple(dict.fromkeys(entry.family.name for entry in entries)),
                layers=[layer.plan for layer in layers.values()])  # the caller may name more
    taken: dict[Hashable, str] = {}  # key of a shared part -> the layer that emits it
    for entry in entries:
        if entry.site.is_group:
            _decide_group(entry, layers, settings, excluded, taken)
    for layer in layers.values():
        if not layer.claimed:
            _decide(layer, settings, excluded, measurer, taken)
    if settings.target_macs is not None:
        _apply_budget(plan, layers, settings, excluded, taken)
    return plan


def _layers(entries: list[SiteEntry]) -> dict[str, _Layer]:
    layers: dict[str, _Layer] = {}
    for entry in entries:
        for info in entry.site.layers:
            if info.key not in layers:
                layers[info.key] = _Layer(info, LayerPlan(
                    node=info.node, op=info.op, weight_shape=info.weight_shape, key=info.key,
                    group=info.group, weight_dtype=info.weight_dtype,
                    params_before=info.params_before, macs_before=info.macs_before,
                    cost_before=info.cost_before, params_after=info.params_before))
            if not entry.site.is_group:
                layers[info.key].singles.append(entry)
    return layers


def _fill(layer: LayerPlan, candidate: Candidate, taken: dict[Hashable, str],
          member: str | None = None, first: bool = True) -> None:
    """Record ``candidate`` as ``layer``'s choice, its after-values less what ``taken`` shares.

    For a group candidate, ``member`` selects the parts of that layer (and, when
    ``first``, the parts of the whole site)."""
    parts = [part for part in candidate.parts if part.key is None or part.key not in taken]
    if member is not None:
        parts = [part for part in parts if part.layer == member or (first and part.layer is None)]
    layer.chosen, layer.family = candidate, candidate.family
    layer.shared = candidate.shared(taken)
    layer.params_after = sum(part.params for part in parts)
    layer.cost_after = sum(part.cost for part in parts)
    layer.macs_after = (round(sum(part.macs for part in parts))
                        if layer.macs_before is not None else None)
    layer.output_error = candidate.output_error
    layer.output_error_weight_alpha = candidate.output_error_weight_alpha


def _best(options: list[Candidate]) -> Candidate:
    """The most compressive candidate: each family lists its own first; fewest params among those."""
    firsts = {}
    for candidate in options:
        firsts.setdefault(candidate.family, candidate)
    return min(firsts.values(), key=lambda candidate: candidate.params())


def _score(candidate: Candidate, mode: SelectMode, taken) -> tuple:
    if mode == "all":
        return candidate.macs(taken), candidate.cost(taken)
    return candidate.cost(taken), candidate.params(taken)


def _decide(layer: _Layer, settings: Settings, excluded: dict[str, str],
            measurer: Measurer | None, taken: dict[Hashable, str]) -> None:
    plan, info = layer.plan, layer.info
    options = [(entry, candidate) for entry in layer.singles for candidate in entry.exact]
    if not options:
        skips = [entry.site.skip_reason for entry in layer.singles if entry.site.skip_reason]
        if skips and len(skips) == len(layer.singles):
            plan.decided_by, plan.reason = "skipped", "; ".join(dict.fromkeys(skips))
        else:
            plan.decided_by = "no_candidate"
            tol = effective_tol(settings.tol, info.weight_dtype) if info.weight_dtype else settings.tol
            plan.reason = f"no structure within tol {tol:g}"
        return
    plan.best = _best([candidate for _, candidate in options])
    options.sort(key=lambda option: _score(option[1], settings.select, taken))
    choice = options[0][1]
    measured, note = None, ""
    if settings.select == "measured":
        measured, choice, note = _measure(options, measurer, taken)
    _fill(plan, choice, taken)
    plan.measured_ratio = measured
    ratio = plan.cost_after / info.cost_before if info.cost_before else float("inf")
    sharing = f"; shares {'+'.join(plan.shared)}" if plan.shared else ""
    label = f"{choice.label} {choice.lowering}".strip()
    if settings.select == "all":
        plan.decision, plan.decided_by = REWRITE, "all"
        plan.reason = f"select=all; predicted time {ratio:.2f}x{sharing}"
    elif measured is not None:
        plan.decided_by = "measured"
        plan.decision = REWRITE if measured <= MEASURED_MARGIN else KEEP
        plan.reason = (f"measured {measured:.2f}x (predicted {ratio:.2f}x){sharing}"
                       if plan.rewritten else f"no measured gain ({label}: {measured:.2f}x)")
    else:
        plan.decided_by = "cost"
        plan.decision = REWRITE if ratio <= cost.GAIN_MARGIN else KEEP
        plan.reason = (f"predicted time {ratio:.2f}x{sharing}" if plan.rewritten
                       else f"no gain predicted ({label}: {ratio:.2f}x)")
    plan.reason += note
    if plan.rewritten and choice.absorbs:
        plan.folded = choice.absorbs
        plan.reason += f"; folds {', '.join(choice.absorbs)}"
    if plan.rewritten and info.key in excluded:
        _exclude(plan, excluded[info.key])
    if plan.rewritten:
        for key in choice.keys:
            taken.setdefault(key, info.key)


def _exclude(plan: LayerPlan, why: str) -> None:
    plan.decision, plan.decided_by, plan.excluded, plan.reason = KEEP, "excluded", why, why
    plan.folded = ()


def _measure(options: list[tuple[SiteEntry, Candidate]], measurer: Measurer | None, taken):
    """``(measured ratio, candidate, note)`` for ``select="measured"``: the cost model's top
    candidates timed; its choice kept unless another is clearly faster."""
    top = options[:MEASURED_CANDIDATES]
    entry, choice = top[0]
    if measurer is None:
        return None, choice, " (not measured: no timer)"
    trials = [(candidate, candidate.shared(taken)) for _, candidate in top]
    ratios = entry.family.measure(entry.site, trials, measurer) if all(
        option_entry is entry for option_entry, _ in top) else None
    if ratios is None:
        why = f"{entry.family.name} cannot time this {entry.site.layer.op} alone"
        if entry.site.layer.macs_before is None:
            why = "input shape unknown"
        return None, choice, f" (not measured: {why})"
    fastest = min(range(len(top)), key=ratios.__getitem__)
    pick = fastest if ratios[fastest] < MEASURED_SWITCH * ratios[0] else 0
    return ratios[pick], top[pick][1], ""


def _decide_group(entry: SiteEntry, layers: dict[str, _Layer], settings: Settings,
                  excluded: dict[str, str], taken: dict[Hashable, str]) -> None:
    """Take ``entry``'s best group candidate when it beats its layers' best single ones."""
    members = [layers[info.key] for info in entry.site.layers]
    if not entry.exact or any(m.claimed or m.info.key in excluded for m in members):
        return
    if any(m.info.cost_before is None for m in members):
        return
    options = sorted(entry.exact, key=lambda candidate: _score(candidate, settings.select, taken))
    group = options[0]
    singles = []
    for member in members:
        own = [candidate for single in member.singles for candidate in single.exact]
        if own:
            singles.append(min(_score(c, settings.select, taken) for c in own))
        else:
            before = member.info
            singles.append((before.macs_before or 0, before.cost_before) if settings.select == "all"
                           else (before.cost_before, before.params_before))
    alone = tuple(sum(values) for values in zip(*singles))
    together = _score(group, settings.select, taken)
    before_cost = sum(m.info.cost_before for m in members)
    if together >= alone:
        return
    if settings.select != "all" and group.cost(taken) > cost.GAIN_MARGIN * before_cost:
        return
    names = ", ".join(m.info.node for m in members)
    for index, member in enumerate(members):
        _fill(member.plan, group, taken, member.info.key, first=index == 0)
        member.plan.best = group
        member.plan.decision = REWRITE
        member.plan.decided_by = "all" if settings.select == "all" else "cost"
        member.plan.reason = (f"group rewrite with {names}: predicted time "
                              f"{group.cost(taken) / before_cost:.2f}x together")
        member.claimed = True
    for key in group.keys:
        taken.setdefault(key, members[0].info.key)


def _apply_budget(plan: Plan, layers: dict[str, _Layer], settings: Settings,
                  excluded: dict[str, str], taken: dict[Hashable, str]) -> None:
    """Move layers onto approximate candidates until the MAC budget holds."""
    plan.target_macs, plan.alpha_fit = settings.target_macs, settings.alpha_fit
    options: dict[str, list[Candidate]] = {}
    current: dict[str, tuple[int, float]] = {}
    for key, layer in layers.items():
        if layer.plan.macs_before is None:
            continue
        rewritten = layer.plan.rewritten
        current[key] = ((layer.plan.macs_after, layer.plan.output_error or 0.0) if rewritten
                        else (layer.plan.macs_before, 0.0))
        approximate = [candidate for entry in layer.singles for candidate in entry.candidates
                       if candidate.approximate]
        if approximate and not rewritten and not layer.claimed:
            if key in excluded:
                _exclude(layer.plan, excluded[key])
            else:
                options[key] = approximate
    known = [layer.plan for layer in layers.values() if layer.plan.macs_before is not None]
    original = sum(layer.macs_before for layer in known)
    total = sum(layer.macs_after if layer.rewritten else layer.macs_before for layer in known)
    chosen, total = budget.greedy(options, current, total, settings.target_macs * original)
    for key in options:
        layer = layers[key].plan
        if key not in chosen:
            layer.reason += "; not needed for the MAC budget"
            continue
        _fill(layer, chosen[key], taken)
        layer.decision, layer.decided_by = REWRITE, "budget"
        layer.reason = (f"budget: output error {layer.output_error:.3g} "
                        f"(weight-space alpha: {layer.output_error_weight_alpha:.3g})")
        for part_key in chosen[key].keys:
            taken.setdefault(part_key, key)
    reached = total / original if original else 1.0
    if reached > settings.target_macs:
        plan.notes.append(f"MAC budget {settings.target_macs:g} not reachable: every candidate "
                          f"taken, {reached:.3f} of the original layers' MACs")
    unknown = len(plan.layers) - len(known)
    if unknown:
        plan.notes.append(f"{unknown} layers with unknown MACs are outside the budget")
