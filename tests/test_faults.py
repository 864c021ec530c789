"""Training survives kills and interrupts, and runs under torchrun with 2 CPU processes.

These start real subprocesses (`python -m pipeline ...`) on the embedded digits
data, which ships with scikit-learn, so they need nothing from ../shared.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from pipeline.checkpoint import load_checkpoint

PY = sys.executable
EPOCHS = 30  # short epochs (~0.1 s with the image cache), many of them: room to interrupt
TRAIN = ["--epochs", str(EPOCHS), "--batch-size", "32", "--device", "cpu", "--steps-per-epoch", "8",
         "--ema", "0.9", "--early-stop", "25"]  # resume must restore the EMA and early-stop state too


def pipeline(*args, check=True, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run([PY, "-m", "pipeline", *map(str, args)], capture_output=True, text=True, **kw)
    if check:
        assert done.returncode == 0, done.stderr
    return done


@pytest.fixture(scope="module")
def digits_work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits")
    pipeline("download", "digits", root / "raw")
    pipeline("reorg", "digits", root / "raw", root / "work")
    return root / "work"


def metrics_rows(run: Path) -> int:
    try:
        return len(pd.read_csv(run / "holdout" / "metrics.csv"))
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return 0


def start_and_signal(args: list, run: Path, sig: int, after_rows: int) -> subprocess.Popen:
    """Start training, send ``sig`` once metrics.csv has ``after_rows`` rows (mid next epoch)."""
    proc = subprocess.Popen([PY, "-m", "pipeline", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while metrics_rows(run) < after_rows and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "training ended before it could be interrupted"
    proc.send_signal(sig)
    proc.stdout_text, proc.stderr_text = proc.communicate(timeout=120)
    return proc


def comparable(run: Path) -> pd.DataFrame:
    return pd.read_csv(run / "holdout" / "metrics.csv").drop(columns="seconds")


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(digits_work, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    pipeline("train", "digits", digits_work, whole, *TRAIN)
    proc = start_and_signal(["train", "digits", digits_work, killed, *TRAIN], killed, signal.SIGKILL, after_rows=2)
    assert proc.returncode == -signal.SIGKILL
    assert 2 <= metrics_rows(killed) < EPOCHS and not (killed / "holdout" / "done.json").exists()
    load_checkpoint(killed / "holdout" / "last.pt")  # the checkpoint on disk is complete
    refused = pipeline("train", "digits", digits_work, killed, *TRAIN, check=False)
    assert refused.returncode == 1 and "use --resume" in refused.stderr
    pipeline("train", "digits", digits_work, killed, "--resume")
    pd.testing.assert_frame_equal(comparable(whole), comparable(killed))
    assert load_checkpoint(whole / "holdout" / "best.pt")["best"] == load_checkpoint(killed / "holdout" / "best.pt")["best"]


@pytest.mark.slow
def test_ctrl_c_saves_and_exits_130(digits_work, tmp_path):
    run = tmp_path / "run"
    proc = start_and_signal(["train", "digits", digits_work, run, *TRAIN], run, signal.SIGINT, after_rows=1)
    assert proc.returncode == 130
    assert "--resume" in proc.stderr_text and "Traceback" not in proc.stderr_text
    assert load_checkpoint(run / "holdout" / "last.pt")["epoch"] >= 1
    pipeline("train", "digits", digits_work, run, "--resume")
    assert metrics_rows(run) == EPOCHS and (run / "holdout" / "done.json").is_file()


@pytest.mark.slow
def test_torchrun_two_cpu_processes_with_gloo(digits_work, tmp_path):
    run = tmp_path / "run"
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pipeline", "train",
           "digits", str(digits_work), str(run), "--epochs", "2", "--batch-size", "32", "--device", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = pd.read_csv(run / "holdout" / "metrics.csv")
    n_train = json.loads((digits_work / "reorg.json").read_text())["counts"]["train"]
    per_rank = -(-n_train // 2)  # DistributedSampler pads to an even split
    assert metrics["steps"].tolist() == [per_rank // 32] * 2  # each rank steps on its half
    assert len(metrics) == 2  # written once, by rank 0
    assert done.stdout.count("kept epoch") == 1
    state = load_checkpoint(run / "holdout" / "best.pt")
    assert not any(k.startswith("module.") for k in state["model"])  # saved unwrapped: predict loads it
    pipeline("predict", "digits", digits_work, run, tmp_path / "sub.csv")
    assert len(pd.read_csv(tmp_path / "sub.csv")) == 300
