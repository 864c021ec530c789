"""What a user reads and finds: the run summary, progress, stdout vs stderr, --json, help, files, Ctrl-C."""
from __future__ import annotations

import json
import os
import platform
import re
import stat
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline import progress
from pipeline.cli.app import app
from pipeline.devices import X86
from pipeline.io import atomic_write_text, exclusive_lock, undo_on_failure
from pipeline.runs import Run
from pipeline.train.summary import MemberLine, RunFacts, format_summary, interrupt_note, plan_warnings

runner = CliRunner()


def invoke(*args, env: dict | None = None):
    return runner.invoke(app, [str(a) for a in args], env=env, prog_name="pipeline")


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture
def trained(toy, tmp_path, umask_022):
    """A tiny holdout run trained through the CLI with a progress line every update; (comp, work, run, result)."""
    comp, raw = toy
    work, run = tmp_path / "work", tmp_path / "run"
    assert invoke("reorg", comp.slug, raw, work).exit_code == 0
    result = invoke("train", comp.slug, work, run, "--epochs", "2", "--batch-size", "8", "--device", "cpu", "--json",
                    env={"PIPELINE_PROGRESS_SECONDS": "0"})
    assert result.exit_code == 0, result.output
    return comp, work, run, result


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------- the summary


def test_the_summary_states_model_counts_steps_and_warnings(trained):
    from pipeline.models import create_model

    comp, work, run, result = trained
    info = json.loads((work / "reorg.json").read_text())
    n_train, n_valid = info["counts"]["train"], info["counts"]["valid"]
    text = Run(run).summary_path.read_text()
    params = sum(p.numel() for p in create_model("fastnet_s", 3).parameters())
    assert f"fastnet_s: {params:,} parameters, {params:,} trainable" in text
    nhwc = "on" if platform.machine().lower() in X86 else "off"  # the CPU's architecture decides
    assert f"device     cpu, precision fp32, channels_last {nhwc}, 0 DataLoader workers" in text
    assert "data       image_cache:" in text
    steps = n_train // 8
    assert f"holdout: {n_train} train, {n_valid} valid; batch 8, {steps} steps/epoch, {2 * steps} steps in 2 epochs" in text
    assert f"only {2 * steps} optimizer steps" in text and f"has {n_valid} images" in text  # both warnings
    assert re.search(r"^  epochs +2 +flag$", text, re.M) and re.search(r"^  lr +0\.3 +competition$", text, re.M)
    assert "run summary: " + str(run) in result.stderr  # logged before training, not on stdout
    assert "run summary" not in result.stdout


def test_summary_warnings_are_the_plans_own_and_deduplicated():
    facts = RunFacts("r", "m", 10, 4, "cpu", "fp32", False, 0, "files", "why", {"train": 9},
                     (MemberLine("fold0", 900, 20, 300, 3, 9, 3), MemberLine("fold1", 5000, 5000, 50, 100, 300, 3)))
    found = plan_warnings(facts)
    assert len(found) == 1 and all(w.startswith("fold0:") for w in found)  # few steps (small splits: train's own)
    text = format_summary("a  1  flag", facts, [*found, found[0], "a split warning"])
    assert "warnings   2" in text and "6 frozen" in text and text.endswith("  a  1  flag")


# ---------------------------------------------------------------- progress


def test_a_progress_line_with_rate_and_eta_comes_before_the_first_epoch_ends(trained):
    lines = trained[3].stderr.splitlines()
    first_epoch = next(i for i, line in enumerate(lines) if line.startswith("epoch 1/2  train_loss"))
    bars = [line for line in lines[:first_epoch] if line.startswith("epoch 1/2") and "img/s" in line]
    working = [line for line in bars[:-1] if not re.search(r" 0/\d+ img", line)]  # the start line counts none yet
    assert working and all("ETA" in line and "loss" in line for line in working)
    assert bars[-1].endswith("(done)")
    assert "\r" not in trained[3].stderr  # no terminal: plain lines, no redraws


def test_progress_line_fields():
    line = progress.progress_line("predict", 50, 200, 10.0, fields={"loss": lambda: "0.5"})
    assert line == "predict   25%  50/200 img  5.0 img/s  elapsed 0:10  ETA 0:30  loss 0.5"
    assert progress.clock(3725) == "1:02:05"


def test_a_terminal_bar_is_redrawn_in_place(capsys, monkeypatch):
    monkeypatch.setitem(progress.SETTINGS, "tty", True)
    monkeypatch.setattr(progress, "REDRAW", 0.0)
    assert sum(1 for _ in progress.track(range(3), "work", total=3, count=lambda _: 1)) == 3
    err = capsys.readouterr().err
    assert err.count("\r") >= 3 and "work" in err and err.endswith("\r\033[K")  # cleared at the end


def test_quiet_keeps_warnings_and_results_only(toy, tmp_path):
    comp, raw = toy
    work, run = tmp_path / "work", tmp_path / "run"
    invoke("reorg", comp.slug, raw, work, "--folds", "2")
    result = invoke("--quiet", "train", comp.slug, work, run, "--folds", "2", "--epochs", "1", "--batch-size", "32",
                    "--device", "cpu", env={"PIPELINE_PROGRESS_SECONDS": "0"})
    assert result.exit_code == 0, result.output
    assert "img/s" not in result.stderr and "run summary" not in result.stderr and "epoch 1/1" not in result.stderr
    warned = [line for line in result.stderr.splitlines() if "less than one batch of 32" in line]
    assert len(warned) == 2  # a warning stays (one per fold) ...
    assert all(line in Run(run).summary_path.read_text() for line in warned)  # ... and the summary lists it
    assert "cross-validation (out of fold):" in result.stdout and "oof" in result.stdout  # the CV table: a result
    assert (run / "done.json").is_file()  # the run-level marker make waits for


# ---------------------------------------------------------------- stdout, stderr, --json


def test_json_results_parse_and_logs_stay_on_stderr(trained, tmp_path):
    comp, work, run, result = trained
    out = json.loads(result.stdout)
    assert out["members"][0]["name"] == "holdout" and out["members"][0]["epochs"] == 2
    assert 0 <= out["members"][0]["best"] <= 1 and out["metric"] == "accuracy" and out["cv"] is None
    assert "epoch 2/2  train_loss" in result.stderr and "train_loss" not in result.stdout
    sub = tmp_path / "sub.csv"
    predicted = invoke("predict", comp.slug, work, run, sub, "--json")
    assert predicted.exit_code == 0, predicted.output
    assert json.loads(predicted.stdout)["rows"] == 10 and json.loads(predicted.stdout)["path"] == str(sub)
    checked = invoke("check", comp.slug, sub, "--work-dir", work, "--json")
    assert json.loads(checked.stdout) == {"path": str(sub), "valid": True, "rows": 10, "columns": 2, "problems": [],
                                           "warnings": []}
    sub.write_text("id,label\nt000,unicorn\n")
    bad = invoke("check", comp.slug, sub, "--work-dir", work, "--json")
    assert bad.exit_code == 1 and json.loads(bad.stdout)["valid"] is False and json.loads(bad.stdout)["problems"]


# ---------------------------------------------------------------- help and usage errors


def test_help_reads_at_80_columns_with_flags_and_defaults():
    result = invoke("train", "--help", env={"COLUMNS": "80"})
    assert result.exit_code == 0
    text = result.stdout
    assert "<bool>" not in text and "╭" not in text
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "--pretrained / --no-pretrained" in text and "pipeline recipes" in text
    assert re.search(r"--lr <float> +Peak learning rate.*\[default:\s+0\.1\]", " ".join(text.split()))
    assert "Usage: pipeline train [OPTIONS] COMPETITION WORK_DIR RUN_DIR" in text


def test_a_usage_error_is_one_line_plus_the_usage():
    result = invoke("reorg", "--bogus")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "error: No such option: --bogus",
        "usage: pipeline reorg [OPTIONS] COMPETITION RAW_DIR WORK_DIR  (--help for more)"]


# ---------------------------------------------------------------- files


def test_files_get_the_umask_mode(trained, tmp_path):
    run = trained[2]
    for path in (run / "config.json", run / "summary.txt", run / "holdout" / "best.pt", run / "holdout" / "metrics.csv"):
        assert mode(path) == 0o644, path
    os.umask(0o077)
    atomic_write_text(tmp_path / "private.txt", "x")
    assert mode(tmp_path / "private.txt") == 0o600


def test_stored_paths_are_absolute(toy, tmp_path, monkeypatch):
    comp, raw = toy
    monkeypatch.chdir(tmp_path)
    invoke("reorg", comp.slug, raw, "work")
    assert invoke("train", comp.slug, "work", "run", "--epochs", "1", "--batch-size", "8", "--device", "cpu",
                  "--dry-run").exit_code == 0
    result = invoke("train", comp.slug, "work", "run", "--epochs", "1", "--batch-size", "8", "--device", "cpu")
    assert result.exit_code == 0, result.output
    stored = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert stored["work_dir"] == str(tmp_path / "work") and stored["run_dir"] == str(tmp_path / "run")


def test_a_failed_or_interrupted_train_leaves_no_file(toy, tmp_path, monkeypatch):
    comp, raw = toy
    work, run = tmp_path / "work", tmp_path / "run"
    invoke("reorg", comp.slug, raw, work)
    args = ("train", comp.slug, work, run, "--epochs", "1", "--batch-size", "8", "--device", "cpu")

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("pipeline.train.stage.fit_member", interrupted)
    result = invoke(*args)
    assert result.exit_code == 130 and not run.exists()
    assert result.stderr.strip().splitlines()[-1].startswith(f"interrupted before {run}/holdout finished an epoch: "
                                                             "nothing of it is saved")
    monkeypatch.undo()
    assert invoke(*args).exit_code == 0
    before = sorted(run.rglob("*"))
    refused = invoke(*args)  # a finished run without --force
    assert refused.exit_code == 1 and "already holds a finished run" in refused.stderr
    assert sorted(run.rglob("*")) == before


def test_undo_keeps_a_member_with_a_saved_epoch(tmp_path):
    run = tmp_path / "run"
    (run / "fold0").mkdir(parents=True)
    (run / "fold0" / "last.pt").write_text("saved before")
    with pytest.raises(RuntimeError), undo_on_failure(run, keep=lambda p: "fold1" in p.parts):
        for name in ("fold1/last.pt", "fold2/config.json", "config.json"):
            (run / name).parent.mkdir(exist_ok=True)
            (run / name).write_text("new")
        raise RuntimeError
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == ["fold0", "fold0/last.pt", "fold1",
                                                                        "fold1/last.pt"]


def test_a_lock_leaves_no_file_even_on_error(tmp_path):
    lock = tmp_path / ".lock"
    with pytest.raises(ValueError), exclusive_lock(lock, "the thing"):
        assert lock.read_text() == f"pid {os.getpid()}"
        raise ValueError
    assert not lock.exists()


# ---------------------------------------------------------------- Ctrl-C and the kaggle CLI


def test_ctrl_c_names_what_the_interrupted_stage_saved(tmp_path):
    from pipeline.runs import Member

    member = Member(tmp_path, "fold1")
    member.dir.mkdir()
    assert "nothing of it is saved" in interrupt_note(member)
    (member.dir / "last.pt").write_text("x")
    (member.dir / "metrics.csv").write_text("epoch,train_loss\n1,0.5\n2,0.4\n")
    assert f"has 2 finished epoch(s) saved in {member.last_path}" in interrupt_note(member)
    progress.reset()
    with pytest.raises(KeyboardInterrupt), progress.stage("outer"), progress.stage(lambda: "inner: saved x"):
        raise KeyboardInterrupt
    assert progress.interrupted_message() == "inner: saved x"  # the innermost stage, after unwinding
    progress.reset()
    assert progress.interrupted_message() == progress.NOTHING_SAVED


def test_the_kaggle_cli_is_found_beside_python(tmp_path, monkeypatch):
    from pipeline.download import kaggle as kaggle

    kaggle_exe = tmp_path / "bin" / "kaggle"
    kaggle_exe.parent.mkdir()
    kaggle_exe.write_text("#!/bin/sh\n")
    kaggle_exe.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))
    monkeypatch.setenv("PATH", str(tmp_path / "elsewhere"))
    assert kaggle.find_kaggle() == str(kaggle_exe)


def test_a_one_batch_stage_prints_a_line_and_counts_its_batch_once_it_is_done(monkeypatch):
    """The only batch of a stage: a line while it is in work, the count reaching the total only after it."""
    import threading

    lines, printed = [], threading.Event()

    def write(text):
        lines.append(text)
        printed.set()

    monkeypatch.setattr(progress, "_write", write)
    progress.configure(quiet=False, interval=0.05, tty=False)
    try:
        bar = progress.track([(None, None, list(range(8)))], "out-of-fold scores", total=8)
        seen = []
        for _ in bar:
            assert printed.wait(5), "no line while the only batch was in work"
            seen.append(bar.bar.done)  # the batch being worked on is not counted yet
        assert seen == [0] and bar.bar.done == 8
        assert lines[0].startswith("out-of-fold scores") and " 0/8 " in lines[0]
        assert lines[-1].rstrip().endswith("(done)") and " 8/8 " in lines[-1]
    finally:
        progress.configure(interval=None, tty=None)


def test_a_quick_stage_prints_nothing(monkeypatch):
    lines = []
    monkeypatch.setattr(progress, "_write", lines.append)
    progress.configure(quiet=False, interval=5.0, tty=False)
    try:
        assert sum(len(b[2]) for b in progress.track([(None, None, [1, 2])] * 3, "quick", total=6)) == 6
        assert lines == []
    finally:
        progress.configure(interval=None, tty=None)
