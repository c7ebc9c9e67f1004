"""The markdown page a benchmark writes: a title, how it was made, what it did, a table."""

from __future__ import annotations

import datetime
import platform
from pathlib import Path

import onnxruntime


def write_page(path: Path, title: str, command: str, details: str, description: str,
               header: list[str], rows: list[list[str]]) -> str:
    """Write (and print) ``# title``, then "Made by `command` on <date>; <machine>,
    onnxruntime <version>, <details>.", ``description`` and the table of ``header`` and
    ``rows``; returns the text."""
    lines = ["| " + " | ".join(row) + " |" for row in [header] + rows]
    lines.insert(1, "|" + "---|" * len(header))
    text = "\n".join([
        f"# {title}", "",
        (f"Made by `{command}` on {datetime.date.today()}; "
         f"{platform.processor() or platform.machine()}, onnxruntime {onnxruntime.__version__}, "
         f"{details}."), "",
        description, "",
        *lines, "",
    ])
    path.write_text(text)
    print(text)
    return text
