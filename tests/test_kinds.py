"""Task kinds as units: metrics against scikit-learn, the Task's outputs and loss, decisions fitted nested,
targets read from every shape, metadata encoded on the training rows only, and check per submission kind."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import (cohen_kappa_score, fbeta_score, mean_absolute_error, mean_squared_error,
                             roc_auc_score)

from pipeline.competition import Competition
from pipeline.config import Recipe
from pipeline.data.items import Item
from pipeline.data.metadata import MetaEncoder, item_metadata
from pipeline.download.targets import names_labels, targets_of
from pipeline.errors import PipelineError
from pipeline.metrics import score
from pipeline.models.task import Task, bad_mask
from pipeline.predict.decide import fit_thresholds, nested_decision
from pipeline.predict.submission import build_submission, check_submission
from pipeline.workdir import ITEMS_FILE, TEST_CLASS_DIR, TEST_ITEMS_FILE

RNG = np.random.default_rng(0)


def comp(**fields) -> Competition:
    base = dict(slug="k", title="k", id_column="id", labels_file="train.csv", label_column="y",
                sample_submission="s.csv", submission="label", metric="accuracy", image_size=16,
                mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), recipe=Recipe())
    return Competition(**{**base, **fields})


# ---------------------------------------------------------------- metrics agree with scikit-learn to 1e-9


def test_multilabel_metrics_equal_sklearn():
    targets = (RNG.random((80, 5)) < 0.3).astype(float)
    probs = np.clip(targets * 0.4 + RNG.random((80, 5)) * 0.6, 0, 1)
    task = Task("multilabel", tuple("abcde"))
    got = score(probs, targets, 5, ("f_beta_samples", "f_beta_micro", "f_beta_macro", "mean_auc"), task=task,
                beta=2.0)
    decided = (probs >= 0.5).astype(int)
    for average in ("samples", "micro", "macro"):
        want = fbeta_score(targets.astype(int), decided, beta=2.0, average=average, zero_division=0)
        assert got[f"f_beta_{average}"] == pytest.approx(want, abs=1e-9)
    want_auc = np.mean([roc_auc_score(targets[:, k], probs[:, k]) for k in range(5)])
    assert got["mean_auc"] == pytest.approx(want_auc, abs=1e-9)


def test_regression_and_ordinal_metrics_equal_sklearn():
    truth = RNG.normal(50, 20, (60, 1))
    pred = truth + RNG.normal(0, 7, (60, 1))
    got = score(pred, truth, 1, ("rmse", "mae"), task=Task("regression", ("y",)))
    assert got["rmse"] == pytest.approx(math.sqrt(mean_squared_error(truth, pred)), abs=1e-9)
    assert got["mae"] == pytest.approx(mean_absolute_error(truth, pred), abs=1e-9)
    grades = RNG.integers(0, 5, (60, 1)).astype(float)
    raw = grades + RNG.normal(0, 0.7, (60, 1))
    task = Task("ordinal", ("g",), grades=("0", "1", "2", "3", "4"))
    decided = np.clip(np.floor(raw + 0.5), 0, 4).astype(int).reshape(-1)  # the default cuts: half-way
    want = cohen_kappa_score(grades.reshape(-1).astype(int), decided, weights="quadratic", labels=range(5))
    assert score(raw, grades, 1, ("qwk",), task=task)["qwk"] == pytest.approx(want, abs=1e-9)


# ---------------------------------------------------------------- the Task


def test_regression_task_standardises_on_its_rows_maps_back_and_clips():
    task = Task("regression", ("y",)).fitted(torch.tensor([[10.0], [20.0], [30.0], [math.nan]]))
    assert task.center == pytest.approx(20.0) and task.scale == pytest.approx(10.0)  # NaN row (unreadable) left out
    out = task.activation(torch.tensor([[0.5], [5.0], [-9.0]]))
    assert out.reshape(-1).tolist() == pytest.approx([25.0, 30.0, 10.0])  # 25, then clipped to [10, 30]
    loss = task.criterion()(torch.tensor([[1.0], [0.0]]), torch.tensor([[30.0], [math.nan]]))
    assert float(loss) == pytest.approx(0.0)  # (30 - 20) / 10 = 1: exact, the NaN row ignored


def test_multilabel_loss_ignores_unreadable_rows_and_balance_weights_count_positives():
    task = Task("multilabel", ("a", "b"))
    targets = torch.tensor([[1.0, 0.0], [math.nan, math.nan], [0.0, 0.0], [1.0, 0.0]])
    logits = torch.zeros(4, 2)
    assert float(task.criterion()(logits, targets)) == pytest.approx(2 * math.log(2))  # summed over the 2 labels
    assert bad_mask(targets).tolist() == [False, True, False, False]
    weights = task.balance_weights(targets)
    assert weights.tolist() == pytest.approx([0.5, 3.0])  # a: 1 negative / 2 positives; b: 3 / 0 -> 3 / 1


def test_single_balance_weights_are_inverse_frequency():
    task = Task("single", ("a", "b", "c"))
    weights = task.balance_weights(torch.tensor([0, 0, 0, 1, -100]))
    assert weights.tolist() == pytest.approx([4 / 6, 2.0, 0.0])  # 4 rows / (3 or 1 x 2 classes present)


def test_task_text_round_trips_label_sets_with_spaces():
    task = Task("multilabel", ("multiple diseases", "rust"))
    text = [task.target_text(t) for t in ([1.0, 1.0], [0.0, 0.0], [0.0, 1.0])]
    assert text == ["multiple diseases|rust", "", "rust"]
    assert task.targets_from_text(text).tolist() == [[1, 1], [0, 0], [0, 1]]


# ---------------------------------------------------------------- decisions fitted out of fold, scored nested


def test_nested_threshold_score_differs_from_in_sample_on_a_hand_made_case():
    # One label. Fold 0's positives score 0.3, fold 1's score 0.7; negatives 0.1 and 0.5. Fitting on fold 1
    # alone puts the threshold above 0.5 (0.55-0.7), which misses every positive of fold 0; fitting on fold 0
    # alone puts it in (0.1, 0.3], which calls fold 1's 0.5 negatives positive. Fitted on everything, 0.3
    # catches both folds' positives and keeps the 0.1 negatives out.
    task = Task("multilabel", ("a",))
    outputs = np.array([[0.3], [0.3], [0.1], [0.1], [0.7], [0.7], [0.5], [0.5]])
    targets = np.array([[1], [1], [0], [0], [1], [1], [0], [0]], dtype=float)
    folds = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    record, decided = nested_decision(task, outputs, targets, folds, "f_beta_micro", beta=1.0)
    assert record["per_fold"][0][0] > 0.5 and record["per_fold"][1][0] <= 0.3
    assert decided.reshape(-1).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    # nested: fold 0 -> 0 true positives of 2; fold 1 -> 2 TP, 2 FP: F1 = 2*2 / (2*2 + 2 + 2) = 0.5
    assert record["nested"] == pytest.approx(0.5)
    # in-sample: threshold <= 0.3 -> TP 4, FP 2 (the 0.5s), FN 0: F1 = 8 / 10
    assert record["in_sample"] == pytest.approx(0.8)
    assert record["default"] == pytest.approx(fbeta_score(targets.reshape(-1), outputs.reshape(-1) >= 0.5, beta=1.0))


def test_ordinal_cuts_improve_qwk_of_a_shifted_model_and_stay_ordered():
    grades = np.repeat(np.arange(5), 20).astype(float)
    raw = grades * 0.6 + RNG.normal(0, 0.15, 100)  # squeezed: the half-way cuts under-call the high grades
    task = Task("ordinal", ("g",), grades=tuple("01234"))
    cuts = fit_thresholds(task, raw[:, None], grades[:, None], "qwk")
    assert list(cuts) == sorted(cuts)
    fitted = score(raw[:, None], grades[:, None], 1, ("qwk",), task=task.with_thresholds(cuts))["qwk"]
    default = score(raw[:, None], grades[:, None], 1, ("qwk",), task=task)["qwk"]
    assert fitted > default + 0.05


# ---------------------------------------------------------------- targets from every shape


def test_one_hot_columns_give_the_class_and_two_ones_is_an_error(tmp_path):
    c = comp(label_column="", label_columns=("cat", "dog"), submission="probs", metric="log_loss")
    frame = pd.DataFrame({"id": ["a", "b"], "cat": ["1", "0"], "dog": ["0", "1"]})
    labels, info = targets_of(c, frame, tmp_path / "train.csv", ["id", "cat", "dog"])
    assert labels["label"].tolist() == ["cat", "dog"] and info.kind == "single"
    frame.loc[1, "cat"] = "1"
    with pytest.raises(PipelineError, match="row 3: id 'b' has 2 of the one-hot columns set"):
        targets_of(c, frame, tmp_path / "train.csv", ["id", "cat", "dog"])


def test_tags_become_a_multi_hot_target_in_the_sample_columns_order(tmp_path):
    c = comp(task="multilabel", label_separator=" ", submission="tags", metric="f_beta_samples")
    frame = pd.DataFrame({"id": ["a", "b", "c"], "label": ["water clear", "clear", ""]})
    labels, info = targets_of(c, frame, tmp_path / "t.csv", ["id", "tags"])
    assert info.names == ["clear", "water"]
    assert labels["target"].tolist() == [(1.0, 1.0), (1.0, 0.0), (0.0, 0.0)]


def test_regression_and_grade_targets_are_checked(tmp_path):
    reg = comp(task="regression", submission="value", metric="rmse")
    bad = pd.DataFrame({"id": ["a", "b"], "label": ["1.5", "n/a"]})
    with pytest.raises(PipelineError, match="row 3: id 'b' has target 'n/a'"):
        targets_of(reg, bad, tmp_path / "t.csv", ["id", "y"])
    ordinal = comp(task="ordinal", submission="grade", metric="qwk")
    frame = pd.DataFrame({"id": ["a", "b", "c"], "label": ["1", "3", "2"]})
    labels, info = targets_of(ordinal, frame, tmp_path / "t.csv", ["id", "y"])
    assert info.grades == ["1", "2", "3"] and labels["target"].tolist() == [(0.0,), (2.0,), (1.0,)]
    frame.loc[2, "label"] = "2.5"
    with pytest.raises(PipelineError, match="not a whole number"):
        targets_of(ordinal, frame, tmp_path / "t.csv", ["id", "y"])


def test_file_name_labels_and_a_name_that_does_not_match(tmp_path):
    c = comp(layout="names", labels_file="", label_column="", label_pattern=r"(?P<label>.+)[._]\d+")
    frame = names_labels(c, {"cat.1": "cat.1.jpg", "great_pyrenees_3": "great_pyrenees_3.jpg"}, tmp_path)
    assert frame.set_index("id")["label"].to_dict() == {"cat.1": "cat", "great_pyrenees_3": "great_pyrenees"}
    with pytest.raises(PipelineError, match="does not match label_pattern"):
        names_labels(c, {"cat": "cat.jpg"}, tmp_path)


def test_spec_combinations_that_cannot_work_name_the_field():
    with pytest.raises(PipelineError, match="task 'regression' submits 'value'"):
        comp(task="regression", submission="label", metric="rmse")
    with pytest.raises(PipelineError, match="metric of task 'regression'"):
        comp(task="regression", submission="value", metric="accuracy")
    with pytest.raises(PipelineError, match=r"has no group \(\?P<label>"):
        comp(layout="names", labels_file="", label_column="", label_pattern=r"(.+)\.\d+")
    with pytest.raises(PipelineError, match="metadata needs test_file"):
        comp(metadata=("age",))


# ---------------------------------------------------------------- metadata


def test_metadata_is_encoded_with_the_training_rows_statistics_only():
    train = pd.DataFrame({"age": ["30", "50", ""], "site": ["head", "torso", "head"]})
    enc = MetaEncoder.fit(train, ["age", "site"])
    assert enc.numeric == (("age", 40.0, 10.0),) and enc.categorical == (("site", ("head", "torso")),)
    test = pd.DataFrame({"age": ["60", ""], "site": ["leg", "torso"]})
    assert enc.transform(test).tolist() == [[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]]  # unseen site: zeros; missing: mean
    assert MetaEncoder.from_json(enc.to_json()) == enc


def test_metadata_rows_come_from_the_items_split_not_from_its_folder_name(tmp_path):
    """A training class called "unknown" lives in a folder named like the test images' one; an id may be both a
    training and a test id (Kaggle numbers both from 1): each row is read from its own split's table."""
    pd.DataFrame({"id": ["1"], "m:age": ["30"]}).to_csv(tmp_path / ITEMS_FILE, index=False)
    pd.DataFrame({"id": ["1"], "m:age": ["70"]}).to_csv(tmp_path / TEST_ITEMS_FILE, index=False)
    labelled = Item("1", tmp_path / "train_valid" / TEST_CLASS_DIR / "1.png", 0)
    test = Item("1", tmp_path / "test" / TEST_CLASS_DIR / "1.png", -1, test=True)
    assert item_metadata(tmp_path, ["age"], [labelled, test])["age"].tolist() == ["30", "70"]
    assert (labelled.key, test.key) == ((False, "1"), (True, "1"))


# ---------------------------------------------------------------- submissions and their checks per kind


def test_tags_grade_and_value_submissions_are_built_by_name_and_checked():
    sample = pd.DataFrame({"id": ["x", "y"], "tags": ["", ""]})
    tags = comp(task="multilabel", label_separator=" ", submission="tags", metric="f_beta_samples",
                submission_label_column="tags")
    task = Task("multilabel", ("clear", "water"), thresholds=(0.5, 0.2))
    frame = build_submission(tags, ["y", "x"], np.array([[0.9, 0.3], [0.1, 0.1]]), ["clear", "water"], sample, task)
    assert frame["tags"].tolist() == ["", "clear water"]  # rows in the sample's order
    assert check_submission(tags, frame, sample, ["clear", "water"]) == []
    frame.loc[0, "tags"] = "cloudy"
    assert "tag 'cloudy' is not one of the labels" in check_submission(tags, frame, sample, ["clear", "water"])[0]
    grade = comp(task="ordinal", submission="grade", metric="qwk", submission_label_column="y")
    sample = pd.DataFrame({"id": ["x", "y"], "y": [0, 0]})
    gtask = Task("ordinal", ("y",), grades=("1", "2", "3"))
    frame = build_submission(grade, ["x", "y"], np.array([[1.6], [0.2]]), ["y"], sample, gtask)
    assert frame["y"].tolist() == [3, 1]  # grade index 2 -> grade "3"
    frame.loc[1, "y"] = 7
    assert "7 is not one of the grades" in check_submission(grade, frame, sample, ["y"], ["1", "2", "3"])[0]
    value = comp(task="regression", submission="value", metric="rmse", submission_label_column="y")
    bad = pd.DataFrame({"id": ["x", "y"], "y": [1.0, np.inf]})
    assert "is not a finite number" in check_submission(value, bad, sample, ["y"])[0]


def test_one_label_is_scored_as_a_label_not_as_a_binary_pair_of_classes():
    # sklearn reads an (N, 1) indicator as binary and micro-averages both classes (= accuracy)
    targets = np.array([[1], [1], [0], [0]], dtype=float)
    decided_probs = np.array([[0.9], [0.1], [0.1], [0.9]])
    task = Task("multilabel", ("a",))
    got = score(decided_probs, targets, 1, ("f_beta_micro", "f_beta_samples"), task=task)
    assert got["f_beta_micro"] == pytest.approx(fbeta_score([1, 1, 0, 0], [1, 0, 0, 1], beta=1.0))  # 0.5
    assert got["f_beta_samples"] == pytest.approx(0.25)  # one row of four has its label found


def test_balanced_sampler_draws_each_class_about_equally():
    from pipeline.data.loaders import epoch_order

    targets = torch.tensor([0] * 90 + [1] * 10)
    weights = Task("single", ("a", "b")).sample_weights(targets)
    order, _ = epoch_order(100, True, seed=0, epoch=0, weights=weights)
    drawn = targets[order].float().mean().item()
    assert 0.35 < drawn < 0.65  # the 10% class drawn about half the time (binomial sd 0.05)
    plain, _ = epoch_order(100, True, seed=0, epoch=0)
    assert sorted(plain.tolist()) == list(range(100))  # without weights: a permutation, as before
    rows = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    assert Task("multilabel", ("a", "b")).sample_weights(rows).tolist() == pytest.approx([0.5, 0.5, 1.0, 1.0])


def test_the_spec_chooses_huber_for_a_regression():
    info = {"task": "regression", "classes": ["y"]}
    huber = Task.of(info, "huber").fitted(torch.tensor([[0.0], [2.0]]))  # center 1, scale sqrt(2)
    mse = Task.of(info).fitted(torch.tensor([[0.0], [2.0]]))
    out, target = torch.tensor([[3.0]]), torch.tensor([[1.0]])  # 3 standard units from the target (0)
    assert float(mse.criterion()(out, target)) == pytest.approx(9.0)
    assert float(huber.criterion()(out, target)) == pytest.approx(2.5)  # delta 1: 3 - 0.5
    with pytest.raises(PipelineError, match="loss is for task 'regression' or 'ordinal'"):
        comp(loss="huber")


def test_numpy_qwk_equals_sklearn_with_a_grade_absent_from_both_sides():
    truth = RNG.integers(0, 6, 500)
    pred = np.clip(truth + RNG.integers(-2, 3, 500), 0, 5)
    truth[truth == 3], pred[pred == 3] = 2, 2  # grade 3 appears nowhere
    probs = np.eye(6)[pred]
    want = cohen_kappa_score(truth, pred, weights="quadratic", labels=list(range(6)))
    assert score(probs, truth, 6, ("qwk",))["qwk"] == pytest.approx(want, abs=1e-9)


def test_numpy_auc_equals_sklearn_with_ties():
    truth = RNG.integers(0, 2, 400)
    scores = np.round(RNG.random(400) * 0.5 + truth * 0.3, 1)  # few distinct values: many ties
    probs = np.stack([1 - scores, scores], axis=1)
    assert score(probs, truth, 2, ("roc_auc",))["roc_auc"] == pytest.approx(roc_auc_score(truth, scores), abs=1e-9)
