"""Folds trained by separate processes at once on one RUN_DIR, and the CV they assemble exactly once.

Real `python -m pipeline` processes on a toy download (36 images of coloured
squares, a spec file, 3 folds): three `--fold K` processes started together
must overlap in time, finish, write cv.json once (one process logs the CV, the
others find it waiting or done) and give the same cv.json as one sequential
`--folds 3` process with the same seeds.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli.app import app
from pipeline.errors import PipelineError
from pipeline.io import exclusive_lock
from pipeline.runs import Run
from tests.conftest import make_competition, write_raw

PY = sys.executable
TRAIN = ("--epochs", "2", "--batch-size", "8", "--device", "cpu", "--num-workers", "0")
SPEC = '''slug = "toyspec"
title = "toy"
layout = "csv"
labels_file = "labels.csv"
id_column = "id"
label_column = "label"
train_dir = "train"
test_dir = "test"
image_ext = ".png"
sample_submission = "sample.csv"
submission = "label"
submission_label_column = "label"
metric = "accuracy"
image_size = 16
mean = [0.5, 0.5, 0.5]
std = [0.25, 0.25, 0.25]
[recipe]
model = "fastnet_s"
epochs = 2
batch_size = 8
lr = 0.3
schedule = "cosine"
augment = "pad_crop_flip"
'''


def cli(*args: object, cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen([PY, "-m", "pipeline", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def finished(proc: subprocess.Popen) -> tuple[str, str]:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return out, err


def reorganised(tmp_path: Path, folds: int) -> tuple[Path, Path]:
    """(spec file, work folder): the toy download described by a spec file, reorganised into ``folds`` folds."""
    raw = write_raw(tmp_path / "raw", make_competition("toy"))
    spec = tmp_path / "toy.toml"
    spec.write_text(SPEC)
    result = CliRunner().invoke(app, ["reorg", str(spec), str(raw), str(tmp_path / "work"), "--folds", str(folds)])
    assert result.exit_code == 0, result.output  # in this process: the training processes load the spec themselves
    return spec, tmp_path / "work"


@pytest.fixture
def spec_work(tmp_path) -> tuple[Path, Path]:
    return reorganised(tmp_path, 3)


def comparable(cv: dict) -> dict:
    """cv.json without what differs between two trainings of the same weights: the files' stamps and the
    seconds each fold took."""
    folds = [{k: v for k, v in f.items() if k != "seconds"} for f in cv["folds"]]
    return {**{k: v for k, v in cv.items() if k != "weights"}, "folds": folds}


@pytest.mark.slow  # four real training processes (about a minute on two cores)
def test_three_fold_processes_at_once_write_the_cv_once_as_a_sequential_run(spec_work, tmp_path):
    spec, work = spec_work
    par, seq = Run(tmp_path / "par"), Run(tmp_path / "seq")
    procs = [cli("train", spec, work, par.dir, "--fold", k, *TRAIN) for k in range(3)]
    errs = [finished(p)[1] for p in procs]
    members = [par.member(f"fold{k}") for k in range(3)]
    started = max(m.config_path.stat().st_mtime for m in members)
    ended = min((m.dir / "done.json").stat().st_mtime for m in members)
    assert started < ended  # every fold had begun before the first finished: they ran at once
    wrote = [e for e in errs if "out of fold: " in e]
    assert len(wrote) == 1  # cv.json written by exactly one process
    others = [e for e in errs if e not in wrote]
    assert all("out-of-fold score waits for" in e or "CV already assembled" in e for e in others)
    finished(cli("train", spec, work, seq.dir, "--folds", "3", *TRAIN))
    cv = par.read_cv()
    assert comparable(cv) == comparable(seq.read_cv())
    assert set(cv["weights"]) == {"fold0", "fold1", "fold2"} and 0 <= cv["cv"] <= 1
    assert not list(par.dir.rglob(".lock"))  # every lock released and tidied
    # on demand: current already, so nothing is rewritten; --force assembles again, equal
    stamp = par.cv_path.stat().st_mtime_ns
    out, err = finished(cli("cv", par.dir))
    assert "CV already assembled" in err and f"CV accuracy {cv['cv']:.4f}" in out
    assert par.cv_path.stat().st_mtime_ns == stamp
    out, _ = finished(cli("cv", par.dir, "--force", "--json"))
    assert json.loads(out)["cv"] == pytest.approx(cv["cv"]) and par.cv_path.stat().st_mtime_ns != stamp


def test_two_fold_processes_record_the_run_and_every_finished_fold(tmp_path):
    """Each process writes RUN_DIR/config.json and done.json: both must describe the run (every fold of
    folds.csv, both finished), not the process that happened to write last."""
    spec, work = reorganised(tmp_path, 2)
    run = Run(tmp_path / "run")
    procs = [cli("train", spec, work, run.dir, "--fold", k, *TRAIN, "--epochs", "1", "--steps-per-epoch", "1")
             for k in (1, 0)]
    for proc in procs:
        finished(proc)
    doc = json.loads(run.config_path.read_text())
    assert (doc["config"]["fold"], doc["config"]["folds"]) == (None, 2)
    assert doc["sources"]["folds"] == "--fold processes" and "fold" not in doc["sources"]
    assert [json.loads(run.member(f"fold{k}").config_path.read_text())["config"]["fold"] for k in (0, 1)] == [0, 1]
    assert json.loads(run.done_path.read_text()) == {"members": ["fold0", "fold1"], "missing": []}
    assert set(run.read_cv()["weights"]) == {"fold0", "fold1"}


def test_the_runs_finished_record_lists_the_folds_finished_so_far_in_any_order(tmp_path):
    from pipeline.config import TrainConfig
    from pipeline.train.parallel import mark_run_done

    work = tmp_path / "work"
    work.mkdir()
    (work / "folds.csv").write_text("id,label,fold\na,x,0\nb,y,1\nc,x,2\n")
    cfg = TrainConfig(competition="toy", model="fastnet_s", work_dir=work, run_dir=tmp_path / "run")
    run = Run(cfg.run_dir)
    records = []
    for k in (2, 0, 1):  # the folds finish out of order; each process marks the run when it ends
        member = run.member(f"fold{k}")
        member.dir.mkdir(parents=True)
        member.best_path.write_bytes(b"weights")
        member.mark_done({"epochs": 1})
        records.append(mark_run_done(replace(cfg, fold=k)))
        assert json.loads(run.done_path.read_text()) == records[-1]
    assert records == [{"members": ["fold2"], "missing": ["fold0", "fold1"]},
                       {"members": ["fold0", "fold2"], "missing": ["fold1"]},
                       {"members": ["fold0", "fold1", "fold2"], "missing": []}]
    assert not (run.dir / ".lock").exists()


@pytest.mark.slow  # a training process and a cv process (a minute or two on a loaded machine)
def test_cv_on_demand_names_the_folds_still_missing(spec_work, tmp_path):
    spec, work = spec_work
    run = Run(tmp_path / "run")
    _, err = finished(cli("train", spec, work, run.dir, "--fold", "1", *TRAIN, "--epochs", "1"))
    assert "out-of-fold score waits for fold0, fold2" in err and not run.cv_path.exists()
    proc = cli("cv", run.dir)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert err.strip() == (f"error: {run.dir}: no CV yet, fold0, fold2 not finished; train them "
                           "(`pipeline train ... --fold K`) and run this again")


@pytest.mark.slow  # trains one fold in-process (about a minute on a loaded machine)
def test_a_member_being_trained_refuses_a_second_writer_but_not_another_fold(toy_work, tmp_path):
    comp, work = toy_work
    run = Run(tmp_path / "run")
    args = ["train", comp.slug, str(work), str(run.dir), *TRAIN, "--epochs", "1"]
    with run.member("fold0").lock():
        busy = CliRunner().invoke(app, [*args, "--fold", "0"])
        assert busy.exit_code == 1 and f"fold0 of run {run.dir} is busy" in busy.output
        assert not (run.dir / "fold0" / "config.json").exists()  # the refused writer wrote nothing
        other = CliRunner().invoke(app, [*args, "--fold", "1"])  # fold1 trains while fold0 is held
        assert other.exit_code == 0, other.output
    assert run.member("fold1").is_finished and not run.member("fold0").is_started
    assert not run.cv_path.exists()


def test_a_short_lock_is_waited_for_and_a_held_one_refused_without_waiting(tmp_path):
    path = tmp_path / "run" / ".lock"
    held, release = threading.Event(), threading.Event()

    def holder():
        with exclusive_lock(path, "run x"):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(10)
    with pytest.raises(PipelineError, match="run x is busy"):
        with exclusive_lock(path, "run x"):
            pass
    threading.Timer(0.3, release.set).start()
    t0 = time.monotonic()
    with exclusive_lock(path, "run x", wait=10):
        waited = time.monotonic() - t0
    thread.join()
    assert 0.2 < waited < 5
    assert not path.exists()  # the last holder removed the lock file


def test_a_failed_fold_process_removes_only_its_own_files(tmp_path):
    from pipeline.io import undo_on_failure
    from pipeline.train.parallel import others_files

    run = tmp_path / "run"
    with pytest.raises(RuntimeError), undo_on_failure(run, keep=lambda p: others_files(run, ["fold0"], p)):
        for name in ("fold0/config.json", "fold1/config.json", "config.json"):  # fold1: another process's
            (run / name).parent.mkdir(parents=True, exist_ok=True)
            (run / name).write_text("{}")
        raise RuntimeError
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == ["config.json", "fold1", "fold1/config.json"]
    with pytest.raises(RuntimeError), undo_on_failure(tmp_path / "alone",
                                                      keep=lambda p: others_files(tmp_path / "alone", ["fold0"], p)):
        (tmp_path / "alone" / "fold0").mkdir(parents=True)
        (tmp_path / "alone" / "config.json").write_text("{}")
        raise RuntimeError
    assert not (tmp_path / "alone").exists()  # nobody else's work there: nothing left
