"""How far each layer is from a given box structure: ``analyze --distance SPEC``.

A user who trains towards a structure (or wonders which one a pretrained
model is near) names it once for the whole model, e.g. ``c=C/2,n=2``:

* ``c``: the channel size, an integer or ``C`` multiplied and divided by
  integers, left to right (``C/2``, ``C*3/4``, ``C``; ``C`` is the size of
  the weight's axis 1 that the box family pools: a conv's input channels
  per group, a ConvTranspose's output channels per group, a fully
  connected layer's input features); default ``C``;
* ``n``: the spatial size per kernel axis, an integer (at most the kernel's
  size on that axis: a 3x3 kernel at ``n=4`` is kept at 3), or ``K`` (the
  whole kernel); default ``K``.

For each layer the box family reads (Conv, ConvTranspose, Gemm, MatMul with
a constant weight), :func:`distances` gives the sizes the spec means there
and the relative residual ``||W - A alpha||_F / ||W||_F`` of the
least-squares fit (:func:`sconv_onnx.structure.relative_residual`), or why
there is none (a ``c`` outside ``1..C``, a weight the family cannot read).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

from .errors import InputError
from .structure import relative_residual

#: An integer, or ``C``/``K`` followed by ``*N`` and ``/N`` steps, read left to right.
_SIZE = re.compile(r"^(?:(?P<int>\d+)|(?P<var>[CK])(?P<steps>(?:[*/]\d+)*))$")


@dataclass(frozen=True)
class Size:
    """One size of a spec: a constant, or a fraction of the layer's own size."""

    constant: int | None = None
    fraction: Fraction = Fraction(1)

    def at(self, full: int) -> int:
        """The size on a layer whose full size is ``full`` (a fraction rounds down, at
        least 1)."""
        if self.constant is not None:
            return self.constant
        return max(1, int(full * self.fraction))


@dataclass(frozen=True)
class Spec:
    """``c`` and ``n`` of ``--distance`` (module doc) and the text they came from."""

    text: str
    channels: Size = Size()
    spatial: Size = Size()


def parse_spec(text: str) -> Spec:
    """``"c=C/2,n=2"`` -> :class:`Spec` (``InputError`` naming what is wrong)."""
    sizes = {}
    for part in filter(None, (piece.strip() for piece in text.split(","))):
        key, _, value = part.partition("=")
        key, value = key.strip(), value.replace(" ", "")
        if key not in ("c", "n") or not value:
            raise InputError(f"--distance {text!r}: expected c=... and/or n=..., not {part!r}")
        match = _SIZE.match(value)
        wanted = "C" if key == "c" else "K"
        if match is None or (match["var"] and match["var"] != wanted):
            raise InputError(f"--distance {text!r}: {key}={value} is not an integer or "
                             f"{wanted} scaled by a number (e.g. {key}={wanted}/2)")
        sizes[key] = _size(match, text)
        if sizes[key].constant == 0 or sizes[key].fraction <= 0:
            raise InputError(f"--distance {text!r}: {key} must be positive")
    if not sizes:
        raise InputError(f"--distance {text!r}: give c=... and/or n=...")
    return Spec(text, sizes.get("c", Size()), sizes.get("n", Size()))


def _size(match: re.Match, text: str) -> Size:
    """The size of a matched value; ``InputError`` on a zero factor."""
    if match["int"]:
        return Size(constant=int(match["int"]))
    fraction = Fraction(1)
    for op, number in re.findall(r"([*/])(\d+)", match["steps"]):
        if int(number) == 0:
            raise InputError(f"--distance {text!r}: a factor of 0 in {match.group(0)}")
        fraction = fraction * int(number) if op == "*" else fraction / int(number)
    return Size(fraction=fraction)


@dataclass(frozen=True)
class Distance:
    """One layer's distance from the spec: its sizes there and the residual (None with
    ``problem`` saying why)."""

    node: str
    op: str
    weight_shape: tuple[int, ...]
    sizes: tuple[int, ...] | None
    residual: float | None
    problem: str | None = None

    def to_dict(self) -> dict:
        return {"node": self.node, "op": self.op, "weight_shape": list(self.weight_shape),
                "sizes": None if self.sizes is None else list(self.sizes),
                "residual": self.residual, "problem": self.problem}


def layer_distance(node: str, op: str, weight, spec: Spec) -> Distance:
    """The distance of one layer's weight (``O x C x K..`` per group, or ``O x IN``)."""
    shape = tuple(weight.shape)
    channels = spec.channels.at(shape[1])
    if not 1 <= channels <= shape[1]:
        return Distance(node, op, shape, None, None,
                        f"c={channels} is outside 1..{shape[1]} (the layer's C)")
    sizes = (channels, *(min(spec.spatial.at(k), k) for k in shape[2:]))
    return Distance(node, op, shape, sizes, relative_residual(weight, sizes))


def distances(sites, spec: Spec) -> list[Distance]:
    """:func:`layer_distance` for each of the box family's ``sites`` (a site whose weight
    the family cannot read gets its reason)."""
    found = []
    for site in sites:
        info = site.layer
        if site.weight is None or site.skip_reason:
            found.append(Distance(info.node, info.op, tuple(info.weight_shape), None, None,
                                  site.skip_reason or "weight not constant"))
        else:
            found.append(layer_distance(info.node, info.op, site.weight, spec))
    return found


def distance_table(found: list[Distance], spec: Spec, tol: float) -> str:
    """The distances as a table: per layer its sizes, its residual and whether it is within
    ``tol``."""
    from .report import table

    rows = []
    for item in found:
        shape = "x".join(map(str, item.weight_shape))
        if item.residual is None:
            rows.append([item.node, item.op, shape, "-", "-", item.problem or ""])
            continue
        sizes = f"c={item.sizes[0]}" + (f" n={'x'.join(map(str, item.sizes[1:]))}"
                                        if len(item.sizes) > 1 else "")
        within = ("the whole layer: no structure" if item.sizes == item.weight_shape[1:]
                  else "within tol" if item.residual <= tol else "")
        rows.append([item.node, item.op, shape, sizes, f"{item.residual:.2e}", within])
    title = f"distance from {spec.text} (relative residual of the least-squares fit; tol {tol:g})"
    return title + "\n" + table(["node", "op", "weight", "sizes", "residual", ""], rows)


__all__ = ["Distance", "Spec", "distance_table", "distances", "layer_distance", "parse_spec"]
