"""Light commands import nothing heavy: which modules a CLI command loads, read from a fresh interpreter.

Timing belongs to benchmarks/bench_startup.py; these tests pin the cause of a
slow start (torch, pandas, numpy or pydantic imported by a command that does
not use them), which does not depend on the machine's load.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from conftest import write_raw
from pipeline.cli.coerce import PLAIN_TYPES, is_plain
from pipeline.cli.common import command, typer_app
from pipeline.competition import get_competition

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "timm", "sklearn", "albumentations", "pandas", "numpy", "pydantic", "PIL", "matplotlib")

# Runs `pipeline ARGS...` in this interpreter, then writes the heavy modules it imported to the file named last.
PROBE = """
import json, runpy, sys
out, sys.argv = sys.argv[-1], ["pipeline", *sys.argv[1:-1]]
try:
    runpy.run_module("pipeline", run_name="__main__")
except SystemExit as exc:
    code = exc.code
else:
    code = 0
with open(out, "w") as fh:
    json.dump({"code": code, "heavy": [m for m in %r if m in sys.modules]}, fh)
""" % (HEAVY,)


def loaded_by(tmp_path: Path, *args) -> tuple[int, list[str]]:
    """(exit code, heavy modules imported) of `pipeline ARGS...` in a fresh interpreter."""
    out = tmp_path / "modules.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", PROBE, *map(str, args), out], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=120)
    assert out.is_file(), done.stderr
    result = json.loads(out.read_text())
    assert result["code"] == 0, done.stderr
    return result["code"], result["heavy"]


@pytest.fixture
def cifar_work(tmp_path):
    """A small download in the cifar-10 layout, reorganised once through the package."""
    from pipeline.download.reorg import reorg

    comp = get_competition("cifar-10")
    raw = write_raw(tmp_path / "raw", comp, per_class=6, n_test=5)
    reorg(comp, raw, tmp_path / "work")
    return raw, tmp_path / "work"


def test_a_reorg_with_nothing_to_do_imports_nothing_heavy(cifar_work, tmp_path):
    raw, work = cifar_work
    code, heavy = loaded_by(tmp_path, "reorg", "cifar-10", raw, work)
    assert code == 0
    assert heavy == []  # not even numpy, pandas or typer's pydantic: the fingerprint matches, nothing is read


def test_a_full_reorg_loads_pandas_but_no_model_code(tmp_path):
    comp = get_competition("cifar-10")
    raw = write_raw(tmp_path / "raw", comp, per_class=6, n_test=5)
    code, heavy = loaded_by(tmp_path, "reorg", "cifar-10", raw, tmp_path / "work")
    assert code == 0 and (tmp_path / "work" / "reorg.json").is_file()
    assert "pandas" in heavy  # planning the split reads the labels: the lazy imports still happen where needed
    assert not {"torch", "timm", "sklearn", "albumentations", "pydantic"} & set(heavy)


def test_check_and_help_do_not_import_torch(cifar_work, tmp_path):
    raw, work = cifar_work
    code, heavy = loaded_by(tmp_path, "check", "cifar-10", work / "sample_submission.csv", "--work-dir", work)
    assert code == 0
    assert not {"torch", "timm", "sklearn", "albumentations", "pydantic"} & set(heavy)
    code, heavy = loaded_by(tmp_path, "--help")
    assert code == 0 and heavy == []


# ---------------------------------------------------------------- plain values without pydantic


def _app(seen: dict):
    app = typer_app()

    @command(app)
    def run(count: int = typer.Option(3), ratio: float = typer.Option(0.5), name: str = typer.Option("x"),
            where: Path = typer.Option(Path("."), exists=True), flag: bool = typer.Option(False, "--flag"),
            bounded: int = typer.Option(1, min=1)) -> None:
        seen.update(count=count, ratio=ratio, name=name, where=where, flag=flag, bounded=bounded)

    @command(app)
    def other() -> None:  # a second command: the app is a group, as the pipeline's
        pass

    return app


def test_plain_values_are_converted_as_typer_would(tmp_path):
    seen: dict = {}
    result = CliRunner().invoke(_app(seen), ["run", "--count", "7", "--ratio", "1e-3", "--name", "dog",
                                             "--where", str(tmp_path), "--flag", "--bounded", "4"])
    assert result.exit_code == 0, result.output
    assert seen == {"count": 7, "ratio": 0.001, "name": "dog", "where": tmp_path, "flag": True, "bounded": 4}
    assert type(seen["count"]) is int and type(seen["ratio"]) is float and isinstance(seen["where"], Path)


@pytest.mark.parametrize("args, message", [
    (["--count", "2.5"], "'2.5' is not a valid integer"),
    (["--ratio", "half"], "'half' is not a valid number"),
    (["--where", "/no/such/folder"], "does not exist"),  # typer's own path check still runs
    (["--bounded", "0"], "greater than or equal to 1"),  # a bounded option keeps typer's conversion
])
def test_a_bad_value_is_a_usage_error_naming_it(args, message):
    result = CliRunner().invoke(_app({}), ["run", *args])
    assert result.exit_code == 2
    assert message in result.output


def test_only_single_unbounded_values_of_plain_types_skip_typer_conversion():
    group = typer.main.get_group(_app({}))
    params = {p.name: p for p in group.commands["run"].params}
    assert {n for n, p in params.items() if is_plain(p)} == {"count", "ratio", "name", "where", "flag"}
    assert set(PLAIN_TYPES) == {str, int, float, Path, bool}


def test_importing_the_augmentations_opens_no_network_connection():
    """albumentations checks PyPI for updates on import unless told not to; the package tells it (offline
    kernels would wait on the timeout in every process)."""
    probe = (
        "import socket\n"
        "tried = []\n"
        "def refuse(self, address):\n"
        "    tried.append(address)\n"
        "    raise OSError('no network in this test')\n"
        "socket.socket.connect = refuse\n"
        "import pipeline.data.presets, albumentations\n"
        "print(len(tried))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.strip() == "0", done.stderr
    # the probe itself sees a connection when the setting is absent: it would catch a regression
    bare = subprocess.run([sys.executable, "-c", probe.replace("import pipeline.data.presets, ", "import ")],
                          capture_output=True, text=True, env=env, check=True)
    assert bare.stdout.strip() != "0"
