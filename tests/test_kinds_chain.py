"""Every task kind from `pipeline init` alone, end to end through the CLI: init -> reorg -> train -> predict -> check.

Each download is generated (tests/kinds.py); init writes its spec, with no field left to set; the chain runs
two folds of a tiny model; the CV the pipeline prints is recomputed here with scikit-learn from oof.csv (the
nested decision with the thresholds cv.json says each fold got), and the submission passes `check`.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import cohen_kappa_score, fbeta_score, log_loss, mean_squared_error, roc_auc_score

from tests.kinds import WRITERS
from tests.test_init import invoke

TRAIN = ["--model", "fastnet_s", "--image-size", "16", "--batch-size", "8", "--device", "cpu", "--num-workers", "0"]


def chain(tmp_path, kind: str, *train: str) -> tuple[dict, pd.DataFrame, pd.DataFrame, dict]:
    """(cv.json, oof.csv, the submission, the spec's top-level fields) of a 2-fold run from init's spec."""
    import tomllib

    raw, spec, work, run = tmp_path / "raw", tmp_path / "spec.toml", tmp_path / "work", tmp_path / "run"
    WRITERS[kind](raw)
    done = invoke("init", raw, "--out", spec, "--slug", f"chain-{kind}")
    assert done.exit_code == 0, done.output
    text = spec.read_text()
    assert "# TODO check:" not in text, text  # nothing left for the user to set
    for args in (("reorg", spec, raw, work, "--folds", "2"),
                 ("train", spec, work, run, "--folds", "2", *TRAIN, *train),
                 ("predict", spec, work, run, tmp_path / "sub.csv", "--device", "cpu"),
                 ("check", spec, tmp_path / "sub.csv", "--work-dir", work)):
        done = invoke(*args)
        assert done.exit_code == 0, (args[0], done.output)
    cv = json.loads((run / "cv.json").read_text())
    return cv, pd.read_csv(run / "oof.csv", keep_default_na=False), pd.read_csv(tmp_path / "sub.csv"), \
        tomllib.loads(text)


def folds_of(tmp_path, ids) -> np.ndarray:
    folds = pd.read_csv(tmp_path / "work" / "folds.csv", dtype={"id": str}).set_index("id")["fold"]
    return folds.loc[list(ids)].to_numpy()


@pytest.fixture(autouse=True)
def _unregister():
    yield
    from pipeline.competition import _REGISTRY

    for key in [k for k, c in _REGISTRY.items() if c.slug.startswith("chain-")]:
        _REGISTRY.pop(key)


def test_label_in_the_file_name(tmp_path):
    cv, oof, sub, spec = chain(tmp_path, "names", "--freeze-backbone", "--head", "logreg", "--epochs", "1")
    assert spec["layout"] == "names" and spec["metric"] == "accuracy"
    classes = ["cat", "dog", "fox"]
    want = float((oof[classes].to_numpy().argmax(1) == oof["label"].map(classes.index).to_numpy()).mean())
    assert cv["cv"] == pytest.approx(want, abs=1e-9) and cv["cv"] > 0.6  # chance is 1/3
    assert set(sub["label"]) <= set(classes)


def test_one_hot_columns(tmp_path):
    cv, oof, sub, spec = chain(tmp_path, "onehot", "--freeze-backbone", "--head", "logreg", "--epochs", "1")
    names = ["healthy", "rust", "scab", "multiple diseases"]
    assert spec["task"] == "single" and spec["label_columns"] == names and spec["submission"] == "probs"
    ordered = sorted(names)  # sklearn's log_loss reads the columns in the labels' sorted order
    probs = np.clip(oof[ordered].to_numpy(), 1e-6, None)
    probs /= probs.sum(1, keepdims=True)
    assert cv["cv"] == pytest.approx(log_loss(oof["label"], probs, labels=ordered), abs=1e-9)
    assert list(sub.columns) == ["image_id", *names]


def test_multi_hot_columns_score_mean_column_auc(tmp_path):
    cv, oof, sub, spec = chain(tmp_path, "multihot", "--freeze-backbone", "--head", "logreg", "--epochs", "1")
    names = ["healthy", "rust", "scab", "multiple diseases"]
    assert spec["task"] == "multilabel" and spec["metric"] == "mean_auc"
    truth = np.array([[n in cell.split("|") for n in names] for cell in oof["label"]], dtype=float)
    want = np.mean([roc_auc_score(truth[:, k], oof[n]) for k, n in enumerate(names)])
    assert cv["cv"] == pytest.approx(want, abs=1e-9) and cv["cv"] > 0.6
    assert (sub[names].sum(axis=1) > 1.05).any()  # per-label probabilities, not a distribution


def test_tags_scored_by_f_beta_with_thresholds_fitted_out_of_fold(tmp_path):
    cv, oof, sub, spec = chain(tmp_path, "tags", "--freeze-backbone", "--head", "logreg", "--epochs", "1")
    assert spec["task"] == "multilabel" and spec["submission"] == "tags" and spec["label_separator"] == " "
    names = ["clear", "haze", "road", "water"]
    truth = np.array([[n in cell.split("|") for n in names] for cell in oof["label"]], dtype=int)
    probs, folds = oof[names].to_numpy(), folds_of(tmp_path, oof["id"])
    decided = np.zeros_like(truth)
    for k, cuts in cv["decision"]["per_fold"].items():  # fold k decided by thresholds fitted on the other fold
        rows = folds == int(k)
        decided[rows] = probs[rows] >= np.asarray(cuts)[None, :]
    nested = fbeta_score(truth, decided, beta=spec["beta"], average="samples", zero_division=0)
    assert cv["cv"] == pytest.approx(nested, abs=1e-9)
    in_sample = fbeta_score(truth, probs >= np.asarray(cv["decision"]["thresholds"]), beta=spec["beta"],
                            average="samples", zero_division=0)
    assert cv["decision"]["in_sample"] == pytest.approx(in_sample, abs=1e-9) and in_sample >= nested
    assert all(set(cell.split()) <= set(names) for cell in sub["tags"].fillna(""))
    # a second run, blended: weights and thresholds fitted inside the folds
    again = ("train", tmp_path / "spec.toml", tmp_path / "work", tmp_path / "run2", "--folds", "2", *TRAIN,
             "--freeze-backbone", "--head", "logreg", "--epochs", "1", "--seed", "1")
    assert invoke(*again).exit_code == 0
    done = invoke("blend", tmp_path / "run", tmp_path / "run2", tmp_path / "blend.csv", "--device", "cpu",
                  "--competition", tmp_path / "spec.toml")
    assert done.exit_code == 0, done.output
    record = json.loads((tmp_path / "blend.blend.json").read_text())
    assert record["fitted_on"] == "bce" and set(record["fold_thresholds"]) == {"0", "1"}
    assert record["blended_cv"] <= record["in_sample"] + 1e-12
    assert invoke("check", tmp_path / "spec.toml", tmp_path / "blend.csv", "--work-dir", tmp_path / "work").exit_code == 0


def test_regression_with_metadata_is_scored_by_rmse_and_records_its_columns(tmp_path):
    cv, oof, sub, spec = chain(tmp_path, "regression", "--freeze-backbone", "--head", "logreg", "--epochs", "1")
    assert spec["task"] == "regression" and spec["metadata"] == ["Eyes", "Group"]
    rmse = math.sqrt(mean_squared_error(oof["label"].astype(float), oof["Pawpularity"]))
    assert cv["cv"] == pytest.approx(rmse, abs=1e-9)
    constant = float(np.std(oof["label"].astype(float)))  # the training mean's RMSE, about
    assert cv["cv"] < constant
    plan = json.loads((tmp_path / "run" / "fold0" / "config.json").read_text())["plan"]
    assert plan["metadata"]["columns"] == ["Eyes", "Group"]
    train = pd.read_csv(tmp_path / "raw" / "train.csv")
    assert sub["Pawpularity"].between(train["Pawpularity"].min(), train["Pawpularity"].max()).all()


def test_ordinal_grades_scored_by_qwk_nested(tmp_path):
    cv, oof, sub, spec = chain(tmp_path, "ordinal", "--epochs", "3")
    assert spec["task"] == "ordinal" and spec["metric"] == "qwk" and spec["submission"] == "grade"
    raw, truth, folds = oof["diagnosis"].to_numpy(), oof["label"].astype(int).to_numpy(), folds_of(tmp_path, oof["id"])
    decided = np.zeros(len(raw), dtype=int)
    for k, cuts in cv["decision"]["per_fold"].items():
        rows = folds == int(k)
        decided[rows] = np.searchsorted(np.sort(cuts), raw[rows], side="right")
    nested = cohen_kappa_score(truth, decided, weights="quadratic", labels=range(5))
    assert cv["cv"] == pytest.approx(nested, abs=1e-9)
    assert set(sub["diagnosis"]) <= {0, 1, 2, 3, 4}


def test_binary_with_a_patient_column_keeps_each_patient_on_one_side(tmp_path):
    cv, oof, sub, spec = chain(tmp_path, "patients", "--epochs", "2")  # fine-tuned, metadata fused into the head
    assert spec["group_column"] == "patient_id" and spec["submission"] == "binary"
    items = pd.read_csv(tmp_path / "work" / "items.csv", dtype=str)
    assert (items.groupby("group")["fold"].nunique() == 1).all()
    assert (items.groupby("group")["split"].nunique() == 1).all()
    assert cv["cv"] == pytest.approx(roc_auc_score(oof["label"].astype(int), oof["1"]), abs=1e-9)
    plan = json.loads((tmp_path / "run" / "fold1" / "config.json").read_text())["plan"]
    assert plan["metadata"]["columns"] == ["sex", "age_approx"]  # encoded on fold 1's training rows
    import torch

    state = torch.load(tmp_path / "run" / "fold1" / "best.pt", weights_only=False)
    assert state["model"]["meta_head.weight"].abs().sum() > 0  # the metadata head trained from its zero start
    assert sub["target"].between(0, 1).all()
