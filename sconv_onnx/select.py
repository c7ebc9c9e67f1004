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
rewritten layer already computes (a shared pool: same key) cost it nothing;
the plan charges such a part to the first layer decided that uses it.

A group site's candidate (several layers, one joint move) is decided first,
by the cost model (or by MACs for ``select="all"``): it is taken when it
costs less than its layers would as decided alone (each its best single
candidate where that would be rewritten, else the layer as is), and those
layers are then its.  A *size-only* group candidate (a shared generator:
its layers' own ops, fewer params) is decided last, after the single layers
and a MAC budget: it covers those of its layers that nothing rewrote, when
it stores fewer params for them than they hold.  Group candidates are not timed alone and
are not offered to the MAC budget.
"""

from __future__ import annotations

import dataclasses
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
    #: per layer key, the weight of its output error at the model's output (the budget's
    #: greedy step, :func:`sconv_onnx.budget.greedy`; None: every layer alike)
    sensitivity: dict | None = None
    #: take only the budget's first moves (None: all until the target holds)
    max_moves: int | None = None
    #: the candidates were filtered for int8 (recorded in the plan)
    int8: bool = False


@dataclass
class _Layer:
    """A layer being decided: its info, its plan, and the sites that cover it."""

    info: LayerInfo
    plan: LayerPlan
    singles: list[SiteEntry] = field(default_factory=list)
    groups: list[SiteEntry] = field(default_factory=list)
    #: taken by a group candidate
    claimed: bool = False
    #: why a group candidate covering it was not taken
    group_note: str = ""


def select(entries: list[SiteEntry], settings: Settings, excluded: dict[str, str] | None = None,
           measurer: Measurer | None = None, families: tuple[str, ...] = ()) -> Plan:
    """Decide every layer that ``entries`` cover; see the module docstring.

    ``excluded`` maps layer keys to the reason they must be kept; ``measurer``
    times candidates for ``select="measured"``; ``families`` names the families
    asked (default: those that found a site).
    """
    excluded = dict(excluded or {})
    layers = _layers(entries)
    plan = Plan(tol=settings.tol, select=settings.select,
                families=families or tuple(dict.fromkeys(e.family.name for e in entries)),
                layers=[layer.plan for layer in layers.values()], int8=settings.int8)
    taken: dict[Hashable, str] = {}  # key of a shared part -> the layer charged for it
    sized = [entry for entry in entries if entry.site.is_group and entry.exact
             and all(candidate.size_only for candidate in entry.exact)]
    sized_ids = {id(entry) for entry in sized}
    for entry in entries:
        if entry.site.is_group and id(entry) not in sized_ids:
            _decide_group(entry, layers, settings, excluded, taken)
    for layer in layers.values():
        if not layer.claimed:
            _decide(layer, settings, excluded, measurer, taken)
    if settings.target_macs is not None:
        _apply_budget(plan, layers, settings, excluded, taken)
    for entry in sized:  # last: a budget may move these layers for MACs first
        _decide_size(entry, layers, excluded, taken, settings)
    return plan


def _richer(info: LayerInfo, other: LayerInfo) -> LayerInfo:
    """Of two families' views of one layer, the one that knows its cost (a family that
    skips a layer may not have read it)."""
    return other if not info.ops and other.ops else info


def _layers(entries: list[SiteEntry]) -> dict[str, _Layer]:
    infos: dict[str, LayerInfo] = {}
    for entry in entries:
        for info in entry.site.layers:
            infos[info.key] = _richer(infos[info.key], info) if info.key in infos else info
    layers = {key: _Layer(info, LayerPlan(
        node=info.node, op=info.op, weight_shape=info.weight_shape, key=info.key, group=info.group,
        weight_dtype=info.weight_dtype, params_before=info.params_before,
        macs_before=info.macs_before, cost_before=info.cost_before,
        params_after=info.params_before)) for key, info in infos.items()}
    for entry in entries:
        for info in entry.site.layers:
            kind = layers[info.key].groups if entry.site.is_group else layers[info.key].singles
            kind.append(entry)
    return layers


def _fill(layer: LayerPlan, candidate: Candidate, taken: dict[Hashable, str],
          member: str | None = None, first: bool = True) -> None:
    """Record ``candidate`` as ``layer``'s choice, its after-values less what ``taken`` shares.

    For a group candidate, ``member`` (a layer key) selects the parts of that
    layer and, when ``first``, the parts of the whole site."""
    mine = [part for part in candidate.parts
            if member is None or part.member == member or (first and part.member is None)]
    layer.shared = tuple(part.kind for part in mine if part.key is not None and part.key in taken)
    parts = [part for part in mine if part.key is None or part.key not in taken]
    layer.chosen, layer.family = candidate, candidate.family
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


def _ratio(after: float, before: float | None) -> float:
    return after / before if before else float("inf")


def _decide(layer: _Layer, settings: Settings, excluded: dict[str, str],
            measurer: Measurer | None, taken: dict[Hashable, str]) -> None:
    plan, info = layer.plan, layer.info
    options = [(entry, candidate) for entry in layer.singles for candidate in entry.exact]
    if not options:
        _no_candidate(layer, settings)
        return
    plan.best = _best([candidate for _, candidate in options])
    options.sort(key=lambda option: _score(option[1], settings.select, taken))
    choice = options[0][1]
    measured, note = None, ""
    if settings.select == "measured":
        measured, choice, note = _measure(options, measurer, taken)
    _fill(plan, choice, taken)
    plan.measured_ratio = measured
    ratio = _ratio(plan.cost_after, info.cost_before)
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


def _no_candidate(layer: _Layer, settings: Settings) -> None:
    """A layer no single-layer family offers anything for: why it is kept."""
    plan, info = layer.plan, layer.info
    entries = layer.singles + layer.groups
    skips = list(dict.fromkeys(e.site.skip_reason for e in entries if e.site.skip_reason))
    filtered = [f"{e.family.name}: {e.site.filtered}" for e in entries if e.site.filtered]
    if layer.group_note:
        plan.decided_by = "all" if settings.select == "all" else "cost"
        plan.reason = layer.group_note
    elif filtered:  # structure found, but the run's settings refuse its rewrites (e.g. int8)
        plan.decided_by, plan.reason = "skipped", "; ".join(filtered)
    elif skips and len(skips) == len({id(e) for e in entries}):
        plan.decided_by, plan.reason = "skipped", "; ".join(skips)
    else:
        plan.decided_by = "no_candidate"
        tol = effective_tol(settings.tol, info.weight_dtype) if info.weight_dtype else settings.tol
        plan.reason = f"no structure within tol {tol:g}"


def _exclude(plan: LayerPlan, why: str) -> None:
    plan.decision, plan.decided_by, plan.excluded, plan.reason = KEEP, "excluded", why, why
    plan.folded = ()


def _measure(options: list[tuple[SiteEntry, Candidate]], measurer: Measurer | None, taken):
    """``(measured ratio, candidate, note)`` for ``select="measured"``.

    The cost model's top candidates are timed, each by its own family's
    ``measure`` hook; one a family cannot time drops out.  The cost model's
    choice stays unless another is clearly faster; when the cost model's
    choice itself cannot be timed, the layer is decided by the cost model."""
    top = options[:MEASURED_CANDIDATES]
    first, choice = top[0]
    if measurer is None:
        return None, choice, " (not measured: no timer)"
    ratios: dict[int, float] = {}
    by_entry: dict[int, list[int]] = {}
    for index, (entry, _) in enumerate(top):
        by_entry.setdefault(id(entry), []).append(index)
    for indices in by_entry.values():
        entry = top[indices[0]][0]
        trials = [(top[i][1], top[i][1].shared(taken)) for i in indices]
        timed = entry.family.measure(entry.site, trials, measurer)
        if timed is None:
            continue
        if len(timed) != len(trials):
            raise ValueError(f"family {entry.family.name!r} timed {len(timed)} of "
                             f"{len(trials)} candidates")
        ratios.update(zip(indices, timed))
    if 0 not in ratios:
        why = ("input shape unknown" if first.site.layer.macs_before is None
               else f"{first.family.name} cannot time this {first.site.layer.op} alone")
        return None, choice, f" (not measured: {why})"
    fastest = min(ratios, key=ratios.__getitem__)
    pick = fastest if ratios[fastest] < MEASURED_SWITCH * ratios[0] else 0
    return ratios[pick], top[pick][1], ""


def _alone(member: _Layer, settings: Settings, taken) -> tuple:
    """A group member's score as decided alone: its best single candidate where that
    would be rewritten, else the layer as is."""
    info = member.info
    own = [candidate for single in member.singles for candidate in single.exact]
    best = min((_score(c, settings.select, taken) for c in own), default=None)
    if best is not None and (settings.select == "all"
                             or _ratio(best[0], info.cost_before) <= cost.GAIN_MARGIN):
        return best
    if settings.select == "all":
        return info.comparable_macs, info.cost_before
    return info.cost_before, info.params_before


def _decide_group(entry: SiteEntry, layers: dict[str, _Layer], settings: Settings,
                  excluded: dict[str, str], taken: dict[Hashable, str]) -> None:
    """Take ``entry``'s best group candidate when it beats its layers decided alone."""
    members = [layers[info.key] for info in entry.site.layers]
    if not entry.exact or any(m.claimed or m.info.key in excluded for m in members):
        return
    if any(m.info.cost_before is None for m in members):
        return
    group = min(entry.exact, key=lambda candidate: _score(candidate, settings.select, taken))
    alone = tuple(sum(values) for values in zip(*(_alone(m, settings, taken) for m in members)))
    together = _score(group, settings.select, taken)
    before = sum(m.info.cost_before for m in members)
    predicted = group.cost(taken) / before
    names = ", ".join(m.info.node for m in members)
    label = f"{group.family} {group.label} with {names}"
    if together >= alone or (settings.select != "all" and predicted > cost.GAIN_MARGIN):
        for member in members:
            member.group_note = (f"group rewrite ({label}) not taken: predicted time "
                                 f"{predicted:.2f}x together")
        return
    note = " (not measured: a group is decided by the cost model)" if (
        settings.select == "measured") else ""
    _claim(members, group, taken, settings,
           f"group rewrite ({label}): predicted time {predicted:.2f}x{note}")
    for key in group.keys:
        taken.setdefault(key, members[0].info.key)


def _decide_size(entry: SiteEntry, layers: dict[str, _Layer], excluded: dict[str, str],
                 taken: dict[Hashable, str], settings: Settings) -> None:
    """Take ``entry``'s size-only candidate for its layers that stayed as they were, when it
    stores fewer params for them (the parts of the whole site go to the first of them)."""
    members = [layers[info.key] for info in entry.site.layers]
    left = [m for m in members if m.plan.decision != REWRITE and m.info.key not in excluded]
    if not left:
        return
    group = min(entry.exact, key=lambda candidate: candidate.params(taken))
    keys = tuple(m.info.key for m in left)
    covered = dataclasses.replace(group, members=keys, parts=tuple(
        part for part in group.parts if part.member is None or part.member in keys))
    before = sum(m.info.params_before for m in left)
    if covered.params(taken) >= before:
        return
    label = f"{group.family} {group.label}, taken for {len(left)} of them"
    _claim(left, covered, taken, settings,
           f"size ({label}): params {covered.params(taken) / before:.2f}x, the same ops")


def _claim(members: list[_Layer], group: Candidate, taken: dict[Hashable, str],
           settings: Settings, reason: str) -> None:
    """Record ``group`` as the choice of each of ``members`` (the parts of the whole site,
    and a folded node, go to the first)."""
    for index, member in enumerate(members):
        _fill(member.plan, group, taken, member.info.key, first=index == 0)
        member.plan.best = group
        member.plan.decision = REWRITE
        member.plan.decided_by = "all" if settings.select == "all" else "cost"
        member.plan.measured_ratio = None
        member.plan.reason = reason
        member.plan.folded = group.absorbs if index == 0 else ()
        member.claimed = True


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
    moves = budget.greedy(options, current, total, settings.target_macs * original,
                          settings.sensitivity)
    plan.budget_options = {key: list(value) for key, value in options.items()}
    plan.budget_moves = len(moves)
    wanted = {layer for layer, _, _ in moves}
    if settings.max_moves is not None:
        moves = moves[:settings.max_moves]
    chosen = {layer: candidate for layer, candidate, _ in moves}
    total = moves[-1][2] if moves else total
    for key in options:
        layer = layers[key].plan
        if key not in chosen:
            layer.reason += ("; not moved: the budget stopped at its bound" if key in wanted
                             else "; not needed for the MAC budget")
            continue
        _fill(layer, chosen[key], taken)
        layer.decision, layer.decided_by, layer.measured_ratio = REWRITE, "budget", None
        layer.folded = chosen[key].absorbs
        layer.reason = (f"budget: output error {layer.output_error:.3g} "
                        f"(weight-space alpha: {layer.output_error_weight_alpha:.3g})")
        for part_key in chosen[key].keys:
            taken.setdefault(part_key, key)
    reached = total / original if original else 1.0
    cut = settings.max_moves is not None and settings.max_moves < plan.budget_moves
    if reached > settings.target_macs and not cut:  # a cut is the caller's to explain
        plan.notes.append(f"MAC budget {settings.target_macs:g} not reachable: every candidate "
                          f"taken, {reached:.3f} of the original layers' MACs")
    unknown = len(plan.layers) - len(known)
    if unknown:
        plan.notes.append(f"{unknown} layers with unknown MACs are outside the budget")
