"""``--html FILE``: one self-contained page of a run, with plots.

The page is built from the same dictionaries the JSON outputs print
(``report.schema.json``): :func:`optimize_page` from a report,
:func:`analyze_page` from a plan, :func:`bench_page` from a bench result.
Plots are matplotlib figures written as inline SVG (text kept as text, so
the page is searchable), styles are inline, and nothing is fetched when the
page is viewed: no scripts, fonts or images from the network.

Plots, where the data holds them:

- per-layer MACs before and after (bars; a rewritten layer's "after" in its
  family's colour);
- per-layer time before and after as the cost model predicts it (in
  MAC-equivalents: the selector's units), with the layer-alone measured
  ratio of ``--select measured`` beside it;
- each layer's relative weight residual against the tolerance (log scale;
  layers with no candidate are drawn above the tolerance line: their
  residual is not known, only that it exceeds the tolerance);
- the MACs each family saved, with its count of layers;
- a MAC budget's curve: the prefixes of its greedy sequence that were
  scored on the calibration data, agreement (or relative error) against the
  MAC ratio, the one written marked, the bound drawn;
- the side-by-side benchmark (medians, p90 whiskers) and, with a profile,
  the time per onnxruntime op type.

matplotlib is an optional dependency (the ``html`` extra):
:func:`require_matplotlib` names it in one line when it is missing.
"""

from __future__ import annotations

import html
import io

from .errors import InputError
from .report import human

#: Colours of the built-in families; other families take the rest of the palette.
FAMILY_COLOURS = {"box": "#1f77b4", "igc": "#ff7f0e", "csg": "#2ca02c", "lowrank": "#9467bd"}
_SPARE_COLOURS = ("#8c564b", "#e377c2", "#17becf", "#bcbd22", "#d62728")
#: The "before" bars and kept layers.
BEFORE_COLOUR = "#b0b0b0"
#: The models of a benchmark (A, B, ..): greys, apart from the families' colours.
MODEL_COLOURS = (BEFORE_COLOUR, "#555555", "#808080")
#: Figure width in inches, and the height each layer row takes in per-layer bar plots.
WIDTH_IN = 9.0
ROW_IN = 0.17


def require_matplotlib() -> None:
    """:class:`InputError` (one line) when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InputError("--html needs matplotlib: pip install 'sconv-onnx[html]'") from None


def family_colour(family: str | None, families: list[str]) -> str:
    """A fixed colour per family (:data:`FAMILY_COLOURS`; others by their order)."""
    if family in FAMILY_COLOURS:
        return FAMILY_COLOURS[family]
    others = [name for name in families if name not in FAMILY_COLOURS]
    index = others.index(family) if family in others else 0
    return _SPARE_COLOURS[index % len(_SPARE_COLOURS)]


def _figure(height_in: float):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(WIDTH_IN, max(2.5, height_in)), layout="constrained")
    return figure, figure.add_subplot()


#: matplotlib settings the figures are made and written with: names are text, never
#: TeX (a node named ``a$b$`` stays as it is), and text stays text in the SVG.
_RC = {"text.parse_math": False, "svg.fonttype": "none", "svg.hashsalt": "sconv-onnx"}


def _svg(figure) -> str:
    """The figure as an inline ``<svg>`` element (no XML prologue)."""
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", metadata={  # no RDF block, no date: stable pages
        "Creator": None, "Date": None, "Format": None, "Type": None})
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def _rewritten_by(layer: dict) -> str | None:
    """The family that rewrote ``layer``; None for a kept layer."""
    if layer["decision"] != "rewrite":
        return None
    return (layer.get("chosen") or {}).get("family") or "?"


def _families(layers: list[dict]) -> list[str]:
    """The families that rewrote some of ``layers``, in order of first use: the colour
    order (computed once from all layers, so that every plot agrees)."""
    return list(dict.fromkeys(filter(None, map(_rewritten_by, layers))))


def _shown(families: list[str], layers: list[dict]) -> list[str]:
    """The ``families`` that rewrote one of ``layers`` (a plot's legend entries)."""
    used = set(map(_rewritten_by, layers))
    return [name for name in families if name in used]


def _legend_for(axes, shown: list[str], families: list[str],
                extra: list[tuple[str, str]] = ()) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(color=colour, label=label) for label, colour in extra]
    handles += [Patch(color=family_colour(name, families), label=f"{name} (rewritten)")
                for name in shown]
    if handles:
        axes.legend(handles=handles, loc="lower right", fontsize=8)


def _human_ticks(axis) -> None:
    """Tick labels as :func:`~sconv_onnx.report.human` writes numbers (``1.5G``, ``300M``)."""
    from matplotlib.ticker import FuncFormatter

    axis.set_major_formatter(FuncFormatter(lambda value, _: human(value)))


def _paired_bars(layers: list[dict], before_key: str, after_key: str, xlabel: str,
                 title: str, families: list[str]):
    """Horizontal bars per layer: before (grey), after (family colour) where rewritten."""
    rows = [layer for layer in layers if layer.get(before_key) is not None]
    if not rows:
        return None
    figure, axes = _figure(0.9 + ROW_IN * 2 * len(rows))
    positions = range(len(rows))
    before = [layer[before_key] for layer in rows]
    after = [layer[after_key] if layer["decision"] == "rewrite" and layer.get(after_key)
             is not None else layer[before_key] for layer in rows]
    colours = [family_colour(_rewritten_by(layer), families) if _rewritten_by(layer)
               else BEFORE_COLOUR for layer in rows]
    axes.barh([p - 0.2 for p in positions], before, height=0.4, color=BEFORE_COLOUR)
    axes.barh([p + 0.2 for p in positions], after, height=0.4, color=colours)
    axes.set_yticks(list(positions), [layer["node"] for layer in rows], fontsize=7)
    axes.invert_yaxis()
    _human_ticks(axes.xaxis)
    axes.set_xlabel(xlabel)
    axes.set_title(title, fontsize=10)
    axes.grid(axis="x", alpha=0.3)
    _legend_for(axes, _shown(families, rows), families,
                [("before (upper bar); kept layers", BEFORE_COLOUR)])
    return figure


def macs_figure(layers: list[dict], families: list[str]):
    """Per-layer MACs (batch 1) before and after."""
    return _paired_bars(layers, "macs_before", "macs_after", "multiply-adds at batch 1",
                        "MACs per layer: before (upper bar) and after (lower bar)", families)


def time_figure(layers: list[dict], families: list[str]):
    """Per-layer predicted time before and after; measured layer-alone ratios annotated.
    Layers of unknown shapes are left out (their cost is per output position)."""
    per_run = [layer for layer in layers if layer.get("macs_before") is not None]
    figure = _paired_bars(per_run, "cost_before", "cost_after",
                          "predicted time (cost model, MAC-equivalents per run)",
                          "Time per layer as the cost model predicts it: before and after",
                          families)
    if figure is None:
        return None
    axes = figure.axes[0]
    rows = [layer for layer in per_run if layer.get("cost_before") is not None]
    for position, layer in enumerate(rows):
        if layer.get("measured_ratio") is not None:
            axes.annotate(f"measured {layer['measured_ratio']:.2f}x", (layer["cost_before"],
                          position), xytext=(4, 0), textcoords="offset points", fontsize=7,
                          va="center")
    return figure


def residual_figure(layers: list[dict], tol: float, families: list[str]):
    """Each layer's relative weight residual (its chosen, else best, candidate) against
    ``tol``; layers where no structure was found within ``tol`` are drawn at 3 tol, marked
    as unknown; layers no family could search (``decided_by`` skipped) are not drawn."""
    if not layers:
        return None
    figure, axes = _figure(3.6)
    above = tol * 3
    unknown_x = []
    for index, layer in enumerate(layers):
        candidate = layer.get("chosen") or layer.get("best")
        if candidate is None:
            if layer.get("decided_by") == "no_candidate":
                unknown_x.append(index)
            continue
        rewritten = layer["decision"] == "rewrite"
        colour = family_colour(candidate["family"], families) if rewritten else BEFORE_COLOUR
        residual = max(candidate["residual"], tol * 1e-6)  # exact fits sit at the floor
        axes.scatter([index], [residual], s=28, color=colour, edgecolors="black",
                     linewidths=0.4, marker="o" if rewritten else "s", zorder=3)
    if unknown_x:
        axes.scatter(unknown_x, [above] * len(unknown_x), s=28, marker="^", color="white",
                     edgecolors="black", linewidths=0.6, zorder=3,
                     label="no structure within tol (residual above it)")
    axes.axhline(tol, color="#d62728", linestyle="--", linewidth=1, label=f"tol {tol:g}")
    axes.set_yscale("log")
    axes.set_xticks(range(len(layers)), [layer["node"] for layer in layers], rotation=90,
                    fontsize=6)
    axes.set_ylabel("relative weight residual")
    axes.set_title("Residual per layer against the tolerance (circles: rewritten, "
                   "squares: kept)", fontsize=10)
    axes.grid(axis="y", alpha=0.3)
    from matplotlib.lines import Line2D

    handles, _ = axes.get_legend_handles_labels()
    handles += [Line2D([], [], marker="o", linestyle="", color=family_colour(name, families),
                       label=f"{name} (rewritten)") for name in _shown(families, layers)]
    axes.legend(handles=handles, fontsize=8, loc="lower right")
    return figure


def family_figure(layers: list[dict], families: list[str]):
    """Per family: the share of the layers' MACs it saved (negative: added), and the
    layers it rewrote; the kept layers in the title."""
    if not families:
        return None
    total = sum(layer["macs_before"] for layer in layers if layer.get("macs_before") is not None)
    saved = dict.fromkeys(families, 0)
    count = dict.fromkeys(families, 0)
    for layer in layers:
        name = _rewritten_by(layer)
        if name is None:
            continue
        count[name] += 1
        if layer.get("macs_before") is not None and layer.get("macs_after") is not None:
            saved[name] += layer["macs_before"] - layer["macs_after"]
    kept = sum(_rewritten_by(layer) is None for layer in layers)
    figure, axes = _figure(0.9 + 0.45 * len(families))
    shares = [100 * saved[name] / max(total, 1) for name in families]
    axes.barh(families, shares, color=[family_colour(name, families) for name in families])
    for position, name in enumerate(families):
        axes.annotate(f"{count[name]} layer{'s' * (count[name] != 1)}, {human(saved[name])} MACs",
                      (max(shares[position], 0), position), xytext=(4, 0),
                      textcoords="offset points", va="center", fontsize=8)
    axes.invert_yaxis()
    axes.set_xlabel("% of the layers' MACs saved")
    axes.set_xlim(min(0, *shares) * 1.2, max(0, *shares) * 1.6 + 1)
    axes.set_title(f"Per family: what it rewrote ({kept} layers kept)", fontsize=10)
    return figure


def budget_figure(check: dict | None):
    """A MAC budget's scored trials: agreement (else relative error) against MACs."""
    trials = (check or {}).get("trials") or []
    if not trials:
        return None
    agreement = all(trial["agreement"] is not None for trial in trials)
    key, label = (("agreement", "agreement with the original") if agreement
                  else ("rel_error", "relative output error"))
    figure, axes = _figure(3.6)
    axes.scatter([1.0], [1.0 if agreement else 0.0], marker="D", color=BEFORE_COLOUR, s=30,
                 zorder=3, label="the original")
    for sequential, marker, name in ((False, "o", "one-shot fit"), (True, "s", "sequential fit")):
        for holds, colour in ((True, "#2ca02c"), (False, "#d62728")):
            points = [trial for trial in trials
                      if trial["sequential_fit"] is sequential and trial["holds"] is holds]
            if points:
                axes.scatter([t["macs_ratio"] for t in points], [t[key] for t in points],
                             marker=marker, color=colour, s=30, zorder=3,
                             label=f"{name}, {'within' if holds else 'breaks'} the bound")
    written = [trial for trial in trials if trial["moves"] == check["moves_taken"]
               and trial["sequential_fit"] is check["sequential_fit"]]
    if written:
        axes.scatter([written[-1]["macs_ratio"]], [written[-1][key]], marker="*", s=220,
                     facecolors="none", edgecolors="black", zorder=4, label="written")
    bound = check["bound"].get("min_agreement" if agreement else "max_error")
    if bound is not None:
        axes.axhline(bound, color="#d62728", linestyle="--", linewidth=1, label=f"bound {bound:g}")
    other = check["bound"].get("max_error") if agreement else None
    if other is not None:  # not on this axis, but in the colours
        axes.plot([], [], linestyle="", label=f"and relative error <= {other:g}")
    axes.set_xlabel("MACs of the layers, over the original's")
    axes.set_ylabel(label)
    axes.set_title("MAC budget: the prefixes of its greedy sequence that were scored on the "
                   "calibration data", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return figure


def bench_figure(bench: dict | None):
    """Median latency per model (p90 as a whisker), the ratio in the title."""
    if not bench:
        return None
    timings = bench["timings"]
    figure, axes = _figure(0.9 + 0.5 * len(timings))
    names = [timing["name"] for timing in timings]
    medians = [timing["median_ms"] for timing in timings]
    whiskers = [[0] * len(timings), [t["p90_ms"] - t["median_ms"] for t in timings]]
    axes.barh(names, medians, xerr=whiskers, capsize=4,
              color=[MODEL_COLOURS[i % len(MODEL_COLOURS)] for i in range(len(timings))])
    axes.invert_yaxis()
    axes.set_xlabel(f"ms per run (median; whisker to p90; {bench['runs']} runs, "
                    f"{bench['threads']} threads)")
    ratios = ", ".join(f"{name} / {names[0]} {ratio:.3f}"
                       for name, ratio in zip(names[1:], bench["ratios"][1:]))
    axes.set_title("Measured latency, side by side" + (f": {ratios}" if ratios else ""),
                   fontsize=10)
    return figure


def profile_figure(bench: dict | None):
    """Milliseconds per run in each onnxruntime op type, per model."""
    profile = (bench or {}).get("profile")
    if not profile:
        return None
    names = [timing["name"] for timing in bench["timings"]]
    ops = list(profile)
    figure, axes = _figure(0.9 + ROW_IN * len(names) * len(ops) * 1.2)
    height = 0.8 / len(names)
    colours = MODEL_COLOURS
    for index, name in enumerate(names):
        axes.barh([p + (index - (len(names) - 1) / 2) * height for p in range(len(ops))],
                  [profile[op][index] for op in ops], height=height,
                  color=colours[index % len(colours)], label=name)
    axes.set_yticks(range(len(ops)), ops, fontsize=8)
    axes.invert_yaxis()
    axes.set_xlabel("ms per run (onnxruntime profiler, median over runs)")
    axes.set_title("Time per op type, after onnxruntime's graph optimizations", fontsize=10)
    axes.legend(fontsize=8)
    return figure


# --- the page ---------------------------------------------------------------------------

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.2em 0.6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.PASS { color: #2a7d2a; font-weight: bold; } .FAIL { color: #c62828; font-weight: bold; }
.plot svg { max-width: 100%; height: auto; }
.meta { color: #666; font-size: 0.85em; }
"""


def _escape(value) -> str:
    return html.escape("" if value is None else str(value))


def _table(header: list[str], rows: list[list], numeric: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{_escape(cell)}</th>" for cell in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{_escape(cell)}</td>' if index in numeric
                         else f"<td>{_escape(cell)}</td>" for index, cell in enumerate(row))
        + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _plots(*makers) -> list[str]:
    """Each ``maker()``'s figure (None: nothing to show) as an inline SVG block, made and
    written under :data:`_RC`."""
    from matplotlib import rc_context

    blocks = []
    with rc_context(_RC):
        for make in makers:
            figure = make()
            if figure is not None:
                blocks.append(f'<div class="plot">{_svg(figure)}</div>')
    return blocks


def _meta(data: dict) -> str:
    tool = data.get("tool") or {}
    versions = ", ".join(f"{name} {version}" for name, version in
                         (tool.get("dependencies") or {}).items())
    return (f'<p class="meta">{_escape(tool.get("name", "sconv-onnx"))} '
            f'{_escape(tool.get("version", ""))}; {_escape(versions)}</p>')


def _document(title: str, parts: list[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_escape(title)}</title><style>{_STYLE}</style></head>\n<body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


def _layer_rows(layers: list[dict]) -> list[list]:
    rows = []
    for layer in layers:
        candidate = layer.get("chosen") or layer.get("best")
        rewritten = layer["decision"] == "rewrite"
        rows.append([
            layer["node"], layer["op"], candidate["family"] if candidate else "-",
            "x".join(map(str, layer["weight_shape"])), candidate["label"] if candidate else "-",
            f"{candidate['residual']:.1e}" if candidate else "-",
            human(layer["macs_before"]), human(layer["macs_after"]) if rewritten else "",
            f"{layer['measured_ratio']:.2f}" if layer.get("measured_ratio") is not None else "",
            layer["decision"], layer["reason"]])
    return rows


def _plan_summary(plan: dict, notes: bool = True) -> list[str]:
    """What the plan did, its settings and (``notes``) its notes."""
    totals = plan["totals"]
    macs = (f"{human(totals['macs_before'])} &rarr; {human(totals['macs_after'])} "
            f"(x{totals['macs_after'] / totals['macs_before']:.3f})"
            if totals.get("macs_before") else "unknown (shapes not known)")
    settings = (f"tol {plan['tol']:g}, select {plan['select']}, families "
                f"{', '.join(plan['families'])}" + (", int8" if plan.get("int8") else "")
                + (f", MAC budget {plan['target_macs']:g}" if plan.get("target_macs") else ""))
    parts = [
        (f"<p>{totals['rewritten']} of {totals['layers']} layers rewritten; layer MACs {macs}; "
        f"params {human(totals['params_before'])} &rarr; {human(totals['params_after'])}. "
        f"Settings: {_escape(settings)}.</p>"),
    ]
    if plan.get("model_ratio") is not None:
        parts.append(f"<p>Whole rewritten model, measured (--select measured): "
                     f"{plan['model_ratio']:.3f}x the original's time.</p>")
    if notes and plan.get("notes"):
        parts.append("<ul>" + "".join(f"<li>{_escape(note)}</li>" for note in plan["notes"])
                     + "</ul>")
    return parts


def _plan_plots(plan: dict) -> list[str]:
    """The per-layer plots, the budget's curve and the layer table."""
    layers = plan["layers"]
    parts = ["<h2>Per layer</h2>"]
    families = _families(layers)
    parts += _plots(lambda: macs_figure(layers, families), lambda: time_figure(layers, families),
                    lambda: residual_figure(layers, plan["tol"], families),
                    lambda: family_figure(layers, families),
                    lambda: budget_figure(plan.get("budget_check")))
    parts.append("<h2>Layers</h2>")
    parts.append(_table(["node", "op", "family", "weight", "structure", "residual",
                         "MACs before", "MACs after", "measured", "decision", "reason"],
                        _layer_rows(layers), numeric={5, 6, 7, 8}))
    return parts


def optimize_page(report: dict, source: str, target: str) -> str:
    """The page of an ``optimize`` run from its JSON report (:meth:`Report.to_dict`)."""
    verification = report.get("verification")
    if verification is None:
        verdict = "<p>Not verified (--no-verify).</p>"
    else:
        status = verification["status"]
        worst = verification["max_rel_error"]
        bound = verification["max_error"]
        verdict = (f'<p>Verification: <span class="{_escape(status)}">{_escape(status)}</span>: '
                   f"max relative output error {worst:.3g}"
                   + (f" (bound {bound:g})" if bound is not None else " (no bound)") + "</p>")
    before, after = report["before"], report["after"]
    summary = _table(["", "before", "after", "ratio"], [
        [name, human(before[key]), human(after[key]),
         f"{after[key] / before[key]:.3f}" if before.get(key) and after.get(key) is not None
         else ""] for name, key in (("params", "params"), ("MACs", "macs"),
                                    ("size (bytes)", "size"))], numeric={1, 2, 3})
    parts = [f"<h1>sconv-onnx optimize: {_escape(source)} &rarr; {_escape(target)}</h1>",
             _meta(report), verdict, summary, *_plan_summary(report["plan"], notes=False)]
    if report.get("notes"):  # the plan's notes among them
        parts.append("<ul>" + "".join(f"<li>{_escape(note)}</li>" for note in report["notes"])
                     + "</ul>")
    if report.get("bench"):
        parts.append("<h2>Benchmark</h2>")
        parts += _plots(lambda: bench_figure(report["bench"]),
                        lambda: profile_figure(report["bench"]))
    parts += _plan_plots(report["plan"])
    return _document(f"sconv-onnx optimize {source}", parts)


def analyze_page(plan: dict, source: str) -> str:
    """The page of an ``analyze`` run from its JSON plan (:meth:`Plan.to_dict`, stamped)."""
    parts = [f"<h1>sconv-onnx analyze: {_escape(source)}</h1>", _meta(plan),
             *_plan_summary(plan), *_plan_plots(plan)]
    return _document(f"sconv-onnx analyze {source}", parts)


def bench_page(result: dict, paths: list[str]) -> str:
    """The page of a ``bench`` run from its JSON result (:meth:`BenchResult.to_dict`)."""
    names = [timing["name"] for timing in result["timings"]]
    rows = [[name, path, f"{timing['median_ms']:.3f}", f"{timing['p90_ms']:.3f}",
             f"{ratio:.3f}"] for name, path, timing, ratio in
            zip(names, paths, result["timings"], result["ratios"])]
    parts = [f"<h1>sconv-onnx bench: {_escape(' vs '.join(paths))}</h1>", _meta(result),
             _table(["model", "file", "median ms", "p90 ms", "ratio to A"], rows,
                    numeric={2, 3, 4})]
    parts += _plots(lambda: bench_figure(result), lambda: profile_figure(result))
    if not result.get("profile"):
        parts.append("<p>Add --profile for the time per onnxruntime op type.</p>")
    return _document(f"sconv-onnx bench {' '.join(paths)}", parts)


__all__ = ["FAMILY_COLOURS", "analyze_page", "bench_page", "optimize_page", "require_matplotlib"]
