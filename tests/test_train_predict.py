"""`pipeline train ... --predict OUT.csv`: the submission of the run just trained, in the same process."""
from __future__ import annotations

from typer.testing import CliRunner

from pipeline.cli.app import app
from pipeline.download.reorg import reorg


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_train_with_predict_writes_the_submission_the_separate_command_writes(toy, tmp_path):
    comp, raw = toy
    work, run = tmp_path / "work", tmp_path / "run"
    reorg(comp, raw, work, valid_ratio=0.25, folds=3, seed=0)
    inline = tmp_path / "inline.csv"
    result = invoke("train", comp.slug, work, run, "--folds", "3", "--epochs", "1", "--tta", "flip", "--device", "cpu",
                    "--predict", inline)
    assert result.exit_code == 0, result.output
    assert f"{inline}: 10 rows from 3 model(s)" in result.stdout
    separate = tmp_path / "separate.csv"
    assert invoke("predict", comp.slug, work, run, separate, "--device", "cpu").exit_code == 0
    assert inline.read_bytes() == separate.read_bytes()  # the run's TTA, the same members, the same bytes


def test_an_existing_submission_is_refused_before_training(toy, tmp_path):
    comp, raw = toy
    work, run = tmp_path / "work", tmp_path / "run"
    reorg(comp, raw, work, valid_ratio=0.25, folds=0, seed=0)
    taken = tmp_path / "taken.csv"
    taken.write_text("mine\n")
    result = invoke("train", comp.slug, work, run, "--epochs", "1", "--device", "cpu", "--predict", taken)
    assert result.exit_code == 1 and "already exists; pass --force" in result.stderr
    assert not run.exists() and taken.read_text() == "mine\n"  # nothing trained, nothing overwritten
