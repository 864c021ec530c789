"""Submission frames: built in the sample's order, checked like Kaggle would."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.errors import PipelineError
from pipeline.predict.submission import build_submission, check_submission, clean_probs, write_submission
from tests.conftest import make_competition

CLASSES = ["cat", "dog", "frog"]


@pytest.fixture
def probs_comp():
    return make_competition("sub-probs", submission="probs")


@pytest.fixture
def label_comp():
    return make_competition("sub-label", submission="label")


def sample_probs():
    return pd.DataFrame({"id": ["b", "a", "c"], **{c: 1 / 3 for c in CLASSES}})


def test_label_submission_names_the_argmax_in_sample_order(label_comp):
    sample = pd.DataFrame({"id": ["b", "a", "c"], "label": "cat"})
    probs = np.array([[0.1, 0.8, 0.1], [0.7, 0.2, 0.1], [0.0, 0.1, 0.9]])  # rows for ids a, b, c
    frame = build_submission(label_comp, ["a", "b", "c"], probs, CLASSES, sample)
    assert frame.to_dict("list") == {"id": ["b", "a", "c"], "label": ["cat", "dog", "frog"]}
    assert check_submission(label_comp, frame, sample, CLASSES) == []


def test_probability_rows_sum_to_one_and_are_floored(probs_comp):
    probs = np.array([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5], [0.0, 0.0, 1.0]])
    frame = build_submission(probs_comp, ["a", "b", "c"], probs, CLASSES, sample_probs())
    values = frame[CLASSES].to_numpy()
    assert np.abs(values.sum(1) - 1).max() < 1e-12
    assert values.min() >= 1e-6 / (1 + 2e-6)
    assert frame["id"].tolist() == ["b", "a", "c"]
    assert frame.loc[1, "cat"] == pytest.approx(1.0, abs=1e-5)  # id a
    assert check_submission(probs_comp, frame, sample_probs()) == []


def test_clean_probs_handles_nan():
    out = clean_probs(np.array([[np.nan, 1.0]]))
    assert np.isfinite(out).all() and out.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("edit, problem", [
    (lambda f: f.drop(index=0), "id 'b' of the sample submission is missing"),
    (lambda f: pd.concat([f, f.iloc[[0]].assign(id="zz")]), "id 'zz' is not in the sample submission"),
    (lambda f: f.rename(columns={"dog": "wolf"}), "missing ['dog'], unexpected ['wolf']"),
    (lambda f: f.assign(cat=0, dog=0, frog=0), "probabilities sum to 0"),  # off 1 by more: a warning only
    (lambda f: f.assign(dog="x"), "'x' is not a number"),
    (lambda f: f.assign(cat=-0.5, dog=1.0, frog=0.5), "outside [0, 1]"),
    (lambda f: f.iloc[[1, 0, 2]], "not in the sample submission's order"),
    (lambda f: pd.concat([f, f.iloc[[0]]]), "appears more than once"),
])
def test_check_names_each_problem(probs_comp, edit, problem):
    frame = edit(sample_probs().copy())
    found = check_submission(probs_comp, frame, sample_probs())
    assert any(problem in p for p in found), found


def test_check_catches_an_unknown_class_name(label_comp):
    sample = pd.DataFrame({"id": ["a", "b"], "label": "cat"})
    frame = pd.DataFrame({"id": ["a", "b"], "label": ["cat", "unicorn"]})
    assert check_submission(label_comp, frame, sample, CLASSES) == ["row 3: 'unicorn' is not a class name (1 such rows)"]


def test_write_refuses_to_overwrite(tmp_path):
    path = tmp_path / "sub.csv"
    path.write_text("old")
    with pytest.raises(PipelineError, match="already exists; pass --force"):
        write_submission(sample_probs(), path, force=False)
    assert path.read_text() == "old"
    write_submission(sample_probs(), path, force=True)
    assert path.read_text().startswith("id,cat,dog,frog")
