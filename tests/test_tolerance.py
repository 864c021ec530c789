"""`pipeline check` is as tolerant as Kaggle: rounded probabilities pass, columns are matched by name."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from pipeline.cli.app import app
from pipeline.predict.submission import SUM_TOLERANCE, build_submission, check_submission, submission_warnings
from tests.conftest import make_competition

CLASSES = ["cat", "dog", "frog"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def probs_files(tmp_path):
    """A sample submission and a correct submission saved with six decimals (rows sum to 1 +- 1e-6)."""
    make_competition("tol-probs", submission="probs")
    ids = [f"t{i}" for i in range(30)]
    pd.DataFrame({"id": ids, **{c: 1 / 3 for c in CLASSES}}).to_csv(tmp_path / "sample.csv", index=False)
    probs = np.random.default_rng(0).dirichlet(np.ones(3), 30)
    frame = pd.DataFrame({"id": ids, **{c: probs[:, i] for i, c in enumerate(CLASSES)}})
    frame.to_csv(tmp_path / "six.csv", index=False, float_format="%.6f")
    return tmp_path, frame


def test_six_decimals_pass_silently_and_larger_offsets_warn_with_the_rule(probs_files):
    folder, frame = probs_files
    sums = pd.read_csv(folder / "six.csv")[CLASSES].sum(axis=1)
    assert (sums != 1).any() and (abs(sums - 1) < SUM_TOLERANCE).all()  # rounded, as Kaggle users save them
    ok = invoke("check", "tol-probs", folder / "six.csv", "--sample", folder / "sample.csv")
    assert ok.exit_code == 0 and "valid (30 rows" in ok.stdout and "warning" not in ok.stderr, ok.output
    frame.assign(cat=frame["cat"] + 0.01).to_csv(folder / "off.csv", index=False)  # Kaggle rescales these
    warned = invoke("check", "tol-probs", folder / "off.csv", "--sample", folder / "sample.csv", "--json")
    assert warned.exit_code == 0, warned.output
    result = json.loads(warned.stdout)
    assert result["valid"] and result["problems"] == []
    assert result["warnings"][0].startswith("row 2: probabilities sum to 1.010000 (30 such rows): rows summing to "
                                            "within 0.001 of 1 pass")
    frame.assign(cat=0.0, dog=0.0, frog=0.0).to_csv(folder / "zero.csv", index=False)
    refused = invoke("check", "tol-probs", folder / "zero.csv", "--sample", folder / "sample.csv")
    assert refused.exit_code == 1 and "sum to 0, which Kaggle cannot rescale" in refused.stderr


def test_a_sample_whose_id_column_is_not_first_works_through_build_and_check(tmp_path):
    for kind in ("label", "probs"):
        comp = make_competition(f"late-id-{kind}", submission=kind)
        ids = ["b", "a", "c"]
        sample = (pd.DataFrame({"label": "cat", "id": ids}) if kind == "label" else
                  pd.DataFrame({"cat": 1 / 3, "id": ids, "dog": 1 / 3, "frog": 1 / 3}))
        probs = np.eye(3)[[0, 1, 2]] * 0.8 + 0.2 / 3
        frame = build_submission(comp, ["a", "b", "c"], probs, CLASSES, sample)
        assert list(frame.columns) == list(sample.columns)  # the sample's order, matched by name
        assert frame["id"].tolist() == ids
        assert check_submission(comp, frame, sample, CLASSES) == [], kind
        assert submission_warnings(comp, frame) == []
        if kind == "probs":
            assert frame.set_index("id").loc["a", "cat"] == pytest.approx(0.8 + 0.2 / 3, abs=1e-5)
        else:
            assert frame.set_index("id")["label"].to_dict() == {"a": "cat", "b": "dog", "c": "frog"}
        sample.to_csv(tmp_path / f"sample-{kind}.csv", index=False)
        frame.to_csv(tmp_path / f"sub-{kind}.csv", index=False)
        done = invoke("check", comp.slug, tmp_path / f"sub-{kind}.csv", "--sample", tmp_path / f"sample-{kind}.csv")
        assert done.exit_code == 0, done.output
