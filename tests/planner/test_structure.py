"""The planner's house rules, read from the source (ast) so they cannot quietly regress:
imports run one way between the stage packages, modules and functions stay short, the top
level stays small, and the planner's command line never imports torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PLANNER = ROOT / "planner"
# Each package may import the shared top-level modules (errors, units, schema, version) and
# the packages listed for it: the stages of the data flow, never one further down.
ALLOWED = {
    "model": set(),
    "hardware": set(),
    "cost": {"model", "hardware"},
    "plan": {"model", "hardware", "cost"},
    "solve": {"model", "hardware", "cost", "plan"},
    "simulate": {"model", "hardware", "cost", "plan"},
    "cli": {"model", "hardware", "cost", "plan", "solve", "simulate"},
}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
MAX_TOP_LEVEL_FILES = 8


def _modules() -> list[Path]:
    return sorted(PLANNER.rglob("*.py"))


def _imported(path: Path) -> set[str]:
    """Names of the planner modules `path` imports (absolute imports, anywhere in the file)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m == "planner" or m.startswith("planner.")}


def _package(path: Path) -> str | None:
    rel = path.relative_to(PLANNER)
    return rel.parts[0] if len(rel.parts) > 1 else None


def test_stage_packages_import_one_way():
    wrong = []
    for path in _modules():
        package = _package(path)
        if package is None:
            continue
        assert package in ALLOWED, f"new package planner/{package}: add it to ALLOWED and ARCHITECTURE.md"
        for module in _imported(path):
            parts = module.split(".")
            target = parts[1] if len(parts) > 1 else None
            if target in ALLOWED and target != package and target not in ALLOWED[package]:
                wrong.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not wrong, "imports against the data flow:\n" + "\n".join(sorted(wrong))


def test_the_executor_sits_beside_the_planner_not_above_it():
    """executor/ runs plans: it reads plans, costs and timelines, never the solver or the
    command line; inside planner/ only the command line starts it (lazily)."""
    wrong = []
    for path in sorted((ROOT / "executor").glob("*.py")):
        wrong += [f"{path.name} imports {m}" for m in _imported(path) if m.split(".")[1:2] in (["cli"], ["solve"])]
    for path in _modules():
        if _package(path) != "cli":
            text = path.read_text()
            tree = ast.parse(text)
            names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
            wrong += [f"{path.relative_to(ROOT)} imports {m}" for m in names if m.split(".")[0] in ("executor", "torch")]
    assert not wrong, wrong


def test_top_level_modules_import_no_stage_package():
    for path in PLANNER.glob("*.py"):
        stages = {m.split(".")[1] for m in _imported(path) if m.count(".") >= 1} & set(ALLOWED)
        assert not stages, f"{path.name} imports {stages}: shared basics sit below every stage"


def test_the_checks_see_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from planner.cli.app import app\nimport planner.solve.ilp\n")
    assert _imported(bad) == {"planner.cli.app", "planner.cli.app.app", "planner.solve.ilp"}


def test_modules_and_functions_stay_short():
    long_modules, long_functions = [], []
    for path in [*_modules(), *sorted((ROOT / "executor").glob("*.py"))]:
        text = path.read_text()
        if len(text.splitlines()) >= MAX_MODULE_LINES:
            long_modules.append(f"{path.relative_to(ROOT)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines >= MAX_FUNCTION_LINES:
                    long_functions.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {lines} lines")
    assert not long_modules, f"modules of {MAX_MODULE_LINES}+ lines: {long_modules}"
    assert not long_functions, f"functions of {MAX_FUNCTION_LINES}+ lines: {long_functions}"


def test_top_level_stays_small():
    files = sorted(p.name for p in PLANNER.glob("*.py"))
    assert len(files) <= MAX_TOP_LEVEL_FILES, files


@pytest.mark.parametrize("module", ["planner.cli", "planner.cli.app"])
def test_the_command_line_imports_no_torch(module):
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_readme_and_architecture_name_every_package():
    packages = {p.parent.name for p in PLANNER.glob("*/__init__.py")}
    assert packages == set(ALLOWED), "a new package: add it to ALLOWED, ARCHITECTURE.md and README"
    architecture = (ROOT / "ARCHITECTURE.md").read_text()
    development = (ROOT / "README.md").read_text().split("## Development", 1)[1]
    for package in sorted(packages):
        assert f"planner/{package}" in architecture, package
        assert f"planner/{package}" in development, package
