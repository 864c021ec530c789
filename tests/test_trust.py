"""Submissions that cannot be silently wrong, scores that tell the truth (issue 13: 1, 2, 3, 8)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from conftest import make_competition, write_raw
from pipeline.cli.app import app
from pipeline.errors import PipelineError
from pipeline.metrics import clip_probs, score
from pipeline.download.reorg import reorg
from pipeline.runs import Run

CLASSES = ["cat", "dog", "frog"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def ok(*args):
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture
def probs_run(tmp_path):
    """A probability competition, its work folder and a finished 3-fold run (1 epoch each)."""
    comp = make_competition("toy-probs", submission="probs")
    raw = write_raw(tmp_path / "raw", comp)
    reorg(comp, raw, tmp_path / "work", folds=3)
    ok("train", comp.slug, tmp_path / "work", tmp_path / "run", "--epochs", "1", "--batch-size", "8", "--folds", "3",
       "--tta", "flip", "--device", "cpu")
    return comp, raw, tmp_path / "work", tmp_path / "run"


def test_class_columns_are_matched_by_name_not_position(probs_run, tmp_path):
    comp, raw, work, run = probs_run
    ok("predict", comp.slug, work, run, tmp_path / "a.csv")
    shuffled = tmp_path / "raw2"
    shutil.copytree(raw, shuffled)
    sample = pd.read_csv(shuffled / comp.sample_submission)
    sample[["id", "frog", "cat", "dog"]].to_csv(shuffled / comp.sample_submission, index=False)
    reorg(comp, shuffled, tmp_path / "work2", folds=3)
    ok("predict", comp.slug, tmp_path / "work2", run, tmp_path / "b.csv")
    a, b = pd.read_csv(tmp_path / "a.csv"), pd.read_csv(tmp_path / "b.csv")
    assert list(b.columns) == ["id", "frog", "cat", "dog"]  # the sample's order
    for name in CLASSES:  # each probability under its own class's name
        assert np.allclose(a[name], b[name], atol=1e-9)
    # by position the second column would have been cat's numbers under frog's name
    assert not np.allclose(a.iloc[:, 1], b.iloc[:, 1], atol=1e-4)


def test_a_run_of_another_competition_is_refused_by_name(probs_run, tmp_path):
    comp, raw, work, run = probs_run
    other = make_competition("toy-other", submission="probs")
    reorg(other, write_raw(tmp_path / "raw-other", other), tmp_path / "work-other", folds=0)
    result = invoke("predict", other.slug, tmp_path / "work-other", run, tmp_path / "x.csv")
    assert result.exit_code == 1 and "was trained for competition 'toy-probs', not 'toy-other'" in result.output
    assert not (tmp_path / "x.csv").exists()


def test_other_classes_and_other_downloads_are_refused(probs_run, tmp_path):
    comp, raw, work, run = probs_run
    relabelled = tmp_path / "raw3"
    shutil.copytree(raw, relabelled)
    labels = pd.read_csv(relabelled / comp.labels_file, dtype=str)
    labels.loc[0, "label"] = "dog" if labels.loc[0, "label"] != "dog" else "cat"  # one image relabelled
    labels.to_csv(relabelled / comp.labels_file, index=False)
    reorg(comp, relabelled, tmp_path / "work3", folds=3)
    result = invoke("predict", comp.slug, tmp_path / "work3", run, tmp_path / "x.csv")
    assert result.exit_code == 1 and "holds other training data than" in result.output
    fewer = tmp_path / "raw4"
    shutil.copytree(raw, fewer)
    labels = pd.read_csv(fewer / comp.labels_file, dtype=str)
    labels[labels["label"] != "frog"].to_csv(fewer / comp.labels_file, index=False)
    sample = pd.read_csv(fewer / comp.sample_submission)
    sample.drop(columns="frog").to_csv(fewer / comp.sample_submission, index=False)
    for path in (fewer / comp.train_dir).iterdir():  # the frog images go with their labels
        if path.stem not in set(labels[labels["label"] != "frog"]["id"]):
            path.unlink()
    reorg(comp, fewer, tmp_path / "work4", folds=3)
    result = invoke("predict", comp.slug, tmp_path / "work4", run, tmp_path / "x.csv")
    assert result.exit_code == 1 and "was trained on other classes" in result.output and "'frog'" in result.output


def test_cv_scores_the_submission_and_predict_takes_the_runs_tta(probs_run, tmp_path):
    comp, raw, work, run = probs_run
    cv = json.loads((run / "cv.json").read_text())
    assert (cv["tta"], cv["clip"], cv["selection"]) == ("flip", 1e-6, "last")
    oof = pd.read_csv(run / "oof.csv", dtype={"id": str})
    targets = oof["label"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    clipped = score(clip_probs(oof[CLASSES].to_numpy()), targets, 3)
    assert cv["overall"]["log_loss"] == pytest.approx(clipped["log_loss"], rel=1e-12)
    lo, hi = cv["interval"]
    assert lo <= cv["cv"] <= hi
    result = ok("predict", comp.slug, work, run, tmp_path / "sub.csv")
    with_flip = pd.read_csv(tmp_path / "sub.csv")
    ok("predict", comp.slug, work, run, tmp_path / "none.csv", "--tta", "none")
    without = pd.read_csv(tmp_path / "none.csv")
    assert not with_flip[CLASSES].equals(without[CLASSES])  # the default is the run's flip, not none
    assert "warning" not in result.output


def test_best_selection_reports_the_last_epochs_cv_beside_it(tmp_path):
    comp = make_competition("toy")
    reorg(comp, write_raw(tmp_path / "raw", comp), tmp_path / "work", folds=3)
    ok("train", comp.slug, tmp_path / "work", tmp_path / "run", "--epochs", "2", "--batch-size", "8", "--folds", "3",
       "--select", "best", "--device", "cpu")
    cv = json.loads((tmp_path / "run" / "cv.json").read_text())
    assert cv["selection"] == "best" and "optimistic" in cv["note"] and "cv" in cv["last_epoch"]


def test_last_selection_keeps_the_final_epoch_and_an_interval(tmp_path):
    comp = make_competition("toy")
    reorg(comp, write_raw(tmp_path / "raw", comp), tmp_path / "work", valid_ratio=0.25, folds=0)
    result = ok("train", comp.slug, tmp_path / "work", tmp_path / "run", "--epochs", "3", "--batch-size", "8",
                "--device", "cpu")
    assert "too few to rank runs" in result.stderr and "--folds" in result.stderr  # 9 validation images
    member = Run(tmp_path / "run").member("holdout")
    done = member.done()
    kept = done["kept"]
    assert (kept["epoch"], kept["selection"], kept["valid_images"]) == (3, "last", 9)
    lo, hi = kept["interval"]
    assert 0 <= lo <= kept["metric"] <= hi <= 1
    metrics = member.metrics()
    assert kept["metric"] == pytest.approx(metrics["valid_accuracy"].iloc[-1])  # the last epoch's score
    assert "kept epoch 3 (last)" in result.stdout and "95% interval" in result.stdout


def test_a_second_writer_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path):
    comp = make_competition("toy")
    reorg(comp, write_raw(tmp_path / "raw", comp), tmp_path / "work", folds=0)
    run = Run(tmp_path / "run")
    args = ("train", comp.slug, tmp_path / "work", run.dir, "--epochs", "1", "--batch-size", "8", "--device", "cpu")
    with run.member("holdout").lock():  # a writer of the member holds its lock
        busy = invoke(*args)
    assert busy.exit_code == 1 and f"holdout of run {run.dir} is busy" in busy.output
    assert not run.member("holdout").dir.exists()  # the refused writer wrote nothing
    assert not run.dir.exists()  # the lock of a run that wrote nothing leaves nothing
    run.member("holdout").dir.mkdir(parents=True)
    (run.member("holdout").dir / ".lock").write_text("pid 999999")  # left by a killed process: flock is free
    ok(*args)
    assert not list(run.dir.rglob(".lock"))


def test_check_without_a_work_dir_says_what_it_could_not_check(tmp_path):
    comp = make_competition("toy")
    raw = write_raw(tmp_path / "raw", comp)
    result = ok("check", comp.slug, raw / comp.sample_submission, "--sample", raw / comp.sample_submission)
    assert "class names not checked: give --work-dir" in result.stdout


def test_the_submission_refuses_class_columns_it_cannot_match(tmp_path):
    from pipeline.predict.submission import build_submission

    comp = make_competition("toy-probs", submission="probs")
    sample = pd.DataFrame({"id": ["a", "b"], "cat": 0.5, "dog": 0.5})
    with pytest.raises(PipelineError, match=r"missing \['dog'\].*unexpected \['frog'\]"):
        build_submission(comp, ["a", "b"], np.full((2, 2), 0.5), ["cat", "frog"], sample)
