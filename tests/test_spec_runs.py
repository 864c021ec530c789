"""A run of a spec-file competition: stored, reloaded in other processes, and reported with its metric.

The competition is a binary one written by `pipeline init` (roc_auc, a
probability column), so every score the report shows must be its metric's.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from pipeline.report.figures import best_epoch, prediction_frame, validation_scores
from pipeline.report.training_figures import learning_curves_figure
from pipeline.report.html import report_summary
from tests.test_init import invoke, write_binary

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["--model", "fastnet_s", "--image-size", "16", "--batch-size", "8", "--device", "cpu", "--num-workers", "0"]


def fresh(*args: str, cwd: Path, module: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m pipeline ARGS`` (or ``python -c ARGS[0] ARGS[1:]``) in a new process, from ``cwd``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pipeline", *args] if module else [sys.executable, "-c", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


@pytest.fixture(scope="module")
def spec_run(tmp_path_factory):
    """(root, spec, work, run): a binary download, its init spec, reorg and a 3-epoch holdout run."""
    root = tmp_path_factory.mktemp("specrun")
    write_binary(root / "raw")
    spec, work, run = root / "comp.toml", root / "work", root / "run"
    for args in (("init", root / "raw", "--out", spec, "--slug", "spec-binary"),
                 ("reorg", spec, root / "raw", work, "--folds", "0", "--valid-ratio", "0.34"),
                 ("train", spec, work, run, "--epochs", "3", *TRAIN)):
        result = invoke(*args)
        assert result.exit_code == 0, result.output
    yield root, spec, work, run
    from pipeline.competition import _REGISTRY

    for key in [k for k, c in _REGISTRY.items() if c.slug == "spec-binary"]:  # loading the spec registered it
        _REGISTRY.pop(key)


def test_the_run_stores_the_spec_path_and_a_fresh_process_loads_it(spec_run, tmp_path):
    root, spec, _, run = spec_run
    doc = json.loads((run / "config.json").read_text())
    assert doc["config"]["competition"] == str(spec.resolve()) and doc["data"]["competition"] == "spec-binary"
    code = ("import sys; from pipeline.config import load_resolved; from pipeline.download.specfile import competition_of; "
            "c = competition_of(load_resolved(sys.argv[1])[0].competition); print(c.slug, c.metric, c.submission)")
    done = fresh(code, str(run / "config.json"), cwd=tmp_path, module=False)  # another folder, another process
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["spec-binary", "roc_auc", "binary"]


def test_report_in_a_fresh_process_scores_with_the_competitions_metric(spec_run, tmp_path):
    root, _, work, run = spec_run
    done = fresh("report", str(run), "--out", str(tmp_path / "report"), "--device", "cpu", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    page = (tmp_path / "report" / "report.html").read_text(encoding="utf-8")
    assert "roc_auc (higher is better)" in page and "cannot be loaded" not in done.stderr
    metrics = pd.read_csv(run / "holdout" / "metrics.csv")
    best = best_epoch(metrics, "roc_auc")
    assert best == int(metrics.loc[metrics["valid_roc_auc"].idxmax(), "epoch"])
    recorded = json.loads((run / "holdout" / "done.json").read_text())["best"]
    assert f"<td>{recorded['epoch']} of 3 (roc_auc " in page.split("best epoch</th>", 1)[1]  # the members table
    for name in ("roc_auc", "accuracy", "log_loss"):
        assert f"validation {name}</th>" in page


@pytest.mark.slow
def test_torchrun_two_cpu_processes_train_a_spec_file_competition(spec_run, tmp_path):
    """Each worker loads the spec named (relatively) on the command line; a fresh predict uses the run."""
    root, spec, work, _ = spec_run
    run = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pipeline",
           "train", spec.name, str(work), str(run), "--epochs", "2", *TRAIN, "--batch-size", "4"]  # 6 images a rank
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("kept epoch") == 1 and "roc_auc" in done.stdout  # rank 0 speaks, in the spec's metric
    doc = json.loads((run / "config.json").read_text())
    assert doc["config"]["competition"] == str(spec.resolve())
    assert "valid_roc_auc" in pd.read_csv(run / "holdout" / "metrics.csv").columns
    predicted = fresh("predict", str(spec), str(work), str(run), str(tmp_path / "sub.csv"), "--num-workers", "0",
                      cwd=tmp_path)
    assert predicted.returncode == 0, predicted.stderr
    sub = pd.read_csv(tmp_path / "sub.csv")
    assert list(sub.columns) == ["id", "is_cat"] and sub["is_cat"].between(0, 1).all()


# ---------------------------------------------------------------- the pure parts, on hand-made values


def test_validation_scores_put_the_competitions_metric_first_and_agree_with_sklearn():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 2, 40)
    p = np.clip(targets * 0.3 + rng.random(40) * 0.7, 0.01, 0.99)
    preds = prediction_frame([str(i) for i in range(40)], targets.tolist(), np.c_[1 - p, p], ["dog", "cat"])
    scores = validation_scores(preds, ["dog", "cat"], "roc_auc")
    assert list(scores) == ["roc_auc", "accuracy", "log_loss"]
    assert scores["roc_auc"] == pytest.approx(roc_auc_score(targets, p))
    assert scores["accuracy"] == pytest.approx(np.mean((p > 0.5) == targets))
    assert list(validation_scores(preds, ["dog", "cat"], "log_loss")) == ["log_loss", "accuracy"]


@pytest.mark.parametrize("metric, values, best", [
    ("qwk", [0.2, 0.7, 0.5], 2),  # higher is better
    ("log_loss", [0.9, 0.4, 0.6], 2),  # lower is better
    ("log_loss", [0.3, 0.4, 0.6], 1),
    ("macro_f1", [0.5, 0.5, 0.4], 1),  # a tie: the first epoch, as training keeps it
])
def test_the_best_epoch_follows_the_metrics_direction(metric, values, best):
    frame = pd.DataFrame({"epoch": [1, 2, 3], f"valid_{metric}": values})
    assert best_epoch(frame, metric) == best
    assert best_epoch(frame, "roc_auc") is None  # no such column


def test_learning_curves_plot_the_competitions_metric_and_star_the_best_epoch():
    member = pd.DataFrame({"epoch": [1, 2, 3], "train_loss": [1.0, 0.6, 0.4], "valid_loss": [1.1, 0.8, 0.7],
                           "valid_accuracy": [0.4, 0.9, 0.7], "valid_qwk": [0.1, 0.3, 0.6]})
    fig = learning_curves_figure({"holdout": member}, "qwk")
    panel = fig.axes[1]
    assert "qwk" in panel.get_title() and panel.lines[0].get_ydata().tolist() == [0.1, 0.3, 0.6]
    (star,) = panel.collections
    assert star.get_offsets().tolist() == [[3.0, 0.6]]  # epoch 3 by qwk (accuracy would say 2)
    plain = learning_curves_figure({"holdout": member.drop(columns="valid_qwk")}, "qwk")
    assert "accuracy" in plain.axes[1].get_title()  # an older metrics.csv: accuracy, as before


def test_summary_names_the_metric_its_direction_and_the_best_epochs_score():
    done = {"holdout": {"epochs": 5, "best": {"epoch": 2, "metric": 0.31}}}
    summary = report_summary({"competition": "/x/comp.toml", "folds": 0}, None, done, "log_loss")
    assert summary["metric"] == "log_loss (lower is better)"
    assert summary["best epoch, holdout"] == "2 of 5 (log_loss 0.31)"
    assert report_summary({}, None, done)["best epoch, holdout"] == "2 of 5 (score 0.31)"
