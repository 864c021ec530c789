"""The package's shape: imports without cycles, one module owning run file names, small modules."""
from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from pipeline import runs
from pipeline.config import cli_fields

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"
RUN_FILE_NAMES = (runs.CONFIG_FILE, runs.METRICS_FILE, runs.LAST_FILE, runs.BEST_FILE, runs.DONE_FILE,
                  runs.OOF_FILE, runs.CV_FILE, runs.TEST_PROBS_FILE, runs.TEST_PROBS_META_FILE)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(encoding="utf-8")) for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    """ids of import nodes under `if TYPE_CHECKING:` (never run)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for n in ast.walk(node)}
    return skip


def imports_of(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The package modules that ``name`` imports anywhere (module level or inside functions)."""
    found, skip = set(), _type_checking_nodes(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m in known and m != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of the graph, or None (depth-first search with colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_pipeline_module_imports_in_a_cycle():
    trees = modules()
    # a package's __init__ imports its submodules; a submodule importing the package is the cycle to catch
    graph = {name: imports_of(name, tree, set(trees)) for name, tree in trees.items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def string_literals(tree: ast.Module) -> list[tuple[int, str]]:
    """Every string constant that is not a docstring, with its line."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def test_run_file_names_are_spelled_only_in_the_run_layout_module():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "runs.py":
            continue
        for line, text in string_literals(ast.parse(path.read_text(encoding="utf-8"))):
            offenders += [f"{path.name}:{line} {name}" for name in RUN_FILE_NAMES if name in text]
    assert offenders == []


def test_the_check_would_see_a_spelled_name():
    tree = ast.parse('"""best.pt in a docstring is fine"""\npath = run / "best.pt"\n')
    assert [text for _, text in string_literals(tree)] == ["best.pt"]


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: p.name)
def test_no_module_is_over_about_400_lines(path):
    assert len(path.read_text(encoding="utf-8").splitlines()) <= 420


def test_train_options_are_the_schema_fields():
    from pipeline.cli.train import train

    params = set(inspect.signature(train).parameters)
    fixed = {"competition", "work_dir", "run_dir", "recipe", "dry_run", "resume", "force", "track", "as_json"}
    assert params - fixed == {f.name for f in cli_fields()}
