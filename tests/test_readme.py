"""The README's generated tables match the committed benchmark results they come from
(``benchmarks/readme_tables.py``): a rerun benchmark without a regenerated README, or
a table edited by hand, fails here."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _tables_module():
    spec = importlib.util.spec_from_file_location("readme_tables",
                                                  ROOT / "benchmarks" / "readme_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_generated_table_is_current():
    tables = _tables_module()
    readme = (ROOT / "README.md").read_text()
    names = [match["name"] for match in tables.BLOCK.finditer(readme)]
    assert sorted(names) == sorted(tables.TABLES)  # each table is in the README once
    assert tables.render(readme) == readme, "run python benchmarks/readme_tables.py"


def test_a_hand_edited_table_is_caught():
    tables = _tables_module()
    readme = (ROOT / "README.md").read_text()
    edited = readme.replace("| struct_resnet18_a | ", "| struct_resnet18_a | 9", 1)
    assert edited != readme and tables.render(edited) == readme
