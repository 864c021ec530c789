"""Calibration of log-loss runs (issue 23, point 7): temperature + class-prior weight, scored nested."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipeline.config import resolve_config
from pipeline.download.reorg import reorg
from pipeline.metrics import score
from pipeline.predict.calibrate import (apply_calibration, apply_stored, calibrate_oof, class_prior, fit_calibration,
                                        is_on, nested_calibration, row_priors)
from pipeline.predict.stage import predict, predict_items
from pipeline.runs import Run
from pipeline.train.stage import train


def softmax(z):
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def log_loss(p, y):
    return float(-np.mean(np.log(p[np.arange(len(y)), y])))


def overconfident(n=600, c=5, sharpen=3.0, seed=0):
    """Labels drawn from softmax(z), predictions softmax(sharpen * z): calibrated at temperature ``sharpen``."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, (n, c))
    y = np.array([rng.choice(c, p=p) for p in softmax(z)])
    return softmax(sharpen * z), y


def test_the_fitted_temperature_undoes_overconfidence():
    probs, y = overconfident(sharpen=3.0)
    t, w = fit_calibration(probs, y, class_prior(y, 5))
    assert t == pytest.approx(3.0, rel=0.25) and w < 0.1
    assert log_loss(apply_calibration(probs, t, w, class_prior(y, 5)), y) < log_loss(probs, y) - 0.2


@pytest.mark.parametrize("seed", range(4))
def test_in_sample_it_cannot_be_worse_than_the_uncalibrated_or_the_prior(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 6, 200)
    probs = softmax(rng.normal(0, 2 + seed, (200, 6)))  # mostly noise: the prior alone wins
    prior = class_prior(y, 6)
    t, w = fit_calibration(probs, y, prior)
    fitted = log_loss(apply_calibration(probs, t, w, prior), y)
    assert fitted <= log_loss(probs, y) + 1e-9
    assert fitted <= log_loss(np.tile(prior, (200, 1)), y) + 1e-9
    assert w > 0.5  # noise: the fit leans on the prior


def test_identity_and_pure_prior_are_what_they_say():
    probs, y = overconfident(n=50)
    prior = class_prior(y, 5)
    assert np.allclose(apply_calibration(probs, 1.0, 0.0, prior), probs)
    assert np.allclose(apply_calibration(probs, 2.0, 1.0, prior), np.tile(prior, (50, 1)))


def test_class_prior_floors_an_unseen_class():
    prior = class_prior(np.array([0, 0, 1]), 3)
    assert prior == pytest.approx([3 / 6, 2 / 6, 1 / 6])


def test_row_priors_never_count_the_rows_own_fold_or_the_held_out_fold():
    y = np.array([0, 0, 1, 1, 2, 2])
    folds = np.array([0, 1, 2, 0, 1, 2])
    # fold 0's rows (labels 0, 1): their model trained on folds 1 and 2 (labels 0, 2, 1, 2)
    assert row_priors(y, folds, 3)[0] == pytest.approx(class_prior(np.array([0, 2, 1, 2]), 3))
    # with fold 2 held out, fold 0's rows see fold 1 only (labels 0, 2)
    assert row_priors(y, folds, 3, held_out=2)[0] == pytest.approx(class_prior(np.array([0, 2]), 3))


def test_nested_calibration_fits_each_fold_on_the_others_and_differs_from_in_sample():
    probs, y = overconfident(n=300, sharpen=3.0, seed=1)
    folds = np.arange(300) % 3
    probs[folds == 0] = softmax(np.log(probs[folds == 0]) / 3.0)  # fold 0 is already calibrated
    nested, fitted = nested_calibration(probs, y, folds, 5)
    others = folds != 0
    t, w = fit_calibration(probs[others], y[others], row_priors(y, folds, 5, held_out=0)[others])
    assert fitted[0] == pytest.approx([t, w])
    assert np.allclose(nested[folds == 0], apply_calibration(probs[folds == 0], t, w, class_prior(y[others], 5)))
    assert fitted[0][0] > fitted[1][0]  # fold 0's values come from the overconfident folds: a higher temperature
    _, in_sample, record = calibrate_oof(probs, y, folds, ["a", "b", "c", "d", "e"])
    assert log_loss(in_sample, y) < log_loss(nested, y)  # fitted on the rows it scores: optimistic
    assert not np.allclose(in_sample, nested)
    assert record["prior"]["a"] == pytest.approx(class_prior(y, 5)[0]) and set(record["folds"]) == {"0", "1", "2"}


def test_stored_calibration_is_applied_by_class_name():
    record = {"temperature": 2.0, "weight": 0.3, "prior": {"a": 0.5, "b": 0.3, "c": 0.2}}
    probs = np.array([[0.7, 0.2, 0.1]])
    swapped = apply_stored(record, probs[:, [2, 0, 1]], ["c", "a", "b"])
    assert np.allclose(swapped[:, [1, 2, 0]], apply_stored(record, probs, ["a", "b", "c"]))
    assert apply_stored(None, probs, ["a", "b", "c"]) is probs


@pytest.mark.parametrize("setting, metric, on", [("auto", "log_loss", True), ("auto", "accuracy", False),
                                                 ("on", "accuracy", True), ("off", "log_loss", False)])
def test_auto_calibrates_log_loss_competitions_only(setting, metric, on):
    assert is_on(setting, metric) is on


def test_a_fold_run_stores_its_calibration_and_predict_applies_it(toy_probs, tmp_path):
    comp, raw = toy_probs
    work, run_dir = tmp_path / "work", tmp_path / "run"
    reorg(comp, raw, work, valid_ratio=0.25, folds=3, seed=0)
    train(resolve_config(comp, work, run_dir, None, {"device": "cpu", "folds": 3, "epochs": 2, "batch_size": 8,
                                                     "calibrate": "auto"}))  # auto: on, a log-loss competition
    cv = Run(run_dir).read_cv()
    cal = cv["calibration"]
    assert cal and set(cal["prior"]) == {"cat", "dog", "frog"} and cal["temperature"] > 0
    oof = pd.read_csv(Run(run_dir).oof_path, dtype={"id": str})
    targets = oof["label"].map({"cat": 0, "dog": 1, "frog": 2}).to_numpy()
    # the printed CV is the nested calibrated OOF that oof.csv keeps; the uncalibrated score is beside it
    assert cv["cv"] == pytest.approx(score(oof[["cat", "dog", "frog"]].to_numpy(), targets, 3, ("log_loss",),
                                           clip=cv["clip"])["log_loss"])
    assert cal["uncalibrated"] != pytest.approx(cv["cv"]) and cal["in_sample"] <= cal["uncalibrated"] + 1e-9
    out = tmp_path / "sub.csv"
    predict(comp, work, run_dir, out, device="cpu")
    from pipeline.data.items import list_split, load_reorg

    items = list_split(work, load_reorg(work), "test")
    ids, raw_probs, classes = predict_items(Run(run_dir).finished("auto"), items, device="cpu")
    expected = pd.DataFrame(apply_stored(cal, raw_probs, classes), columns=classes, index=ids)
    sub = pd.read_csv(out, dtype={"id": str}).set_index("id")
    assert np.allclose(sub.loc[ids, classes].to_numpy(), expected.to_numpy(), atol=1e-6)
    assert not np.allclose(raw_probs, expected.to_numpy(), atol=1e-3)  # the calibration changed them
    assert json.loads(Run(run_dir).test_probs_meta_path.read_text())["calibration"] == [cal["temperature"],
                                                                                         cal["weight"]]


def test_the_paired_interval_sees_a_consistent_small_gain_the_scores_own_intervals_hide():
    from pipeline.predict.calibrate import paired_change_interval

    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 300)
    before = softmax(rng.normal(0, 3, (300, 4)))  # rows of very different difficulty
    after = 0.95 * before + 0.05 / 4  # a little mass spread: helps the rows it misses most
    lo, hi = paired_change_interval(before, after, y)
    change = log_loss(after, y) - log_loss(before, y)
    assert lo <= change <= hi and hi < 0  # a gain, beyond the noise of the rows
    lo, hi = paired_change_interval(before, before, y)
    assert lo == hi == 0
