"""The test tiers: a test that starts a process is marked ``slow`` (or ``cluster``), so the unit tier
(``-m "not slow and not cluster"``, pyproject.toml's markers) runs in-process only."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
#: What starts a process in a test's source.
STARTS_A_PROCESS = ("subprocess.", "sys.executable", "Popen(", "multiprocessing")


def _segment(lines: list[str], node: ast.AST) -> str:
    """The source lines of ``node`` (``ast.get_source_segment`` splits the whole file again at each call: 16 s)."""
    return "\n".join(lines[node.lineno - 1 : node.end_lineno])


def _marks(decorators: list[ast.expr], lines: list[str]) -> str:
    return " ".join(_segment(lines, decorator) for decorator in decorators)


def _unmarked_tests_starting_processes(path: Path) -> list[str]:
    """Tests in ``path`` that start a process themselves, or through a function of the same file, unmarked."""
    source = path.read_text()
    tree, lines = ast.parse(source), source.splitlines()
    module_marks = " ".join(_segment(lines, node) for node in tree.body
                            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "pytestmark"
                                                                    for t in node.targets))
    if "slow" in module_marks or "cluster" in module_marks:
        return []
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}

    found: dict[str, bool] = {}

    def starts(name: str) -> bool:
        if name not in found:
            found[name] = False  # a function calling itself, meanwhile
            node = functions[name]
            called = {call.func.id for call in ast.walk(node)
                      if isinstance(call, ast.Call) and isinstance(call.func, ast.Name)} & functions.keys()
            found[name] = (any(word in _segment(lines, node) for word in STARTS_A_PROCESS)
                           or any(starts(other) for other in called))
        return found[name]

    return [name for name, node in functions.items() if name.startswith("test_") and starts(name)
            and not any(word in _marks(node.decorator_list, lines) for word in ("mark.slow", "mark.cluster"))]


def test_tests_that_start_a_process_are_not_in_the_unit_tier():
    unmarked = {path.name: found for path in sorted(TESTS.glob("test_*.py")) if path.name != Path(__file__).name
                if (found := _unmarked_tests_starting_processes(path))}
    assert unmarked == {}


def test_the_check_finds_an_unmarked_test_through_a_helper(tmp_path):
    (tmp_path / "test_x.py").write_text(
        "import subprocess, sys, pytest\n"
        "def _run():\n    return subprocess.run([sys.executable, '-c', ''])\n"
        "def test_a():\n    _run()\n"
        "@pytest.mark.slow\ndef test_b():\n    _run()\n"
        "def test_c():\n    pass\n")
    assert _unmarked_tests_starting_processes(tmp_path / "test_x.py") == ["test_a"]
