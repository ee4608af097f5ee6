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


PURE_MATH = ("losses", "selection", "acceptance", "sparse", "statistics", "speedup")


def test_pure_math_modules_import_only_torch():
    """The math core imports torch and the standard library, and each other, nothing else."""
    allowed_roots = {"torch", "math", "typing", "dataclasses", "__future__", "collections"}
    allowed = {f"adaspec.{m}" for m in PURE_MATH}
    for module in PURE_MATH:
        path = REPO / "adaspec" / f"{module}.py"
        assert path.is_file(), f"adaspec/{module}.py is missing"
        for name in _imports(path):
            ok = name.split(".")[0] in allowed_roots or any(
                name == m or name.startswith(m + ".") for m in allowed)
            assert ok, f"{module}.py imports {name}"


def _private_uses(path: Path) -> list[str]:
    """`from x import _name` and `module._name` uses of another module's private names."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found += [f"{node.module}.{a.name}" for a in node.names
                      if a.name.startswith("_") and not a.name.startswith("__")]
        elif (isinstance(node, ast.Attribute) and node.attr.startswith("_")
              and not node.attr.startswith("__") and isinstance(node.value, ast.Name)
              and node.value.id not in ("self", "cls")):
            found.append(f"{node.value.id}.{node.attr}")
    return found


# Private names of third-party libraries used on purpose (with the reason in the code).
THIRD_PARTY_PRIVATE = {"AcceleratorState._shared_state", "AcceleratorState._reset_state"}


def test_no_module_imports_another_modules_private_names():
    """Modules meet at public names; a private name used across modules is a missing seam."""
    ours = {p.stem for p in (REPO / "adaspec").rglob("*.py")} | {
        p.stem for p in (REPO / "cache_tools").rglob("*.py")} | {"adaspec", "cache_tools"}
    files = [*(REPO / "adaspec").rglob("*.py"), *(REPO / "cache_tools").rglob("*.py"),
             *(REPO / "bench").rglob("*.py"), *(REPO / "studies").rglob("*.py")]
    assert files
    for path in files:
        for use in _private_uses(path):
            owner = use.rsplit(".", 1)[0].split(".")[-1]
            if use in THIRD_PARTY_PRIVATE:
                continue
            assert owner not in ours, f"{path.relative_to(REPO)} uses private {use}"


def test_the_rule_detects_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from adaspec.models import load_model\nimport torch.nn as nn\n"
                   "from adaspec.build import _Layout\nx = train._needs_ref(cfg)\n")
    assert {"adaspec.models", "torch.nn"} <= _imports(bad)
    assert _private_uses(bad) == ["adaspec.build._Layout", "train._needs_ref"]


def test_training_does_not_import_speculative_decoding():
    """Training validates teacher-forced; decoding (and its timing) is evaluation's business."""
    import subprocess
    import sys

    code = ("import sys, adaspec.train, adaspec.validation, adaspec.sweep; "
            "print(sorted(m for m in sys.modules if m.startswith('adaspec.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO).stdout
    assert "'adaspec.train'" in out
    for decoding in ("adaspec.speculative", "adaspec.speculative_timing", "adaspec.evaluate"):
        assert f"'{decoding}'" not in out, f"training imports {decoding}"


def _module_imports(path: Path) -> set[str]:
    """Every module of ours (SCANNED) a file imports, at the top or inside a function."""
    found = set()
    for name in _imports(path):
        parts = name.split(".")
        if parts[0] in SCANNED:
            for i in range(2 if parts[0] != "harness" else 1, len(parts) + 1):
                found.add(".".join(parts[:i]))
    return found


# The library, its cache format, and the annexes (benchmarks, studies) with their shared plumbing.
SCANNED = ("adaspec", "cache_tools", "harness", "bench", "studies")
# Modules of studies/ that are not studies: what several studies share.
STUDY_SHARED = {"__init__", "decision_rule", "paper_setup", "fidelity_measures"}


def test_the_annexes_stand_on_the_library_and_harness_only():
    """bench/ and studies/ never import each other, and no study imports another study (what
    they share lives in harness/, adaspec/experiment.py or a shared module of studies/)."""
    for path in sorted((REPO / "studies").rglob("*.py")):
        imported = _module_imports(path)
        assert not {m for m in imported if m.startswith("bench")}, f"{path.name} imports bench/"
        studies = {m.split(".")[1] for m in imported if m.startswith("studies.")}
        assert studies <= STUDY_SHARED, f"{path.name} imports the studies {studies - STUDY_SHARED}"
    for path in sorted((REPO / "bench").rglob("*.py")):
        assert not {m for m in _module_imports(path) if m.startswith("studies")}, \
            f"{path.relative_to(REPO)} imports studies/"
    harness_imports = _module_imports(REPO / "harness" / "__init__.py")
    assert not {m for m in harness_imports if m.split(".")[0] in ("bench", "studies")}


def test_no_import_cycle_at_run_time():
    """No module imports (even inside a function) one that imports it back."""
    modules = {}
    for root in SCANNED:
        for path in (REPO / root).rglob("*.py"):
            rel = path.relative_to(REPO).with_suffix("")
            name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
            modules[name] = path
    graph = {m: {d for d in _module_imports(p) if d in modules and d != m}
             for m, p in modules.items()}
    # a package's __init__ re-exporting its submodules is not a cycle with them
    for m in graph:
        graph[m] = {d for d in graph[m] if not m.startswith(d + ".")}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            assert state.get(d) != 1, "import cycle: " + " -> ".join(stack + [m, d])
            if d not in state:
                visit(d, stack + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_the_readme_module_table_lists_every_module():
    text = (REPO / "README.md").read_text()
    table = text[text.index("| module | its one job |"):]
    table = table.split("\n\n")[0]
    for root in ("adaspec", "cache_tools"):
        for path in (REPO / root).glob("*.py"):
            if path.name == "__init__.py":
                continue
            listed = f"{root}/{path.name}" in table or f"`{path.name}`" in table
            assert listed, f"README's module table does not list {root}/{path.name}"
    for package in ("adaspec/tasks/", "adaspec/cli/"):
        assert f"`{package}`" in table


def test_test_modules_share_code_through_conftest_and_helpers_only():
    """Fixtures live in conftest.py and shared helpers in helpers.py: a test module importing
    another test module (or conftest) runs that module's tests' setup twice and hides the
    dependency."""
    for path in sorted((REPO / "tests").glob("*.py")):
        bad = sorted(name for name in _imports(path)
                     if name.split(".")[0].startswith("test_") or name.split(".")[0] == "conftest")
        assert bad == [], f"{path.name} imports {bad}"
