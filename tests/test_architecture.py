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
    fixed = {"competition", "work_dir", "run_dir", "recipe", "dry_run", "resume", "force", "track", "predict_csv",
             "as_json"}
    assert params - fixed == {f.name for f in cli_fields()}


# ---------------------------------------------------------------- the package by stage

# A module may import its own subpackage and any lower layer; core modules (pipeline/*.py) only core.
LAYERS = {"core": 0, "models": 1, "download": 1, "data": 2, "predict": 3, "train": 4, "report": 5, "kernel": 5,
          "cli": 6}
WORK_FILE_NAMES = ("reorg.json", "folds.csv", "sample_submission.csv", ".reorg.lock")


def layer_of(module: str) -> str:
    if module == "pipeline.__main__":  # `python -m pipeline`: the entry point, above the commands
        return "cli"
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else "core"


def wrong_way(graph: dict[str, set[str]]) -> list[str]:
    """Imports that go up the layers, or sideways between two subpackages of one layer."""
    bad = []
    for name, targets in graph.items():
        own = layer_of(name)
        for target in sorted(targets):
            other = layer_of(target)
            if other != own and LAYERS[other] >= LAYERS[own]:
                bad.append(f"{name} -> {target}")
    return bad


def test_imports_run_one_way_between_the_stages():
    trees = modules()
    graph = {name: imports_of(name, tree, set(trees)) for name, tree in trees.items()}
    assert wrong_way(graph) == []


def test_the_direction_check_sees_a_model_importing_training():
    graph = {"pipeline.models.registry": {"pipeline.train.stage"}, "pipeline.train.stage": {"pipeline.models"},
             "pipeline.config": {"pipeline.models"}, "pipeline.report.build": {"pipeline.kernel.build"},
             "pipeline.cli.app": {"pipeline.io"}}
    assert wrong_way(graph) == ["pipeline.models.registry -> pipeline.train.stage", "pipeline.config -> pipeline.models",
                                "pipeline.report.build -> pipeline.kernel.build"]


def test_the_top_level_is_the_small_core_and_the_stages():
    top = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__"))
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file())
    assert len(top) <= 12, top
    assert set(folders) == set(LAYERS) - {"core"}
    prefixed = [p.name for p in PACKAGE.rglob("*.py") if p.name.startswith(("cli_", "report_", "kernel_"))]
    assert prefixed == []


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_module_says_what_it_is_in_its_docstring(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    assert ast.get_docstring(tree), f"{path} has no module docstring"


def test_work_folder_file_names_are_spelled_only_in_the_work_folder_module():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "workdir.py":
            continue
        for line, text in string_literals(ast.parse(path.read_text(encoding="utf-8"))):
            offenders += [f"{path.name}:{line} {name}" for name in WORK_FILE_NAMES if name == text]
    assert offenders == []


def test_a_members_share_of_the_images_is_computed_in_one_place():
    calls = [f"{p.relative_to(PACKAGE)}:{i}" for p in sorted(PACKAGE.rglob("*.py"))
             for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if "per_process(" in line]
    assert len(calls) <= 2, calls  # its definition and the member plan
