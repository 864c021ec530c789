"""`pipeline runs`: the table of five runs of two competitions, built from the runs' own files.

The run folders are written through the run layout and the config schema
(runs.py, config.py), the submissions through submissions/index.csv's writer,
so the table reads what training and predict write.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import competitions  # noqa: F401  (the registry)
from pipeline.cli.app import app
from pipeline.competition import get_competition
from pipeline.config import resolve_config
from pipeline.predict.submission_index import record_submission
from pipeline.runs import Run

# (folder, competition, recipe, flags, folds' kept scores or holdout's, seconds per member)
RUNS = [
    ("runs/digits-a", "digits", None, {"folds": 3, "lr": 0.3}, [0.90, 0.92, 0.94], 10.0),
    ("runs/digits-b", "digits", None, {"folds": 3, "lr": 0.1}, [0.95, 0.96, 0.97], 20.0),
    ("runs/digits-c", "digits", None, {"lr": 0.1, "epochs": 3}, [0.80], 5.0),  # holdout only
    ("runs/dogs/one", "dog-breed-identification", None, {"folds": 2, "model": "resnet18"}, [1.9, 2.1], 30.0),
    ("runs/dogs/two", "dog-breed-identification", None, {"folds": 2, "model": "resnet34"}, [1.2, 1.4], 40.0),
]


def write_run(root: Path, folder: str, slug: str, recipe, flags: dict, scores: list[float], seconds: float,
              finish: int | None = None) -> Run:
    """A run as training leaves it: config.json, members' done/best/metrics, cv.json for fold runs."""
    comp = get_competition(slug)
    run = Run(root / folder)
    resolved = resolve_config(comp, root / "work", run.dir, recipe, flags, weights_config=lambda m: {})
    run.dir.mkdir(parents=True)
    (run.config_path).write_text(json.dumps(resolved.to_json()))
    names = [f"fold{k}" for k in range(len(scores))] if flags.get("folds") else ["holdout"]
    for n, (name, value) in enumerate(zip(names, scores)):
        member = run.member(name)
        member.dir.mkdir()
        member.metrics_path.write_text(f"epoch,seconds\n1,{seconds / 2}\n2,{seconds / 2}\n")
        if finish is not None and n >= finish:
            continue
        member.best_path.write_bytes(b"weights")
        member.mark_done({"epochs": 2, "best": {"epoch": 2, "metric": value},
                          "kept": {"epoch": 2, "metric": value, "interval": [value - 0.05, value + 0.05]}})
    if flags.get("folds"):
        cv = sum(scores) / len(scores)
        (run.cv_path).write_text(json.dumps({"metric": comp.metric, "cv": cv, "interval": [cv - 0.01, cv + 0.01]}))
    return run


@pytest.fixture
def five_runs(tmp_path):
    for spec in RUNS:
        write_run(tmp_path, *spec)
    index = tmp_path / "submissions" / "index.csv"
    for name, folder in (("digits.csv", "runs/digits-b"), ("digits2.csv", "runs/digits-b"),
                         ("dogs.csv", "runs/dogs/two")):
        record_submission(index, competition="x", file=name, run_dir=os.path.relpath(tmp_path / folder, index.parent),
                          model="m", cv_score=None, members=1, tta="none")
    return tmp_path


def test_the_table_lists_every_run_with_its_columns(five_runs, monkeypatch):
    monkeypatch.chdir(five_runs)
    result = CliRunner().invoke(app, ["runs", "--json"])  # default: runs/ and submissions/index.csv
    assert result.exit_code == 0, result.output
    rows = {Path(r["run_dir"]).as_posix(): r for r in json.loads(result.stdout)["runs"]}
    assert sorted(rows) == sorted(folder for folder, *_ in RUNS)
    b = rows["runs/digits-b"]
    assert (b["competition"], b["model"], b["recipe"], b["metric"]) == ("digits", "fastnet_s", "default", "accuracy")
    assert (b["members_finished"], b["members_planned"], b["score_kind"]) == (3, 3, "cv")
    assert b["score"] == pytest.approx(0.96) and b["interval"] == pytest.approx([0.95, 0.97])
    assert b["seconds"] == pytest.approx(60.0) and b["submissions"] == ["digits.csv", "digits2.csv"]
    c = rows["runs/digits-c"]  # no CV: the holdout's kept score and interval
    assert (c["score_kind"], c["score"], c["interval"]) == ("holdout", 0.80, pytest.approx([0.75, 0.85]))
    assert rows["runs/dogs/two"]["submissions"] == ["dogs.csv"] and rows["runs/dogs/one"]["submissions"] == []
    # the settings that differ between the listed runs, and only those
    assert rows["runs/digits-a"]["settings"]["lr"] == 0.3 and rows["runs/digits-b"]["settings"]["lr"] == 0.1
    assert rows["runs/digits-c"]["settings"]["epochs"] == 3
    assert "model" not in b["settings"] and "momentum" not in b["settings"]  # own column; equal everywhere
    assert rows["runs/dogs/one"]["metric"] == "log_loss"


def test_sort_by_cv_puts_the_best_first_under_each_metric(five_runs, monkeypatch):
    monkeypatch.chdir(five_runs)
    result = CliRunner().invoke(app, ["runs", "runs/dogs", "--sort", "cv"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split()[:5] == ["run", "competition", "model", "recipe", "members"]
    assert [line.split()[0] for line in lines[1:]] == ["runs/dogs/two", "runs/dogs/one"]  # log loss: lower first
    assert "log_loss 1.3000" in lines[1] and "1.2900-1.3100" in lines[1] and "dogs.csv" in lines[1]
    assert "model=" not in result.stdout  # the model has its column; equal settings are not listed
    result = CliRunner().invoke(app, ["runs", "runs/digits-a", "runs/digits-b", "runs/digits-c", "--sort", "cv"])
    assert [line.split()[0] for line in result.stdout.splitlines()[1:]] == \
        ["runs/digits-b", "runs/digits-a", "runs/digits-c"]  # accuracy: higher first; holdout 0.80 last
    result = CliRunner().invoke(app, ["runs", "--sort", "cv"])  # both competitions: each its own ranking
    assert [line.split()[0] for line in result.stdout.splitlines()[1:]] == \
        ["runs/digits-b", "runs/digits-a", "runs/digits-c", "runs/dogs/two", "runs/dogs/one"]


def test_unfinished_members_count_as_planned(tmp_path, monkeypatch):
    write_run(tmp_path, "runs/half", "digits", None, {"folds": 3}, [0.9, 0.9, 0.9], 1.0, finish=1)
    (tmp_path / "runs/half/cv.json").unlink()
    monkeypatch.chdir(tmp_path)
    row = json.loads(CliRunner().invoke(app, ["runs", "--json"]).stdout)["runs"][0]
    assert (row["members_finished"], row["members_planned"], row["score"]) == (1, 3, None)


def test_the_table_prints_in_under_a_second_without_torch_or_pandas(five_runs):
    probe = ("import sys\nfrom pipeline.cli.app import run\nsys.argv = ['pipeline', 'runs', 'runs']\n"
             "try:\n    run()\nexcept SystemExit as exc:\n    code = exc.code\n"
             "print('heavy:', sorted(m for m in ('torch', 'pandas') if m in sys.modules), code, "
             "file=sys.stderr)")
    cpu, wall = [], []
    for _ in range(3):  # the best of three: the machine is shared
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", probe], cwd=five_runs, capture_output=True, text=True,
                              timeout=60)
        wall.append(time.perf_counter() - t0)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    assert proc.returncode == 0 and "heavy: [] 0" in proc.stderr, proc.stderr
    assert len(proc.stdout.splitlines()) == 6  # the header and five runs
    # the process's own time (interpreter start included); wall time on an idle machine is about the same,
    # on a shared one it is whatever the other processes leave
    assert min(cpu) < 1.0, (cpu, wall)
