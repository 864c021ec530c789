"""Competition spec files (TOML) and the binary submission kind they may choose."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from pipeline.cli.app import app
from pipeline.cli.common import load_competition
from pipeline.competition import get_competition
from pipeline.errors import PipelineError
from pipeline.download.layout import binary_classes
from pipeline.metrics import score
from pipeline.download.specfile import load_spec, render_spec, spec_fields
from pipeline.predict.submission import build_submission, check_submission, positive_index
from tests.conftest import make_competition

SPEC = """\
slug = "my-comp"
title = "Mine"
labels_file = "labels.csv"
id_column = "id"
label_column = "label"
sample_submission = "sample.csv"
submission = "label"
metric = "macro_f1"
image_size = 48
mean = [0.5, 0.5, 0.5]
std = [0.25, 0.25, 0.25]

[recipe]
model = "fastnet_s"
epochs = 3
lr = 0.2

[recipes.long]
epochs = 30
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.toml"
    path.write_text(text)
    return path


def test_a_spec_file_loads_and_registers_under_its_slug(tmp_path):
    comp = load_competition(str(write(tmp_path, SPEC)))
    assert (comp.slug, comp.metric, comp.image_size, comp.mean) == ("my-comp", "macro_f1", 48, (0.5, 0.5, 0.5))
    assert dict(comp.recipe) == {"model": "fastnet_s", "epochs": 3, "lr": 0.2}
    assert dict(comp.get_recipe("long")) == {"epochs": 30}
    assert get_competition("my-comp") is comp  # what train.py and predict look up by slug
    assert comp.spec_file.endswith("spec.toml")
    assert load_competition(str(tmp_path / "spec.toml")) == comp  # loading again is no error


@pytest.mark.parametrize("change, message", [
    (("metric = \"macro_f1\"", "metrik = \"macro_f1\""), "unknown field(s) metrik; valid fields: "),
    (("image_size = 48\n", ""), "missing field(s) image_size"),
    (("mean = [0.5, 0.5, 0.5]", "mean = [0.5, 0.5]"), "mean must be three numbers"),
    (("epochs = 30", "epoch = 30"), "[recipes.long]: recipe setting(s) epoch unknown"),
    (("title = \"Mine\"", "title = Mine"), "is not valid TOML"),
    (("metric = \"macro_f1\"", "metric = \"auc\""), "metric"),
    (("image_size = 48", "image_size = \"48\""), "image_size must be a whole number"),
])
def test_errors_name_the_file_and_the_field(tmp_path, change, message):
    path = write(tmp_path, SPEC.replace(*change))
    with pytest.raises(PipelineError) as err:
        load_spec(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_unknown_field_lists_the_valid_ones(tmp_path):
    with pytest.raises(PipelineError, match="positive_label") as err:
        load_spec(write(tmp_path, "colour = 1\n" + SPEC))
    assert "spec_file" not in str(err.value) and "make_raw" not in str(err.value)


def test_a_missing_spec_file_says_what_to_give(tmp_path):
    with pytest.raises(PipelineError, match="not found; give a registered slug"):
        load_competition(str(tmp_path / "nope.toml"))


def test_a_spec_with_a_registered_slug_takes_its_place_for_the_process(tmp_path):
    builtin = get_competition("cifar-10")
    comp = load_spec(write(tmp_path, SPEC.replace('"my-comp"', '"cifar-10"')))
    assert get_competition("cifar-10") is comp and comp != builtin


def test_render_spec_round_trips_through_load_spec(tmp_path):
    fields = {"slug": "r", "title": "r", "layout": "folders", "id_column": "id", "sample_submission": "s.csv",
              "submission": "binary", "positive_label": "cat", "metric": "roc_auc", "image_size": 32,
              "mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2], "image_ext": ".jpg"}
    text = render_spec(fields, {"slug": "why \"quoted\""}, {"metric": "check it"}, {"model": "fastnet", "tta": "flip"},
                       {"x": {"epochs": 2}}, ["header"])
    comp = load_spec(write(tmp_path, text))
    assert {name: getattr(comp, name) for name in fields} == {**fields, "mean": (0.5,) * 3, "std": (0.2,) * 3}
    assert "# TODO check: check it" in text and dict(comp.get_recipe("x")) == {"epochs": 2}
    assert set(fields) <= set(spec_fields())


def test_competitions_says_spec_files_are_accepted():
    result = CliRunner().invoke(app, ["competitions"])
    assert result.exit_code == 0 and "spec file" in result.stdout and "pipeline init" in result.stdout


# ---------------------------------------------------------------- the binary submission kind


def binary(positive_label: str = "") -> object:
    return make_competition("bin", submission="binary", positive_label=positive_label)


@pytest.mark.parametrize("labels, positive, expected", [
    (["0", "1"], "", ["0", "1"]), (["False", "True"], "", ["False", "True"]),
    (["cat", "dog"], "cat", ["dog", "cat"]), (["cat", "dog"], "dog", ["cat", "dog"]),
])
def test_binary_classes_put_the_positive_class_second(labels, positive, expected):
    assert binary_classes(binary(positive), labels, ["id", "is_x"], "s.csv") == expected


@pytest.mark.parametrize("labels, positive, columns", [
    (["cat", "dog"], "", ["id", "is_cat"]),  # no default positive among cat/dog
    (["a", "b", "c"], "a", ["id", "p"]),  # three labels
    (["cat", "dog"], "cat", ["id", "cat", "dog"]),  # two probability columns
    (["cat", "dog"], "cow", ["id", "p"]),
])
def test_binary_classes_refuse_what_they_cannot_map(labels, positive, columns):
    with pytest.raises(PipelineError, match="positive_label"):
        binary_classes(binary(positive), labels, columns, "s.csv")


def test_binary_submission_holds_the_positive_class_probability_by_name():
    comp = binary("cat")
    sample = pd.DataFrame({"id": ["b", "a"], "is_cat": 0.5})
    probs = np.array([[0.2, 0.8], [0.9, 0.1]])  # rows a, b; columns in the run's order: cat, dog
    frame = build_submission(comp, ["a", "b"], probs, ["cat", "dog"], sample)
    assert list(frame.columns) == ["id", "is_cat"] and frame["id"].tolist() == ["b", "a"]
    assert np.allclose(frame["is_cat"], [0.9, 0.2])
    assert check_submission(comp, frame, sample) == []
    bad = frame.assign(is_cat=[1.5, 0.2])
    assert check_submission(comp, bad, sample) == ["row 2, column 'is_cat': 1.5 is outside [0, 1]"]


def test_roc_auc_scores_the_positive_class():
    comp = binary("cat")
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])  # classes [dog, cat]
    targets = np.array([0, 1, 0, 1])
    assert positive_index(comp) == 1
    assert score(probs, targets, 2, ["roc_auc"], positive=positive_index(comp))["roc_auc"] == 1.0
    assert score(probs[:, ::-1], targets, 2, ["roc_auc"], positive=positive_index(comp))["roc_auc"] == 0.0
