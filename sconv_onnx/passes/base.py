"""The plug-in protocol of the structure families, their registry, and the emitter.

A family is one way of factoring a layer's constant weights (box structure,
interleaved group convs, shared slice generators, low-rank ...).  It plugs
in with three methods and a name:

* ``find(view) -> [Site]``: the places it could rewrite in the model
  (:class:`~sconv_onnx.view.ModelView`); a site covers one layer, or
  several for a cross-layer family (a *group* site).  A site it cannot
  handle still comes back, with a ``skip_reason``, so that the plan says why.
* ``candidates(site, tol) -> [Candidate]``: pure data
  (:class:`~sconv_onnx.plan.Candidate`): the ways to rewrite the site
  within the tolerance, most compressive first, each with its residual,
  its cost :class:`~sconv_onnx.plan.Part` s and a ``payload`` for emit.
  No graph is touched; the results are cached for the whole run.
* ``emit(site, candidate, emitter)``: the nodes for a chosen candidate,
  written through an :class:`Emitter` (a copy of the model's graph: reach
  the site's node with ``emitter.node``, and new nodes are inserted before
  it; the graph is sorted afterwards if an emit left it out of order).

Optional hooks (the defaults say "not supported"):

* ``measure(site, trials, timer)``: time candidates on the layer alone
  (``select="measured"``);
* ``calibration(site, seed)`` and ``calibrate(site, candidates, sample, budget,
  alpha_fit)``: which activations to sample from the calibration data, and
  the candidates' output errors on them (plus approximate candidates for a
  MAC budget);
* ``refit(site, candidate, inputs, originals)``: an approximate candidate
  fitted again for the inputs its layer receives in a partly compressed
  model (``inputs``, sampled as ``calibration`` asks) to match what the
  original layer computed in the original model (``originals``: the same
  positions sampled there) -- the budget's sequential fit.

The selector (:mod:`sconv_onnx.select`) chooses among the candidates of
every family for every layer; families never decide.  :func:`register`
adds a family (a test can register its own); ``--families`` picks some.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from ..cost import OpCost, total_cost
from ..errors import InputError, param
from ..plan import Candidate
from .graphs import is_overridable, mark_overridable, walk

if TYPE_CHECKING:  # only for annotations: no import cycle at run time
    from ..measure import Measurer
    from ..view import ModelView


@dataclass(frozen=True)
class LayerInfo:
    """What the plan shows of a layer before any decision.

    ``key`` is the layer's first output tensor (unique in a model: SSA), ``node``
    its display name; ``params_before`` its weights (and bias); ``ops`` the
    layer as the cost model sees it (per output position, :mod:`sconv_onnx.cost`)
    and ``positions`` its output positions at batch 1 (None when unknown).
    """

    key: str
    node: str
    op: str
    weight_shape: tuple[int, ...] = ()
    group: int = 1
    weight_dtype: str = ""
    params_before: int = 0
    ops: tuple[OpCost, ...] = ()
    positions: int | None = None

    @property
    def macs_before(self) -> int | None:
        """MACs at batch 1 (:mod:`sconv_onnx.macs`); None when the shapes are unknown."""
        if not self.ops or self.positions is None:
            return None
        return round(sum(op.macs for op in self.ops) * self.positions)

    @property
    def comparable_macs(self) -> float | None:
        """MACs in the convention of :attr:`sconv_onnx.plan.Part.macs`: per run, or per
        output position when the shapes are unknown."""
        return sum(op.macs for op in self.ops) * (self.positions or 1) if self.ops else None

    @property
    def cost_before(self) -> float | None:
        """The cost model's time (:func:`sconv_onnx.cost.total_cost`); None without ops."""
        return total_cost(self.positions, self.ops) if self.ops else None


@dataclass(kw_only=True)
class Site:
    """A place a family can rewrite: its layers (one, or several for a group site).

    Families subclass it with what their ``candidates`` and ``emit`` need.
    """

    family: str
    layers: tuple[LayerInfo, ...]
    skip_reason: str | None = None
    #: why the run removed every candidate the family offered (e.g. ``int8=True``)
    filtered: str | None = None

    @property
    def layer(self) -> LayerInfo:
        """The layer of a single-layer site."""
        return self.layers[0]

    @property
    def is_group(self) -> bool:
        return len(self.layers) > 1


@dataclass(frozen=True)
class CalibrationRequest:
    """A site's wish from the calibration data: ``tensor``'s value on every batch, kept
    by ``sampler(value, batch_count) -> array`` (concatenated on axis 1)."""

    tensor: str
    sampler: Callable[[np.ndarray, int], np.ndarray]


class Family:
    """Base class of a structure family; see the module docstring for the protocol."""

    #: the name users give to ``--families`` and the report shows per layer
    name: str = ""
    #: one line for ``--help`` and the docs
    description: str = ""

    def find(self, view: ModelView) -> list[Site]:
        raise NotImplementedError

    def candidates(self, site: Site, tol: float) -> list[Candidate]:
        raise NotImplementedError

    def emit(self, site: Site, candidate: Candidate, emitter: Emitter) -> None:
        raise NotImplementedError

    def measure(self, site: Site, trials: list[tuple[Candidate, tuple[str, ...]]],
                timer: Measurer) -> list[float] | None:
        """Each candidate's time over the original layer's, timed on the layer alone;
        each trial names the kinds of the candidate's parts that another layer computes
        (they come in as inputs).  None: this site cannot be timed alone."""
        return None

    def calibration(self, site: Site, seed: int) -> CalibrationRequest | None:
        """What to sample from the calibration data for ``site`` (``seed``: for any random
        subsampling); None: nothing."""
        return None

    def calibrate(self, site: Site, candidates: list[Candidate], sample: np.ndarray,
                  budget: bool, alpha_fit: str) -> list[Candidate]:
        """``candidates`` with their output errors on ``sample`` filled in, and with
        ``budget``, approximate candidates added (alphas fitted per ``alpha_fit``)."""
        return candidates

    def refit(self, site: Site, candidate: Candidate, inputs: np.ndarray,
              originals: np.ndarray) -> Candidate:
        """``candidate`` (approximate, this family's) with its factors fitted to map
        ``inputs`` to the original layer's outputs on ``originals``, and its output
        error there; the same structure and cost.  Default: unchanged."""
        return candidate


# --- registry ----------------------------------------------------------------------------------

_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add ``family`` (by its ``name``) to the families every run asks; returns it."""
    if not family.name or "," in family.name:
        raise ValueError(f"a family needs a name without commas, got {family.name!r}")
    if family.name in _REGISTRY and _REGISTRY[family.name] is not family:
        raise ValueError(f"a family named {family.name!r} is registered already")
    _REGISTRY[family.name] = family
    return family


def unregister(name: str) -> None:
    """Remove the family ``name`` (no error when it is not registered)."""
    _REGISTRY.pop(name, None)


def registered() -> tuple[str, ...]:
    """The names of the registered families, in registration order."""
    return tuple(_REGISTRY)


def resolve(names: Iterable[str] | str | None = None) -> list[Family]:
    """The families named (a list, or one comma-separated string), every one when None.

    Raises :class:`InputError` for an unknown or empty selection.
    """
    if names is None:
        return list(_REGISTRY.values())
    if isinstance(names, str):
        names = names.split(",")
    wanted = list(dict.fromkeys(name.strip() for name in names if name.strip()))
    unknown = [name for name in wanted if name not in _REGISTRY]
    if unknown or not wanted:
        known = ", ".join(_REGISTRY) or "none"
        what = f"unknown family {', '.join(map(repr, unknown))}" if unknown else "no family given"
        raise InputError(f"{param('families')}: {what} (registered: {known})")
    return [_REGISTRY[name] for name in wanted]


# --- emitting ----------------------------------------------------------------------------------


class NodeEmitter:
    """Adds uniquely named nodes to ``graph`` just before ``anchor``."""

    def __init__(self, graph: gs.Graph, anchor: gs.Node, base: str, taken: set[str]):
        self.graph = graph
        self.anchor = anchor
        self.base = base
        self.taken = taken

    def name(self, suffix: str) -> str:
        candidate = f"{self.base}/sconv_{suffix}"
        counter = 1
        while candidate in self.taken:
            counter += 1
            candidate = f"{self.base}/sconv_{suffix}_{counter}"
        self.taken.add(candidate)
        return candidate

    def constant(self, suffix: str, values: np.ndarray) -> gs.Constant:
        # np.ascontiguousarray would turn a 0-d array (CumSum's axis) into shape (1,)
        return gs.Constant(self.name(suffix), np.array(values, order="C"))

    def node(self, op: str, suffix: str, inputs: list, attrs: dict | None = None,
             output: gs.Variable | None = None) -> gs.Variable:
        """Insert ``op`` and return its output: a new tensor, or ``output`` when given."""
        output = output if output is not None else gs.Variable(self.name(f"{suffix}_out"))
        node = gs.Node(op, self.name(suffix), attrs or {}, list(inputs), [output])
        self.graph.nodes.insert(self.graph.nodes.index(self.anchor), node)
        return output


def all_names(graph: gs.Graph) -> set[str]:
    """Every tensor and node name of ``graph`` and its subgraphs (taken for new nodes)."""
    names: set[str] = set()
    scopes: dict[int, gs.Graph] = {id(graph): graph}
    for owner, node in walk(graph):
        scopes[id(owner)] = owner
        if node.name:
            names.add(node.name)
    for scope in scopes.values():
        names.update(scope.tensors().keys())
    return names


class Emitter:
    """Where families write a rewrite: a copy of the analysed graph (``copy=True``), or the
    graph itself.

    Sites hold the nodes of the analysed graph; :meth:`node` and :meth:`graph_of`
    give their counterparts here, so that the analysed graph stays as it was
    and can be rewritten again with another plan.  :meth:`shared` hands out a
    tensor that several layers compute alike (a shared pool) once.
    """

    def __init__(self, source: gs.Graph, copy: bool = True):
        self.graph = source.copy() if copy else source
        if copy:  # a copy's tensors are new objects: carry the overridable marks over
            copied = self.graph.tensors()
            for name, tensor in source.tensors().items():
                if is_overridable(tensor) and name in copied:
                    mark_overridable(copied[name])
        self._nodes: dict[int, gs.Node] = {}
        self._owners: dict[int, gs.Graph] = {}
        for (_, node), (owner_copy, node_copy) in zip(walk(source), walk(self.graph), strict=True):
            self._nodes[id(node)] = node_copy
            self._owners[id(node)] = owner_copy
        self.taken = all_names(self.graph)
        self._shared: dict[Hashable, gs.Tensor] = {}

    def node(self, original: gs.Node) -> gs.Node:
        """The counterpart of the analysed graph's ``original`` node."""
        return self._nodes[id(original)]

    def graph_of(self, original: gs.Node) -> gs.Graph:
        """The (sub)graph that holds the counterpart of ``original``."""
        return self._owners[id(original)]

    def tensor(self, original: gs.Node, name: str) -> gs.Tensor:
        """The tensor ``name`` as the counterpart of ``original`` sees it.

        Wire only tensors reached this way, through :meth:`node`'s inputs and
        outputs, or made by a :class:`NodeEmitter`: a tensor a site holds from
        the analysed graph would tie the copy to it."""
        return self.graph_of(original).tensors()[name]

    def at(self, original: gs.Node, base: str) -> NodeEmitter:
        """A :class:`NodeEmitter` inserting before ``original``'s counterpart, names from ``base``."""
        return NodeEmitter(self.graph_of(original), self.node(original), base, self.taken)

    def shared(self, key: Hashable, make: Callable[[], gs.Tensor]) -> gs.Tensor:
        """The tensor emitted under ``key``, made by ``make()`` the first time."""
        if key not in self._shared:
            self._shared[key] = make()
        return self._shared[key]

    def has(self, key: Hashable) -> bool:
        return key in self._shared

    def provide(self, key: Hashable, tensor: gs.Tensor) -> None:
        """Make ``tensor`` the one :meth:`shared` hands out for ``key`` (e.g. a graph input)."""
        self._shared[key] = tensor


__all__ = [
    "CalibrationRequest", "Emitter", "Family", "LayerInfo", "NodeEmitter", "Site", "all_names",
    "register", "registered", "resolve", "unregister",
]
