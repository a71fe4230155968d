"""The package's floor plan: three tiers importing only downward, at most 8 import levels, no cycles, a CLI on the
public API, and an import that changes no global configuration (docs/architecture.md)."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "chunkcca"

#: Each module's tier: it may import modules of its own tier or of lower ones only.
TIERS: dict[str, int] = {
    **dict.fromkeys(("_fs", "_stack", "options", "blas", "progress"), 0),  # plumbing: files, the user's frame,
    # options, BLAS, progress bars
    # numpy core: no Dask graphs, no stores
    **dict.fromkeys(("moments", "tiles", "rows", "minibatch", "whitening", "measures"), 1),
    **dict.fromkeys(("layers", "integrity", "store", "ingest", "record"), 2),  # inputs and storage
    **dict.fromkeys(("engine", "cluster", "checkpoint", "passes"), 3),  # the Dask engine
    **dict.fromkeys(("api", "compat", "plot", "report", "datasets", "demo", "cli", "__main__", "__init__"), 4),  # front
}
#: What the command line may import: the package and its documented modules.
PUBLIC = {"__init__", "demo", "ingest", "record", "compat", "options", "plot", "report", "cluster"}


def _imports() -> dict[str, set[str]]:
    """Module (file stem) → the package modules it imports anywhere in its body, from its source."""
    graph = {}
    for path in PACKAGE.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level == 1 or (node.module or "").startswith("chunkcca")):
                module = (node.module or "").removeprefix("chunkcca").lstrip(".")
                if not module:  # "from . import x" or "from chunkcca import x": the package, or its modules
                    found |= {alias.name for alias in node.names if (PACKAGE / f"{alias.name}.py").exists()}
                    found |= {"__init__"} if node.module == "chunkcca" and not found else set()
                else:
                    found.add(module.split(".")[0])
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == "chunkcca":
                        found.add("__init__")
                    elif alias.name.startswith("chunkcca."):
                        found.add(alias.name.split(".")[1])
        graph[path.stem] = found - {path.stem}
    return graph


def _levels(graph: dict[str, set[str]]) -> dict[str, int]:
    levels: dict[str, int] = {}

    def level(module: str, path: tuple[str, ...] = ()) -> int:
        if module in path:
            raise AssertionError(f"import cycle: {' -> '.join((*path, module))}")
        if module not in levels:
            levels[module] = 1 + max((level(m, (*path, module)) for m in graph[module]), default=0)
        return levels[module]

    for module in graph:
        level(module)
    return levels


def test_every_module_has_a_tier():
    assert set(_imports()) == set(TIERS)


def test_no_cycles_and_at_most_eight_levels():
    levels = _levels(_imports())
    assert max(levels.values()) <= 8, levels


def test_modules_import_only_from_their_tier_or_below():
    upward = [(module, imported) for module, imports in _imports().items() for imported in imports
              if TIERS[imported] > TIERS[module]]
    assert not upward


def test_the_command_line_uses_the_public_api_only():
    assert _imports()["cli"] <= PUBLIC


def test_only_the_adapters_module_names_an_adapter():
    """No module outside rows.py (and options.py, which declares the names) tests a spatial adapter by name."""
    tested = []
    for path in PACKAGE.glob("*.py"):
        if path.stem in ("rows", "options"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and any(
                    isinstance(side, ast.Constant) and side.value in ("flatten", "avgpool", "interp", "dft")
                    for side in (node.left, *node.comparators)):
                tested.append(f"{path.name}:{node.lineno}")
    assert not tested


@pytest.mark.slow
def test_importing_chunkcca_changes_no_global_configuration():
    code = ("import dask, zarr, sys; before = (dask.config.config.copy(), zarr.config.get('threading.max_workers'))\n"
            "import chunkcca\nchunkcca.cca\n"  # the public names load on first use
            "after = (dask.config.config, zarr.config.get('threading.max_workers'))\n"
            "assert before == after, (before, after)\n"
            "assert 'distributed' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)


@pytest.mark.slow
def test_the_package_loads_its_public_names_on_first_use():
    """``import chunkcca`` loads no library (the command answers a Ctrl-C while they load); each public name
    comes from the module its table names, is listed in ``__all__`` and ``dir()``, and nothing else is offered."""
    import chunkcca

    assert sorted(chunkcca.__all__) == sorted(chunkcca._HOMES)
    checked = ast.parse((PACKAGE / "__init__.py").read_text())
    typed = {alias.name: node.module for node in ast.walk(checked) if isinstance(node, ast.ImportFrom) and node.level
             for alias in node.names}
    assert typed == chunkcca._HOMES  # what type checkers see is what loads
    for name, home in chunkcca._HOMES.items():
        assert getattr(chunkcca, name) is getattr(importlib.import_module(f"chunkcca.{home}"), name)
    assert set(chunkcca.__all__) <= set(dir(chunkcca)) and "importlib" not in dir(chunkcca)
    modules = {path.stem for path in PACKAGE.glob("*.py") if not path.stem.startswith("_")}
    assert set(chunkcca._SUBMODULES) == modules
    code = ("import chunkcca; print(chunkcca.measures.__name__, chunkcca.options.StreamOptions.__name__, "
            "chunkcca.compat.__name__)")  # as after the eager import of old, and the docs' examples use them
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert done.stdout.split() == ["chunkcca.measures", "StreamOptions", "chunkcca.compat"]
    with pytest.raises(AttributeError, match="has no attribute 'cca_zoo'"):
        chunkcca.cca_zoo  # noqa: B018
    code = "import sys, chunkcca; print(sorted({'dask', 'xarray', 'zarr', 'numpy'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert done.stdout.strip() == "[]"


def test_the_reliability_page_names_tests_that_exist():
    """Each guarantee in docs/reliability.md names its test; a renamed or removed test fails here."""
    page = (PACKAGE.parent / "docs" / "reliability.md").read_text()
    named = re.findall(r"`(test_\w+\.py)::(test_\w+)`|`::(test_\w+)`", page)
    assert len(named) > 15
    current = None
    for file, test, continued in named:
        current = file or current
        source = (PACKAGE.parent / "tests" / current).read_text()
        assert f"def {test or continued}(" in source, f"{current}::{test or continued} is not a test"


def test_code_that_runs_in_tasks_does_not_swap_the_warning_filters():
    """``warnings.catch_warnings`` swaps the process's filters and is not thread-safe: in a fold's thread (a chunk's
    grid judged with nanstd quieted) it restored filters another thread had changed, and a user's
    ``catch_warnings(record=True)`` around a run intermittently recorded none of chunkcca's warnings."""
    in_tasks = ("moments", "rows", "tiles", "minibatch", "engine")
    used = [module for module in in_tasks for node in ast.walk(ast.parse((PACKAGE / f"{module}.py").read_text()))
            if isinstance(node, ast.Attribute) and node.attr == "catch_warnings"]
    assert not used
