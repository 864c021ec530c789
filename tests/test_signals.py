"""SIGTERM and SIGHUP stop a command the way Ctrl-C does (pipeline.progress.raising).

The signal is sent by the process to itself from inside training (a step of
epoch 2, or between writing best.pt's temporary file and renaming it), so it
lands at a known point; the CLI runs in-process through CliRunner. A fallback
handler turns a SIGTERM that nobody catches into a test failure instead of
killing pytest.
"""
from __future__ import annotations

import os
import signal

import pandas as pd
import pytest
from typer.testing import CliRunner

from pipeline import progress
from pipeline.checkpoint import load_checkpoint
from pipeline.cli.app import app
from pipeline.cli.common import handle_errors

TRAIN = ("--epochs", "3", "--batch-size", "8", "--device", "cpu", "--ema", "0.9")


class Uncaught(Exception):
    pass


@pytest.fixture(autouse=True)
def fallback_handlers():
    """A stop signal that the code under test does not handle fails the test (and spares pytest)."""
    def uncaught(signum, frame):
        raise Uncaught(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, uncaught) for sig in (signal.SIGTERM, signal.SIGHUP)}
    progress.reset()
    yield
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], prog_name="pipeline")


def comparable(run):
    return pd.read_csv(run / "holdout" / "metrics.csv").drop(columns="seconds")


@pytest.fixture
def uninterrupted(toy_work, tmp_path):
    comp, work = toy_work
    whole = tmp_path / "whole"
    assert invoke("train", comp.slug, work, whole, *TRAIN).exit_code == 0
    return comp, work, comparable(whole), load_checkpoint(whole / "holdout" / "best.pt")["best"]


def leftovers(run):
    return sorted(p.name for p in run.rglob("*") if p.name.endswith(".tmp") or p.name == ".lock")


def test_sigterm_mid_epoch_exits_143_says_how_to_resume_and_resumes_to_the_same_run(uninterrupted, tmp_path,
                                                                                   monkeypatch):
    comp, work, whole, whole_best = uninterrupted
    from pipeline.train import engine

    real, steps = engine.compute_loss, []

    def loss_then_sigterm(*args, **kwargs):
        steps.append(1)
        if len(steps) == 5:  # epoch 2 (3 steps an epoch): the signal comes in the middle of it
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "compute_loss", loss_then_sigterm)
    run = tmp_path / "run"
    stopped = invoke("train", comp.slug, work, run, *TRAIN)
    assert stopped.exit_code == 143, stopped.output
    last = stopped.stderr.strip().splitlines()[-1]
    assert last.startswith(f"stopped by SIGTERM: interrupted: {run}/holdout has 1 finished epoch(s) saved"), last
    assert "--resume" in last and "Traceback" not in stopped.stderr
    assert leftovers(run) == []  # the lock released, no temporary file
    monkeypatch.undo()
    assert invoke("train", comp.slug, work, run, "--resume").exit_code == 0
    pd.testing.assert_frame_equal(whole, comparable(run))
    assert load_checkpoint(run / "holdout" / "best.pt")["best"] == whole_best


def test_sigterm_mid_checkpoint_finishes_the_epochs_files_then_stops(uninterrupted, tmp_path, monkeypatch):
    comp, work, whole, whole_best = uninterrupted
    import pipeline.checkpoint as checkpoint

    real, saves = checkpoint.torch.save, []

    def save_then_sigterm(obj, f, *args, **kwargs):
        real(obj, f, *args, **kwargs)
        saves.append(str(f))
        if len(saves) == 3:  # epoch 2's last.pt: its temporary file written, not yet renamed
            assert str(f).endswith(".tmp")
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(checkpoint.torch, "save", save_then_sigterm)
    run = tmp_path / "run"
    stopped = invoke("train", comp.slug, work, run, *TRAIN)
    assert stopped.exit_code == 143, stopped.output
    assert "has 2 finished epoch(s) saved" in stopped.stderr  # the epoch being written was completed
    assert len(pd.read_csv(run / "holdout" / "metrics.csv")) == 2
    assert load_checkpoint(run / "holdout" / "last.pt")["epoch"] == 2
    assert leftovers(run) == []
    monkeypatch.undo()
    assert invoke("train", comp.slug, work, run, "--resume").exit_code == 0
    pd.testing.assert_frame_equal(whole, comparable(run))
    assert load_checkpoint(run / "holdout" / "best.pt")["best"] == whole_best


def test_sighup_exits_129_and_an_ignored_sighup_stays_ignored():
    def hangs_up():
        with progress.stage("interrupted while testing: nothing saved"):
            os.kill(os.getpid(), signal.SIGHUP)
            raise AssertionError("SIGHUP did not stop the command")

    with pytest.raises(SystemExit) as stop:
        try:
            handle_errors(hangs_up)()
        except Exception as exc:  # typer.Exit
            raise SystemExit(exc.exit_code) from None
    assert stop.value.code == 129
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    with progress.raising():
        os.kill(os.getpid(), signal.SIGHUP)  # ignored: nothing raised
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN


def test_deferred_holds_the_signal_until_the_block_ends():
    done = []
    with pytest.raises(progress.Stopped) as stopped, progress.raising():
        with progress.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            done.append("the block finished")
    assert done == ["the block finished"] and stopped.value.signum == signal.SIGTERM
    assert progress.exit_status(stopped.value) == 143 and progress.exit_status(KeyboardInterrupt()) == 130
