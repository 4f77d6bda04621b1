"""The architecture rules: the core and the reader helper never import Dagster, and no module of
the package takes part in an import circle (function-local imports included)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import imagenet_int8_assets

PACKAGE = Path(imagenet_int8_assets.__file__).parent
CORE = PACKAGE / "core"

CODE = """
import importlib, pkgutil, sys
import imagenet_int8_assets.core as core
count = 0
for module in pkgutil.walk_packages(core.__path__, "imagenet_int8_assets.core."):
    importlib.import_module(module.name)
    count += 1
import imagenet_int8_assets.reader
print(count)
print(sorted(k for k in sys.modules if k == "dagster" or k.startswith("dagster.")))
"""


@pytest.mark.slow
def test_core_and_reader_import_without_dagster():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    *_, count, dagster_modules = out.stdout.strip().splitlines()
    assert dagster_modules == "[]"
    # every module of every stage subpackage was imported (walk_packages, not the top level only)
    files = [p for p in CORE.rglob("*.py")]
    assert int(count) == len(files) - 1, (count, len(files))


def test_the_package_lists_its_lazy_definitions_for_dagster():
    import imagenet_int8_assets

    assert "defs" in dir(imagenet_int8_assets)


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``path`` imports anywhere in it (top level and inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                found.add(name if name in modules else node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {name for name in found if name in modules}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    result: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return result


def test_no_module_takes_part_in_an_import_circle():
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: _imports(path, set(paths)) - {name} for name, path in paths.items()}
    assert _cycles(graph) == []
    # the check can fail: a circle made up of two real modules is found
    graph["imagenet_int8_assets.core.common.files"] = {"imagenet_int8_assets.core.common.layout"}
    graph["imagenet_int8_assets.core.common.layout"] |= {"imagenet_int8_assets.core.common.files"}
    assert _cycles(graph) == [["imagenet_int8_assets.core.common.files", "imagenet_int8_assets.core.common.layout"]]


def test_the_core_is_split_into_stage_subpackages_with_nothing_at_its_top():
    top = sorted(p.name for p in CORE.iterdir() if p.suffix == ".py" and p.name != "__init__.py")
    assert top == []
    stages = sorted(p.name for p in CORE.iterdir() if (p / "__init__.py").is_file())
    assert stages == ["common", "crops", "dataset", "hub", "latents", "quality", "reading", "source"]
