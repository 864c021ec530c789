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
    # SIGINT as from a terminal, even where the tests run with it ignored (a background job): Python then
    # installs its Ctrl-C handler in the child
    proc = subprocess.Popen([PY, "-m", "pipeline", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
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


# One torchrun launch (2 CPU processes, gloo) trains several small configurations in one process
# group: caches counted per rank, GoogLeNet with its aux heads used (images) and unused (a head on
# cached features), under each head, and two folds with their out-of-fold score.
DDP_SCRIPT = r'''
import collections, json, os, sys
from pathlib import Path

import competitions  # noqa: F401
from pipeline import distributed as dist
from pipeline.data import cache as cache, features
from pipeline.competition import get_competition
from pipeline.config import resolve_config
from pipeline.train.stage import train

work, out = Path(sys.argv[1]), Path(sys.argv[2])
builds = collections.Counter()
real_extract, RealPool = features.extract_features, cache.ProcessPoolExecutor


def counting_extract(*a, **kw):
    builds["features"] += 1
    return real_extract(*a, **kw)


class CountingPool(RealPool):  # image_cache decodes through one pool per build
    def __init__(self, *a, **kw):
        builds["images"] += 1
        super().__init__(*a, **kw)


features.extract_features, cache.ProcessPoolExecutor = counting_extract, CountingPool
dist.init("cpu")
comp = get_competition("digits")
common = dict(device="cpu", epochs=1, batch_size=32, feature_views=0)
googlenet = dict(model="googlenet", steps_per_epoch=2, lr=0.01)
cases = {"fastnet-folds": dict(folds=2)}
for head in ("linear", "mlp"):
    cases[f"aux-used-{head}"] = dict(googlenet, head=head)
    cases[f"aux-frozen-{head}"] = dict(googlenet, head=head, freeze_backbone=True, feature_cache=False)
    cases[f"aux-unused-{head}"] = dict(googlenet, head=head, freeze_backbone=True)
for name, flags in cases.items():
    train(resolve_config(comp, work, out / name, None, {**common, **flags}))
(out / f"builds-{dist.rank()}.json").write_text(json.dumps(builds))
'''


@pytest.fixture(scope="module")
def digits_two_folds(digits_work, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("digits2") / "work"
    pipeline("reorg", "digits", digits_work.parent / "raw", work, "--folds", "2")
    return work


@pytest.mark.slow
def test_torchrun_caches_once_googlenet_heads_folds(digits_two_folds, tmp_path):
    """Rank 0 alone builds each cache; DDP trains GoogLeNet whether its aux heads are used or not."""
    script, out = tmp_path / "ddp_cases.py", tmp_path / "runs"
    script.write_text(DDP_SCRIPT)
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(digits_two_folds), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    builds = [json.loads((out / f"builds-{r}.json").read_text()) for r in (0, 1)]
    assert builds == [{"images": 1, "features": 1}, {}]  # one image cache, one feature bank, both by rank 0
    assert len(list((digits_two_folds / "cache").glob("images-*.npy"))) == 1
    assert len(list((digits_two_folds / "cache").glob("features-*.pt"))) == 1
    for name in ("aux-used-linear", "aux-used-mlp", "aux-frozen-linear", "aux-frozen-mlp", "aux-unused-linear",
                 "aux-unused-mlp"):
        metrics = pd.read_csv(out / name / "holdout" / "metrics.csv")
        assert metrics["steps"].tolist() == [2], name  # written once (one row), two optimizer steps
    folds = pd.read_csv(digits_two_folds / "folds.csv")
    for k in (0, 1):
        metrics = pd.read_csv(out / "fastnet-folds" / f"fold{k}" / "metrics.csv")
        per_rank = -(-int((folds["fold"] != k).sum()) // 2)  # each rank steps on its half of the fold's train set
        assert metrics["steps"].tolist() == [per_rank // 32]
    oof = pd.read_csv(out / "fastnet-folds" / "oof.csv")
    assert len(oof) == len(folds) and oof["id"].is_unique  # every image once: no duplicate rows from two ranks
    assert json.loads((out / "fastnet-folds" / "cv.json").read_text())["metric"] == "accuracy"
