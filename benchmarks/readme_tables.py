"""Copy the tables of the committed benchmark results into the README.

    python benchmarks/readme_tables.py           # rewrites README.md in place
    python benchmarks/readme_tables.py --check   # exit 1 when README.md is out of date

Each generated table sits between two markers in README.md::

    <!-- generated: NAME -->
    ...
    <!-- end generated -->

and is made from a committed file by :data:`TABLES` (NAME -> function). A
table is never edited by hand: rerun the benchmark, then this script
(``tests/test_readme.py`` fails when they disagree).
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


#: Generated table name -> its lines.
TABLES = {"results": results_table, "csg": csg_table}


def render(readme: str) -> str:
    """``readme`` with every generated block made again."""

    def block(match: re.Match) -> str:
        name = match["name"]
        if name not in TABLES:
            raise SystemExit(f"README.md: unknown generated table {name!r}")
        return match.group(1) + "\n".join(TABLES[name]()) + "\n" + match.group(4)

    return BLOCK.sub(block, readme)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="only compare; exit 1 when README.md differs")
    args = parser.parse_args(argv)
    current = README.read_text()
    wanted = render(current)
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
