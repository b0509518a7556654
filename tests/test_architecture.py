"""The package's import graph goes one way, from the pipeline down to the plugin's core, and
no library module outgrows a screenful of jobs (checked statically, on the source)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "loramoe"

# Lower layers never import higher ones (lazy imports inside functions included); modules
# of one layer may import each other.
LAYERS = [
    ["loramoe.fields", "loramoe.config"],  # the plugin's config
    ["loramoe.layer", "loramoe.loss"],  # the plugin's core: Eq. 5 and the LBC
    ["loramoe.backends"],  # acceleration behind the layer's seam
    ["loramoe.injection", "loramoe.adapter", "loramoe.model", "loramoe"],  # the plugin's API
    ["loramoe.data"],
    ["loramoe.train", "loramoe.evaluate"],
    ["loramoe.tracking"],
    ["loramoe.serving"],
    ["loramoe.pipeline", "loramoe.demo"],
]
LEVEL = {unit: level for level, units in enumerate(LAYERS) for unit in units}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str:
    """The longest LAYERS entry that names `module` or a package above it."""
    candidates = [u for u in LEVEL if module == u or module.startswith(u + ".")]
    assert candidates, f"{module} belongs to no layer: add it to LAYERS"
    return max(candidates, key=len)


def imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
    return [(line, name) for line, name in found
            if name == "loramoe" or name.startswith("loramoe.")]


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_import_goes_down_the_layers():
    upward = []
    for path in SOURCES:
        here = unit_of(module_name(path))
        for line, target in imports(path):
            there = unit_of(target)
            if LEVEL[there] > LEVEL[here]:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} {here} -> {there}")
    assert not upward, "imports that go up the layers:\n" + "\n".join(upward)


def test_the_check_catches_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from loramoe.pipeline import ingest\n")
    assert [LEVEL[unit_of(t)] for _, t in imports(bad)] == [LEVEL["loramoe.pipeline"]]
    assert LEVEL["loramoe.pipeline"] > LEVEL["loramoe.layer"]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_and_functions_stay_small(path):
    source = path.read_text()
    assert len(source.splitlines()) <= 300, f"{path.name}: over 300 lines"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = node.end_lineno - node.lineno + 1
            assert length <= 60, f"{path.name}: {node.name}() is {length} lines (max 60)"
