"""Copy the tables of the committed benchmark results, and the demo's output, into the README.

    python benchmarks/readme_tables.py           # rewrites README.md's tables in place
    python benchmarks/readme_tables.py --demo    # ... and the demo block, from a fresh run
    python benchmarks/readme_tables.py --check   # exit 1 when a table is out of date

Each generated block sits between two markers in README.md::

    <!-- generated: NAME -->
    ...
    <!-- end generated -->

A table is made from a committed file by :data:`TABLES` (NAME -> function);
the ``demo`` block is ``sconv-onnx demo``'s output (:func:`demo_block`), its
temporary folder written ``/tmp/sconv-demo-…``.  Nothing between markers is
edited by hand: rerun the benchmark, then this script.  ``tests/test_readme.py``
fails when a table disagrees with its file, or when the demo block's *shape*
(its lines and words; decimals, which vary from run to run, aside) is not
what the demo prints now.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BENCHMARKS = ROOT / "benchmarks"
BLOCK = re.compile(r"(<!-- generated: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- end generated -->)",
                   re.DOTALL)


def markdown_tables(path: Path) -> list[list[str]]:
    """The markdown tables of ``path``: each a list of its ``|`` lines."""
    tables, current = [], []
    for line in path.read_text().splitlines():
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    return tables + ([current] if current else [])


def _fixed_width(lines: list[str]) -> list[dict[str, str]]:
    """The rows of a fixed-width text table (a header, a line of dashes per column, rows),
    as dicts keyed by header."""
    spans = [match.span() for match in re.finditer(r"-+", lines[1])]
    header = [lines[0][start:end].strip() for start, end in spans]
    return [dict(zip(header, (line[start:end].strip() for start, end in spans)))
            for line in lines[2:] if line.strip()]


def results_table() -> list[str]:
    """The cost-mode rows of ``RESULTS.md`` and the measured mode's latency ratio."""
    block = (BENCHMARKS / "RESULTS.md").read_text().split("```")[1].strip("\n").splitlines()
    rows: dict[str, dict[str, dict[str, str]]] = {}
    for row in _fixed_width(block):
        rows.setdefault(row["model"], {})[row["select"]] = row
    lines = [("| model | MAC ratio | latency ratio | latency / MAC ratio | "
              "`--select measured` latency ratio |"), "|---|---|---|---|---|"]
    for model, modes in rows.items():
        cost = modes["cost"]
        lines.append(f"| {model} | {cost['MAC ratio']} | {cost['latency ratio']} | "
                     f"{cost['latency/MAC']} | {modes['measured']['latency ratio']} |")
    return lines


def csg_table() -> list[str]:
    """The table of ``CSG.md`` as it is."""
    return markdown_tables(BENCHMARKS / "CSG.md")[0]


def digits_table() -> list[str]:
    """The first table of ``DIGITS.md``, the columns a reader compares."""
    lines = markdown_tables(BENCHMARKS / "DIGITS.md")[0]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    names = {"plain": "plain", "sr": "SR", "igc": "IGC"}
    out = [("| model | test accuracy as trained (%) | after projection and rewrite (%) | "
            "conv params | conv MACs/image | latency ratio (batch 64, 1 thread) |"),
           "|---|---|---|---|---|---|"]
    for line in lines[2:]:
        row = dict(zip(header, (cell.strip() for cell in line.strip("|").split("|"))))
        params = row["conv params"].split(" (")[0]
        out.append(f"| {names[row['model']]} | {row['test acc trained (%)']} | "
                   f"{row['test acc projected + rewritten (%)']} | {params} | "
                   f"{row['conv MACs/image']} | {row['ratio']} |")
    return out


def int8_table() -> list[str]:
    """``INT8.md`` with one row per model and rewrite: each quantizer's error over the
    quantized original's."""
    lines = markdown_tables(BENCHMARKS / "INT8.md")[0]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    ratios: dict[tuple[str, str], dict[str, str]] = {}
    for line in lines[2:]:
        row = dict(zip(header, (cell.strip() for cell in line.strip("|").split("|"))))
        if row["before quantizing"] == "original":
            continue
        value = row["x original's"] or row["rel. error vs float original"]
        ratios.setdefault((row["model"], row["before quantizing"]), {})[row["quantizer"]] = value
    out = ["| model | rewrite | static int8 error, x the quantized original's | dynamic |",
           "|---|---|---|---|"]
    out += [f"| {model} | {rewrite} | {by.get('static', '')} | {by.get('dynamic', '')} |"
            for (model, rewrite), by in ratios.items()]
    return out


#: Generated table name -> its lines.
TABLES = {"results": results_table, "csg": csg_table, "digits": digits_table,
          "int8": int8_table}
#: Blocks made by running the tool (only with ``--demo``).
RUNS = ("demo",)


def demo_block() -> list[str]:
    """``sconv-onnx demo``'s output in a code block, its folder as ``/tmp/sconv-demo-…``."""
    import contextlib
    import io

    from sconv_onnx.cli import main

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        if main(["demo"]) != 0:
            raise SystemExit("sconv-onnx demo failed")
    text = re.sub(r"/\S*?sconv-demo-[^/\s]+", "/tmp/sconv-demo-…", printed.getvalue())
    return ["```", *text.rstrip().splitlines(), "```"]


_DECIMAL = re.compile(r"\d+\.\d+(?:e[-+]?\d+)?|\d+e[-+]?\d+")


_THREADS = re.compile(r"\d+ threads")


def shape(lines: list[str]) -> list[str]:
    """``lines`` without what varies from run to run or machine to machine: decimals and the
    thread count become ``#``, runs of spaces one space (column widths follow the numbers)."""
    return [re.sub(r"\s+", " ", _DECIMAL.sub("#", _THREADS.sub("# threads", line))).strip()
            for line in lines]


def blocks(readme: str) -> dict[str, list[str]]:
    """The generated blocks of ``readme``: name -> lines."""
    return {match["name"]: match["body"].rstrip("\n").splitlines()
            for match in BLOCK.finditer(readme)}


def render(readme: str, demo: bool = False) -> str:
    """``readme`` with every generated table made again (and the demo block, when
    ``demo``)."""

    def block(match: re.Match) -> str:
        name = match["name"]
        if name in RUNS:
            lines = demo_block() if demo else match["body"].rstrip("\n").splitlines()
        elif name in TABLES:
            lines = TABLES[name]()
        else:
            raise SystemExit(f"README.md: unknown generated block {name!r}")
        return match.group(1) + "\n".join(lines) + "\n" + match.group(4)

    return BLOCK.sub(block, readme)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="only compare the tables; exit 1 when README.md differs")
    parser.add_argument("--demo", action="store_true",
                        help="also run sconv-onnx demo and write its output")
    args = parser.parse_args(argv)
    current = README.read_text()
    wanted = render(current, demo=args.demo and not args.check)
    if args.check:
        if wanted != current:
            print("README.md is out of date: run python benchmarks/readme_tables.py",
                  file=sys.stderr)
            return 1
        return 0
    README.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
