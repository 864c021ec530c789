"""The training engine: schedules, holdout runs, determinism, guards, folds."""
from __future__ import annotations

import json

import numpy as np
import torch
import pandas as pd
import pytest

from conftest import config_from_recipe
from pipeline.config import TrainConfig
from pipeline.errors import PipelineError
from pipeline.metrics import score
from pipeline.train.engine import lr_multiplier
from pipeline.train.stage import train


def cfg_for(comp, work, run, **kw) -> TrainConfig:
    base = dict(epochs=3, batch_size=8, device="cpu")
    return config_from_recipe(comp, work, run, **{**base, **kw})


def test_cosine_schedule_with_warmup():
    cfg = TrainConfig(competition="x", work_dir=".", run_dir=".", model="m", schedule="cosine", warmup_epochs=1)
    steps = [lr_multiplier(s, 100, 10, cfg) for s in range(100)]
    assert steps[0] == pytest.approx(0.1) and steps[9] == pytest.approx(1.0)  # linear warm-up over 10 steps
    assert steps[10] == pytest.approx(1.0) and steps[99] < 0.01
    assert all(a >= b for a, b in zip(steps[9:], steps[10:]))  # then it only decays


def test_step_schedule_matches_the_tutorial():
    cfg = TrainConfig(competition="x", work_dir=".", run_dir=".", model="m", schedule="step",
                      lr_period_epochs=10, lr_decay=0.1)
    assert lr_multiplier(5 * 4, 80, 4, cfg) == 1.0  # epoch 5
    assert lr_multiplier(10 * 4, 80, 4, cfg) == pytest.approx(0.1)  # epoch 10
    assert lr_multiplier(19 * 4 + 3, 80, 4, cfg) == pytest.approx(0.1)


def test_onecycle_peaks_at_30_percent():
    cfg = TrainConfig(competition="x", work_dir=".", run_dir=".", model="m", schedule="onecycle")
    values = [lr_multiplier(s, 100, 10, cfg) for s in range(100)]
    assert int(np.argmax(values)) == 30 and values[0] < 0.1 and values[-1] < 0.01


def test_holdout_run_writes_its_files_and_learns(toy_work, tmp_path):
    comp, work = toy_work
    results = train(cfg_for(comp, work, tmp_path / "run", epochs=4))
    run = tmp_path / "run" / "holdout"  # the holdout member's folder
    for name in ("config.json", "metrics.csv", "last.pt", "best.pt", "done.json"):
        assert (run / name).is_file(), name
    assert (tmp_path / "run" / "config.json").is_file()  # the run's resolved settings
    metrics = pd.read_csv(run / "metrics.csv")
    assert list(metrics.columns[:5]) == ["epoch", "train_loss", "lr", "steps", "valid_loss"]
    assert len(metrics) == 4 and metrics["valid_accuracy"].max() == pytest.approx(results[0].best_metric)
    assert results[0].best_metric >= 0.8  # colours are trivially separable
    assert json.loads((run / "config.json").read_text())["config"]["model"] == "fastnet_s"
    run_doc = json.loads((tmp_path / "run" / "config.json").read_text())
    assert run_doc["config"]["model"] == "fastnet_s" and run_doc["sources"]["model"] == "competition"
    assert run_doc["sources"]["epochs"] == "flag"


def test_same_seed_same_metrics(toy_work, tmp_path):
    comp, work = toy_work
    for name in ("a", "b"):
        train(cfg_for(comp, work, tmp_path / name, epochs=2, mixup=0.2, label_smoothing=0.1))
    a, b = (pd.read_csv(tmp_path / n / "holdout" / "metrics.csv").drop(columns="seconds") for n in "ab")
    pd.testing.assert_frame_equal(a, b)


def test_finished_run_is_not_overwritten_without_force(toy_work, tmp_path):
    comp, work = toy_work
    cfg = cfg_for(comp, work, tmp_path / "run", epochs=1)
    train(cfg)
    best = (tmp_path / "run" / "holdout" / "best.pt").read_bytes()
    with pytest.raises(PipelineError, match="already holds a finished run; use --force"):
        train(cfg)
    assert (tmp_path / "run" / "holdout" / "best.pt").read_bytes() == best
    train(cfg, force=True)


def test_folds_give_out_of_fold_predictions_and_cv(toy_work, tmp_path):
    comp, work = toy_work
    train(cfg_for(comp, work, tmp_path / "run", epochs=2, folds=3))
    run = tmp_path / "run"
    assert all((run / f"fold{k}" / "best.pt").is_file() for k in range(3))
    oof = pd.read_csv(run / "oof.csv", dtype={"id": str})
    labels = pd.read_csv(work / "folds.csv", dtype=str)
    assert sorted(oof["id"]) == sorted(labels["id"])  # every training id exactly once
    cv = json.loads((run / "cv.json").read_text())
    classes = ["cat", "dog", "frog"]
    targets = oof["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    again = score(oof[classes].to_numpy(), targets, 3)
    assert cv["cv"] == pytest.approx(again["accuracy"])
    assert cv["overall"]["log_loss"] == pytest.approx(again["log_loss"])
    assert [f["fold"] for f in cv["folds"]] == [0, 1, 2]


def test_one_fold_then_the_rest_then_full(toy_work, tmp_path):
    comp, work = toy_work
    run = tmp_path / "run"
    train(cfg_for(comp, work, run, epochs=1, fold=1))
    assert (run / "fold1" / "best.pt").is_file() and not (run / "fold0").exists()
    assert not (run / "cv.json").exists()  # the CV score waits for every fold
    train(cfg_for(comp, work, run, epochs=1, fold=0))
    train(cfg_for(comp, work, run, epochs=1, fold=2))
    assert json.loads((run / "cv.json").read_text())["metric"] == "accuracy"
    train(cfg_for(comp, work, run, epochs=1, full=True))
    metrics = pd.read_csv(run / "full" / "metrics.csv")
    assert "valid_loss" not in metrics.columns and metrics["steps"].iloc[0] == 36 // 8


def test_recipe_options_run_together(toy_work, tmp_path):
    comp, work = toy_work
    cfg = cfg_for(comp, work, tmp_path / "run", epochs=2, optimizer="adamw", lr=3e-3, schedule="step",
                  lr_period_epochs=1, lr_decay=0.5, cutmix=1.0, mixup=0.2, clip_grad=1.0, ema=0.9,
                  early_stop=5, nesterov=True)
    train(cfg)
    metrics = pd.read_csv(tmp_path / "run" / "holdout" / "metrics.csv")
    assert {"valid_accuracy_ema", "valid_log_loss_ema"} <= set(metrics.columns)
    assert metrics["lr"].tolist() == pytest.approx([3e-3, 1.5e-3])  # last step of each epoch


def test_tensorboard_logs_every_epoch(toy_work, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    comp, work = toy_work
    train(cfg_for(comp, work, tmp_path / "run", epochs=2, tensorboard=True))
    events = EventAccumulator(str(tmp_path / "run" / "holdout" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("valid_accuracy")] == [1, 2]


def test_tensorboard_missing_is_a_clear_error(toy_work, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    comp, work = toy_work
    with pytest.raises(PipelineError, match="pip install tensorboard"):
        train(cfg_for(comp, work, tmp_path / "run", epochs=1, tensorboard=True))


def test_divergence_is_a_clear_error_and_keeps_the_last_good_epoch(toy_work, tmp_path):
    comp, work = toy_work
    with pytest.raises(PipelineError, match="training diverged; lower --lr"):
        train(cfg_for(comp, work, tmp_path / "run", epochs=2, lr=1e12, optimizer="sgd", momentum=0.0))
    assert not (tmp_path / "run" / "holdout" / "done.json").exists()


def test_ctrl_c_during_an_epochs_writes_waits_for_them():
    import os
    import signal

    from pipeline.train.engine import deferred_interrupt

    written = []
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (CI may ignore SIGINT)
    try:
        with pytest.raises(KeyboardInterrupt):
            with deferred_interrupt():
                os.kill(os.getpid(), signal.SIGINT)  # arrives in the middle of the "writes"
                written.append("last.pt")
                written.append("metrics.csv")
        assert written == ["last.pt", "metrics.csv"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a process that ignores Ctrl-C (nohup) keeps ignoring it
        with deferred_interrupt():
            os.kill(os.getpid(), signal.SIGINT)
            written.append("ignored")
        assert written[-1] == "ignored" and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_resume_with_more_epochs_extends_and_skips_finished_members(toy_work, tmp_path):
    comp, work = toy_work
    run = tmp_path / "run"
    train(cfg_for(comp, work, run, epochs=1, folds=3))
    fold0_best = (run / "fold0" / "best.pt").read_bytes()
    results = train(cfg_for(comp, work, run, epochs=1, folds=3), resume=True)
    assert [r.skipped for r in results] == [True, True, True]  # finished members are not retrained
    assert (run / "fold0" / "best.pt").read_bytes() == fold0_best
    results = train(cfg_for(comp, work, run, epochs=2, fold=1), resume=True)  # --fold K --resume --epochs 2
    assert [r.epochs for r in results] == [2]
    assert len(pd.read_csv(run / "fold1" / "metrics.csv")) == 2
    assert json.loads((run / "fold1" / "done.json").read_text())["epochs"] == 2
    assert len(pd.read_csv(run / "fold0" / "metrics.csv")) == 1


def test_resume_restores_ema_and_early_stop_state(toy_work, tmp_path):
    from pipeline.checkpoint import load_checkpoint

    comp, work = toy_work
    run = tmp_path / "run"
    train(cfg_for(comp, work, run, epochs=2, ema=0.9, early_stop=50))
    state = load_checkpoint(run / "holdout" / "last.pt")
    steps = int(pd.read_csv(run / "holdout" / "metrics.csv")["steps"].sum())
    assert int(state["ema"]["n_averaged"]) == steps  # the EMA's step count travels with its weights
    assert set(state["early_stop"]) == {"stale"} and set(state["best"]) == {"epoch", "metric", "variant"}


def test_interrupted_then_resumed_equals_uninterrupted_with_ema_and_early_stop(toy_work, tmp_path, monkeypatch):
    import pipeline.train.stage as train_module
    from pipeline.checkpoint import load_checkpoint

    comp, work = toy_work
    options = dict(epochs=4, ema=0.8, early_stop=2, mixup=0.2)
    train(cfg_for(comp, work, tmp_path / "whole", **options))
    saved = train_module._save

    def save_then_stop(member, st, *args):
        saved(member, st, *args)
        if len(st.history) == 2:
            raise KeyboardInterrupt  # as a Ctrl-C right after epoch 2's files

    monkeypatch.setattr(train_module, "_save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train(cfg_for(comp, work, tmp_path / "cut", **options))
    monkeypatch.setattr(train_module, "_save", saved)
    train(cfg_for(comp, work, tmp_path / "cut", **options), resume=True)
    whole, cut = (pd.read_csv(tmp_path / n / "holdout" / "metrics.csv").drop(columns="seconds") for n in ("whole", "cut"))
    pd.testing.assert_frame_equal(whole, cut)
    a, b = (load_checkpoint(tmp_path / n / "holdout" / "last.pt") for n in ("whole", "cut"))
    assert a["early_stop"] == b["early_stop"] and a["best"] == b["best"]
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
