"""The layering rules of STYLE.md, checked by parsing imports (no module is executed)."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_cache_tools_never_imports_adaspec_transformers_or_torch_nn():
    files = sorted((REPO / "cache_tools").rglob("*.py"))
    assert files
    for path in files:
        for name in _imports(path):
            root = name.split(".")[0]
            assert root != "adaspec", f"{path.name} imports {name}"
            assert root != "transformers", f"{path.name} imports {name}"
            assert not name.startswith("torch.nn"), f"{path.name} imports {name}"
            assert root != "torch", f"{path.name} imports {name} (the cache format is numpy/zarr)"


def test_pure_math_modules_import_only_torch():
    allowed_roots = {"torch", "math", "typing", "dataclasses", "__future__", "collections"}
    for module in ("losses", "selection", "acceptance"):
        path = REPO / "adaspec" / f"{module}.py"
        assert path.is_file(), f"adaspec/{module}.py is missing"
        for name in _imports(path):
            assert name.split(".")[0] in allowed_roots, f"{module}.py imports {name}"


def test_the_rule_detects_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from adaspec.models import load_model\nimport torch.nn as nn\n")
    assert {"adaspec.models", "torch.nn"} <= _imports(bad)
