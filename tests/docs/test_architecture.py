"""docs/architecture.md is true: modules depend only downwards in its table, and every module is in it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TABLE = (ROOT / "docs" / "architecture.md").read_text().split("| layer | module | job |", 1)[1].split("\n\n", 1)[0]
TEST_SUPPORT = "mapper/testing/"  # builds synthetic checkpoints from any layer; only entry points use it


def rows() -> list[list[str]]:
    """The module paths of each table row, top to bottom."""
    found = []
    for line in TABLE.splitlines():
        cells = line.split("|")
        if len(cells) > 3 and "mapper/" in cells[2]:
            found.append(re.findall(r"`(mapper/[^`]*)`", cells[2]))
    return found


def row_of(module: str, table: list[list[str]]) -> int | None:
    if module == "mapper/__init__.py":
        return 0
    for index, paths in enumerate(table):
        if any(module == p or (p.endswith("/") and module.startswith(p)) for p in paths):
            return index
    return None


def mapper_imports(path: Path) -> set[str]:
    """The mapper modules a file imports (at module level or inside functions), as file paths."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            if name == "mapper":
                found.add("mapper/__init__.py")  # the package root: the entry row
                continue
            if not name.startswith("mapper."):
                continue
            target = ROOT / name.replace(".", "/")
            if target.with_suffix(".py").is_file():
                found.add(str(target.with_suffix(".py").relative_to(ROOT)))
            elif (target / "__init__.py").is_file():
                found.add(str(target.relative_to(ROOT)) + "/")
    return found


def modules() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "mapper").rglob("*.py")
                  if p.name != "__init__.py" or p.parent != ROOT / "mapper")


def test_every_module_is_in_the_table() -> None:
    table = rows()
    missing = [m for m in modules() if "/_data/" not in m and row_of(m, table) is None]
    assert not missing, f"add these to the table in docs/architecture.md: {missing}"


def test_modules_depend_only_downwards() -> None:
    table = rows()
    support = row_of(TEST_SUPPORT, table)
    upward = []
    for module in modules():
        own = row_of(module, table)
        if own is None:
            continue
        for target in mapper_imports(ROOT / module):
            theirs = row_of(target, table)
            if theirs is None or theirs >= own or own == support:
                continue
            upward.append(f"{module} imports {target}")
    uses_support = [f"{m} imports {t}" for m in modules() if row_of(m, table) not in (None, support, 0, 1)
                    for t in mapper_imports(ROOT / m) if row_of(t, table) == support]
    assert not upward and not uses_support, "\n".join(upward + uses_support)
