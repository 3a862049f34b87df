"""The package's shape: concern packages, no import cycle, and a Lambda that stays light.

The import graph is read from the source (every `import`, at module level or inside a
function), so a cycle hidden in a function-level import counts too.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mmp.infra.lambda_package import HANDLERS, handler_module

PACKAGE = Path(__file__).resolve().parents[2] / "mmp"
ROOT_MODULES = {"__init__", "__main__", "cli", "config", "aws"}  # the CLI entry, config, the AWS client factory
NEVER_IN_LAMBDA = ("mlflow", "optuna", "torch", "paramiko", "pulumi", "pulumi_aws")


def module_names() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The mmp modules `name` imports anywhere in its source (a `from pkg import module` counts as the module)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    known = set(modules)
    # A package's __init__ importing its own modules is how a package re-exports, not a cycle.
    return {name: {t for t in imports_of(name, path, known) if not t.startswith(name + ".")}
            for name, path in modules.items()}


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_two_modules_of_mmp_import_each_other_even_through_others():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" ↔ ".join(c) for c in found)


def test_only_the_cli_entry_config_and_the_aws_factory_stand_at_the_root():
    loose = {p.stem for p in PACKAGE.glob("*.py")} - ROOT_MODULES
    assert not loose, f"modules at mmp/'s root that belong in a concern package: {sorted(loose)}"


def test_each_package_says_in_its_docstring_what_belongs_there():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and doc.strip(), f"{init.relative_to(PACKAGE.parent)} has no docstring"


def test_every_module_of_mmp_imports():
    names = sorted(n for n in module_names() if n != "mmp.__main__")  # __main__ runs the CLI
    code = ("import importlib, json, sys\nfailed = {}\n"
            f"for name in {names!r}:\n"
            "    try:\n        importlib.import_module(name)\n"
            "    except Exception as exc:\n        failed[name] = repr(exc)\n"
            "print(json.dumps(failed))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {}


@pytest.mark.parametrize("handler", sorted(set(HANDLERS.values())))
def test_a_lambda_handlers_import_closure_holds_nothing_heavy(handler):
    """What the Lambda imports for real (a cold start), not only what the zip holds."""
    module = handler_module(handler)
    code = (f"import importlib, json, sys\nimportlib.import_module({module!r})\n"
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert not loaded & set(NEVER_IN_LAMBDA), f"{handler} imports {sorted(loaded & set(NEVER_IN_LAMBDA))}"
