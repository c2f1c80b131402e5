"""Imports run one way: analyses -> datasite_setup -> domains, never back.

A hospital installs and approves `datasite_setup` (with `domains`); the data scientist's side may
import the hospital side's public request names, never the reverse. Every import statement counts,
also those inside functions, and so do module names written as strings (the sandbox's preload list
and code harnesses name modules that way).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("domains", "datasite_setup", "analyses")  # each may import only the ones before it


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            for word in node.value.replace("(", " ").replace(")", " ").replace(",", " ").split():
                if word.split(".")[0] in LAYERS and "." in word and word.replace(".", "").replace("_", "").isalnum():
                    found.append((node.lineno, word))
    return found


def forbidden_imports(layer: str) -> list[str]:
    allowed = set(LAYERS[: LAYERS.index(layer) + 1])
    problems = []
    for path in sorted((REPO / layer).rglob("*.py")):
        for line, module in _imported_modules(path):
            top = module.split(".")[0]
            if top in LAYERS and top not in allowed:
                problems.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    return problems


@pytest.mark.parametrize("layer", ["domains", "datasite_setup"])
def test_layer_imports_only_the_layers_below_it(layer: str) -> None:
    assert forbidden_imports(layer) == []


def test_the_check_sees_imports_in_functions_and_module_names_in_strings(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text('def f():\n    from analyses.federation import FedAvg\nPRELOAD = ("numpy", "analyses.site_tasks")\n')
    assert [m for _, m in _imported_modules(sample)] == ["analyses.federation", "analyses.site_tasks"]
