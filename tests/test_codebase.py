"""The codebase's own rules, checked on the source (docs/architecture.md, "Rules of the house"): no private name
crosses a module boundary, no function over 80 lines and no module over 500 lines (the package, the examples, the
benchmarks and the scripts; test modules are exempt from the length rules)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "sphere_ar_hf"
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 500
CHECKED_FOLDERS = ("src", "examples", "benchmarks", "scripts", "tests")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


PACKAGE_FILES = sorted((SRC / PACKAGE).rglob("*.py"))
PACKAGE_MODULES = {_module_name(p) for p in PACKAGE_FILES}
# the files the length rules cover: the package, then the examples, benchmarks and scripts
SHORT_FILES = PACKAGE_FILES + sorted(p for d in ("examples", "benchmarks", "scripts") for p in (ROOT / d).rglob("*.py"))


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _base_of(node: ast.ImportFrom, path: Path) -> str | None:
    """The absolute module an ``import from`` names, or None when it is not this package."""
    if node.level == 0:
        return node.module if node.module and node.module.split(".")[0] == PACKAGE else None
    here = _module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    base = package[:len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _dotted(expr: ast.expr) -> str | None:
    if isinstance(expr, ast.Name):
        return expr.id
    if isinstance(expr, ast.Attribute):
        inner = _dotted(expr.value)
        return None if inner is None else f"{inner}.{expr.attr}"
    return None


def private_crossings(path: Path, source: str | None = None) -> Iterator[str]:
    """Each private name of another module of the package that ``path`` (or ``source``, read as if it were there)
    imports or reads."""
    tree = ast.parse(path.read_text() if source is None else source, filename=str(path))
    own = _module_name(path) if path.is_relative_to(SRC) else None
    aliases: dict[str, str] = {}  # local name -> package module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    aliases[alias.asname or PACKAGE] = alias.name if alias.asname else PACKAGE
        elif isinstance(node, ast.ImportFrom) and (base := _base_of(node, path)) is not None:
            for alias in node.names:
                if f"{base}.{alias.name}" in PACKAGE_MODULES:
                    aliases[alias.asname or alias.name] = f"{base}.{alias.name}"
                elif _is_private(alias.name) and base != own:
                    yield f"line {node.lineno}: from {base} import {alias.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            dotted = _dotted(node.value)
            if dotted is None:
                continue
            head, _, rest = dotted.partition(".")
            module = ".".join(filter(None, [aliases.get(head), rest])) if head in aliases else None
            if module in PACKAGE_MODULES and module != own:
                yield f"line {node.lineno}: {dotted}.{node.attr}"


def _python_files() -> list[Path]:
    return sorted(p for folder in CHECKED_FOLDERS for p in (ROOT / folder).rglob("*.py"))


def test_no_private_name_crosses_a_module_boundary():
    found = {str(p.relative_to(ROOT)): hits for p in _python_files() if (hits := list(private_crossings(p)))}
    assert not found, f"private names used across modules: {found}"


def test_the_private_name_check_sees_each_form():
    """The check above finds each way of reaching another module's private name (so it cannot pass by blindness)."""
    probe = SRC / PACKAGE / "training" / "probe_never_written.py"
    source = ("from ..cli import _x\nfrom .. import cli\nfrom . import ema\nimport sphere_ar_hf.hub as hub\n"
              "import sphere_ar_hf\nfrom .data import _y\ncli._a\nema._b\nhub._c\nsphere_ar_hf.utils._d\n"
              "cli.public\nself._e\n")
    hits = [h.split(": ", 1)[1] for h in private_crossings(probe, source)]
    assert hits == ["from sphere_ar_hf.cli import _x", "from sphere_ar_hf.training.data import _y", "cli._a", "ema._b",
                    "hub._c", "sphere_ar_hf.utils._d"]


def _functions(tree: ast.AST) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


@pytest.mark.parametrize("path", SHORT_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_functions_are_short(path):
    tree = ast.parse(path.read_text())
    long = {f.name: f.end_lineno - f.lineno + 1 for f in _functions(tree)
            if f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES}
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


@pytest.mark.parametrize("path", SHORT_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_are_short(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{lines} lines (at most {MAX_MODULE_LINES})"
