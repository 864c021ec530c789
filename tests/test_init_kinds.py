"""`pipeline init` on downloads of every kind of issue 22: the exact fields it writes, and that they load.

Each test writes a small download shaped like a real Kaggle one (tiny images, tens of rows) and
checks the spec init writes: no field left to set (unless the test says which, and why), every
value as a competition of that kind needs it, the file loads as a Competition, and init's dry read
of the download with it (pipeline/download/layout.py, as reorg reads it) succeeds.
"""
from __future__ import annotations

import random
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.download import guess_kinds as kinds
from pipeline.download.spec_guess import init_spec
from pipeline.download.specfile import spec_from_table


def image(path: Path, shade: int = 90) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), shade, dtype=np.uint8)).save(path)


def csv(path: Path, frame: dict | pd.DataFrame) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(frame).to_csv(path, index=False)


def images(folder: Path, ids, ext: str = ".jpg") -> None:
    for i in ids:
        image(folder / f"{i}{ext}")


def init(raw: Path, tmp_path: Path, todo: tuple[str, ...] = (), loads: bool = True):
    """init on ``raw``: (the written table, the Guess, the check line); only ``todo`` is left, and the spec
    loads and reads the download (unless ``loads`` is False: a missing labels file is no valid Competition)."""
    out = tmp_path / "spec.toml"
    result = init_spec(raw, out, slug="toy")
    text = out.read_text()
    assert sorted(result.guess.undecided) == sorted(todo), result.guess.undecided
    assert ("# TODO check:" in text) == bool(todo)
    table = tomllib.loads(text)
    if loads:  # a valid Competition, which reads the download as reorg would
        spec_from_table(table, str(out))
        assert result.check.startswith("the spec reads the download"), result.check
    return table, result.guess, result.check


def unset(table: dict, *names: str) -> None:
    for name in names:
        assert name not in table, (name, table.get(name))


# ---------------------------------------------------------------- 1. the label in the file name


def write_pets(raw: Path) -> list[str]:
    """Oxford-pets-like: train/<Breed>_<n>.jpg, no labels CSV, test/<n>.jpg, sample id,label."""
    names = [f"{breed}_{n}" for breed in ("Abyssinian", "great_pyrenees", "Bengal") for n in (1, 2, 3, 12, 40)]
    images(raw / "train", names)
    images(raw / "test", range(1, 7))
    csv(raw / "sample_submission.csv", {"id": range(1, 7), "label": "Bengal"})
    return names


def test_label_in_file_name_pets(tmp_path):
    write_pets(tmp_path / "raw")
    table, guess, _ = init(tmp_path / "raw", tmp_path)
    assert (table["layout"], table["label_pattern"]) == ("names", r"(?P<label>.+)_\d+")
    assert (table["train_dir"], table["test_dir"], table["image_ext"]) == ("train", "test", ".jpg")
    assert (table["submission"], table["metric"], table["submission_label_column"]) == ("label", "accuracy", "label")
    unset(table, "labels_file", "label_column", "test_file", "task")
    assert "15 training names seen match it, giving 3 labels" in guess.why["label_pattern"]


def test_label_in_file_name_cats_and_dogs_with_a_probability(tmp_path):
    """dogs-vs-cats: train/cat.<n>.jpg; the sample's 'label' is a probability: which label it is stays asked."""
    raw = tmp_path / "raw"
    images(raw / "train", [f"{animal}.{n}" for animal in ("cat", "dog") for n in range(8)])
    images(raw / "test", range(1, 5))
    csv(raw / "sample_submission.csv", {"id": range(1, 5), "label": 0.5})
    table, guess, _ = init(raw, tmp_path, todo=("positive_label",))
    assert (table["layout"], table["label_pattern"]) == ("names", r"(?P<label>.+)\.\d+")
    assert (table["submission"], table["metric"], table["positive_label"]) == ("binary", "roc_auc", "dog")
    assert "['cat', 'dog']" in guess.undecided["positive_label"]


def test_label_pattern_proposals():
    mixed = ["cat.1", "cat.2", "great_pyrenees_3", "great_pyrenees_10"]
    assert kinds.propose_pattern(mixed)[0] == r"(?P<label>.+)[._]\d+"
    assert kinds.propose_pattern(mixed)[1] == ["cat", "cat", "great_pyrenees", "great_pyrenees"]
    assert kinds.propose_pattern(["001_cat", "002_cat", "003_dog", "004_dog"])[0] == r"\d+_(?P<label>.+)"
    # one label only, or one per image (the pattern captures ids): no pattern
    assert kinds.propose_pattern(["img_001", "img_002", "img_003"]) is None
    assert kinds.propose_pattern(["a1b", "c2d", "e3f", "g4h"]) is None
    # a name the pattern misses rules it out: every name must match
    assert kinds.name_labels(r"(?P<label>.+)_\d+", ["cat_1", "dog"]) is None


def test_no_label_pattern_leaves_the_labels_file_to_set(tmp_path):
    raw = tmp_path / "raw"
    images(raw / "train", [f"{i:03d}" for i in range(6)])
    images(raw / "test", ["a", "b"])
    csv(raw / "sample_submission.csv", {"id": ["a", "b"], "label": "x"})
    table, _, _ = init(raw, tmp_path, todo=("labels_file", "label_column"), loads=False)
    assert table["layout"] == "csv" and "label_pattern" not in table


# ---------------------------------------------------------------- 2-3. one-hot and multi-hot columns


def write_plant_pathology(raw: Path, multi: bool = False) -> list[str]:
    """images/Train_<n>.jpg and Test_<n>.jpg; train.csv image_id + 0/1 columns (not in the sample's order)."""
    classes = ["healthy", "multiple_diseases", "rust", "scab"]
    train, test = [f"Train_{i}" for i in range(20)], [f"Test_{i}" for i in range(5)]
    images(raw / "images", train + test)
    hot = np.zeros((20, 4), dtype=int)
    hot[np.arange(20), np.arange(20) % 4] = 1
    if multi:
        hot[0] = 0
        hot[1, [2, 3]] = 1
    frame = pd.DataFrame(hot, columns=classes).assign(image_id=train)
    csv(raw / "train.csv", frame[["image_id", "healthy", "rust", "scab", "multiple_diseases"]])
    csv(raw / "test.csv", {"image_id": test})
    csv(raw / "sample_submission.csv", pd.DataFrame({"image_id": test, **{c: 0.25 for c in classes}}))
    return classes


def test_one_hot_columns(tmp_path):
    classes = write_plant_pathology(tmp_path / "raw")
    table, guess, _ = init(tmp_path / "raw", tmp_path)
    assert table["label_columns"] == classes  # the sample's order, by name
    assert (table["task"], table["submission"], table["metric"]) == ("single", "probs", "log_loss")
    assert (table["labels_file"], table["test_file"]) == ("train.csv", "test.csv")
    assert (table["train_dir"], table["test_dir"]) == ("images", "images")
    unset(table, "label_column", "label_separator", "metadata", "group_column")
    assert "exactly one 1" in guess.why["task"]


def test_multi_hot_columns(tmp_path):
    classes = write_plant_pathology(tmp_path / "raw", multi=True)
    table, guess, _ = init(tmp_path / "raw", tmp_path)
    assert table["label_columns"] == classes
    assert (table["task"], table["submission"], table["metric"]) == ("multilabel", "probs", "mean_auc")
    assert guess.why["task"].startswith("2 of 20 rows have none or several 1s")
    unset(table, "label_column")


# ---------------------------------------------------------------- 4. a tags column


PLANET_TAGS = ["clear primary", "clear primary water", "haze primary", "clear primary agriculture road",
               "cloudy", "partly_cloudy primary", "clear primary road", "haze primary water", "clear agriculture"]


def write_planet(raw: Path, rows: int = 27) -> None:
    """train-jpg/, test-jpg/, train_v2.csv image_name,tags; the sample has one column of tags."""
    train, test = [f"train_{i}" for i in range(rows)], [f"test_{i}" for i in range(4)]
    images(raw / "train-jpg", train)
    images(raw / "test-jpg", test)
    csv(raw / "train_v2.csv", {"image_name": train, "tags": [PLANET_TAGS[i % len(PLANET_TAGS)] for i in range(rows)]})
    csv(raw / "sample_submission_v2.csv", {"image_name": test, "tags": "primary clear agriculture road water"})


def test_tags_column(tmp_path):
    write_planet(tmp_path / "raw")
    table, guess, _ = init(tmp_path / "raw", tmp_path)
    assert (table["task"], table["label_column"], table["label_separator"]) == ("multilabel", "tags", " ")
    assert (table["submission"], table["submission_label_column"]) == ("tags", "tags")
    assert (table["metric"], table["beta"]) == ("f_beta_samples", 1.0)
    assert "Evaluation page for the beta" in guess.why["beta"] and "beta" not in guess.undecided
    assert (table["labels_file"], table["train_dir"], table["test_dir"]) == ("train_v2.csv", "train-jpg", "test-jpg")
    assert "tags, not one class per combination" in guess.why["task"]
    unset(table, "label_columns", "test_file")


def test_tag_separators_and_class_names_with_spaces():
    findings = pd.Series(["No Finding", "Mass|Nodule", "Mass", "Effusion|Mass", "No Finding", "Nodule|Effusion",
                          "Effusion"])
    assert kinds._tag_column(pd.DataFrame({"Finding Labels": findings}), "")[:2] == ("Finding Labels", "|")
    breeds = pd.Series(["golden retriever", "german shepherd", "english pointer", "german pointer", "pug"] * 3)
    assert kinds._tag_column(pd.DataFrame({"label": breeds}), "label") is None  # one class per value
    # space-separated numbers are a mask or a box, unless the column's name says labels
    rle = pd.Series(["1 3", "3 5", "1 5", "1", "3", "1 3 5"])
    assert kinds._tag_column(pd.DataFrame({"EncodedPixels": rle}), "EncodedPixels") is None
    assert kinds._tag_column(pd.DataFrame({"attribute_ids": rle}), "attribute_ids")[:2] == ("attribute_ids", " ")


def test_tags_of_numbers_under_a_target_name(tmp_path):
    """Human-Protein-Atlas-like: 'Target' holds label numbers ("16 0"); the sample's column is 'Predicted'."""
    raw = tmp_path / "raw"
    train, test = [f"p{i}" for i in range(20)], ["q0", "q1"]
    images(raw / "train", train, ".png")
    images(raw / "test", test, ".png")
    combos = ["0", "16 0", "25", "0 25", "2", "16 2", "25 2 0"]
    csv(raw / "train.csv", {"Id": train, "Target": [combos[i % len(combos)] for i in range(20)]})
    csv(raw / "sample_submission.csv", {"Id": test, "Predicted": "0 1"})
    table, _, _ = init(raw, tmp_path)
    assert (table["task"], table["label_column"], table["label_separator"]) == ("multilabel", "Target", " ")
    assert (table["submission"], table["submission_label_column"]) == ("tags", "Predicted")


def test_tags_submitted_as_one_probability_column_per_label(tmp_path):
    raw = tmp_path / "raw"
    write_planet(raw)
    tokens = sorted({t for tags in PLANET_TAGS for t in tags.split()})
    csv(raw / "sample_submission_v2.csv", pd.DataFrame({"image_name": [f"test_{i}" for i in range(4)],
                                                        **{t: 0.5 for t in tokens}}))
    table, _, _ = init(raw, tmp_path)
    assert (table["task"], table["label_column"], table["label_separator"]) == ("multilabel", "tags", " ")
    assert (table["submission"], table["metric"]) == ("probs", "mean_auc")
    unset(table, "beta")


# ---------------------------------------------------------------- 5-6. numbers and grades


def write_numeric(raw: Path, column: str, values: list, sample_value, id_column: str = "id") -> None:
    train, test = [f"a{i}" for i in range(len(values))], [f"b{i}" for i in range(4)]
    images(raw / "train", train, ".png")
    images(raw / "test", test, ".png")
    csv(raw / "train.csv", {id_column: train, column: values})
    csv(raw / "sample_submission.csv", {id_column: test, column: sample_value})


def test_regression_on_non_integers(tmp_path):
    write_numeric(tmp_path / "raw", "target", [round(0.37 * i, 2) for i in range(30)], 0.0)
    table, guess, _ = init(tmp_path / "raw", tmp_path)
    assert (table["task"], table["label_column"], table["submission"], table["metric"]) == \
        ("regression", "target", "value", "rmse")
    assert table["submission_label_column"] == "target" and "non-integer" in guess.why["task"]


def test_regression_on_an_integer_column_with_dozens_of_values(tmp_path):
    write_numeric(tmp_path / "raw", "age", [20 + (7 * i) % 60 for i in range(40)], 50)
    table, guess, _ = init(tmp_path / "raw", tmp_path)
    assert (table["task"], table["label_column"], table["submission"]) == ("regression", "age", "value")
    assert "distinct integers" in guess.why["task"]


def test_integer_class_ids_with_dozens_of_values_stay_classes(tmp_path):
    write_numeric(tmp_path / "raw", "category_id", [i % 30 for i in range(60)], 0)
    table, _, _ = init(tmp_path / "raw", tmp_path)
    assert table.get("task", "single") == "single" and table["label_column"] == "category_id"
    assert table["submission"] == "label"


def test_ordinal_grades(tmp_path):
    write_numeric(tmp_path / "raw", "diagnosis", [i % 5 for i in range(25)], 0, id_column="id_code")
    table, guess, _ = init(tmp_path / "raw", tmp_path)
    assert (table["task"], table["label_column"], table["submission"], table["metric"]) == \
        ("ordinal", "diagnosis", "grade", "qwk")
    assert table["submission_label_column"] == "diagnosis" and "0..4" in guess.why["task"]


def test_digit_labels_stay_single_label(tmp_path):
    """digit-recognizer-like: 'label' 0..9 and an integer sample; its name says no grade: ten classes."""
    write_numeric(tmp_path / "raw", "label", [i % 10 for i in range(30)], 0)
    table, guess, check = init(tmp_path / "raw", tmp_path)
    assert table.get("task", "single") == "single"
    assert (table["label_column"], table["submission"], table["metric"]) == ("label", "label", "accuracy")
    assert "10 classes" in guess.why["submission"]
    assert "the spec reads the download: 30 training images, 4 test images, 10 classes" in check


# ---------------------------------------------------------------- 7-8. patients and metadata


def write_melanoma(raw: Path) -> None:
    """SIIM-ISIC-like: train.csv with patients, sex, age, site, diagnosis, free text; test.csv without targets."""
    rng = random.Random(0)
    train, test = [f"ISIC_{i:04d}" for i in range(40)], [f"ISIC_9{i:03d}" for i in range(6)]
    images(raw / "train", train)
    images(raw / "test", test)
    sites = ["torso", "head/neck", "upper extremity", "lower extremity", ""]

    def columns(ids, patients):
        return {"image_name": ids, "patient_id": [f"IP_{p}" for p in patients],
                "sex": [rng.choice(["male", "female", ""]) for _ in ids],
                "age_approx": [rng.choice(["35.0", "50.0", "65.0", ""]) for _ in ids],
                "anatom_site_general_challenge": [rng.choice(sites) for _ in ids],
                "note": [f"seen by dr {rng.randrange(10 ** 6)}" for _ in ids]}
    frame = pd.DataFrame(columns(train, [i // 4 for i in range(40)]))
    frame["diagnosis"] = ["nevus", "melanoma", "unknown", "nevus"] * 10
    frame["benign_malignant"] = ["benign", "malignant", "benign", "benign"] * 10
    frame["target"] = [0, 1, 0, 0] * 10
    csv(raw / "train.csv", frame)
    csv(raw / "test.csv", columns(test, [100 + i // 2 for i in range(6)]))
    csv(raw / "sample_submission.csv", {"image_name": test, "target": 0.5})


def test_binary_with_a_patient_column_and_metadata(tmp_path):
    write_melanoma(tmp_path / "raw")
    table, guess, check = init(tmp_path / "raw", tmp_path)
    assert (table["submission"], table["metric"], table["label_column"]) == ("binary", "roc_auc", "target")
    assert table["group_column"] == "patient_id" and "patient" in guess.why["group_column"]
    # in both CSVs and not the id, target, group or free text; never diagnosis (train only: it gives the answer)
    assert table["metadata"] == ["sex", "age_approx", "anatom_site_general_challenge"]
    assert table["test_file"] == "test.csv" and "note" in guess.why["metadata"]
    unset(table, "task", "positive_label")
    assert "the spec reads the download: 40 training images, 6 test images, 2 classes" in check


def write_petfinder(raw: Path) -> list[str]:
    """PetFinder-Pawpularity-like: 12 0/1 flags beside a 1..100 score, the flags in test.csv too."""
    flags = ["Subject Focus", "Eyes", "Face", "Near", "Action", "Accessory", "Group", "Collage", "Human",
             "Occlusion", "Info", "Blur"]
    rng = np.random.default_rng(0)
    train, test = [f"{i:032x}" for i in range(40)], [f"{10 ** 6 + i:032x}" for i in range(5)]
    images(raw / "train", train)
    images(raw / "test", test)
    frame = pd.DataFrame(rng.integers(0, 2, (40, 12)), columns=flags)
    csv(raw / "train.csv", pd.concat([pd.DataFrame({"Id": train}), frame], axis=1).assign(
        Pawpularity=rng.integers(1, 101, 40)))
    csv(raw / "test.csv", pd.concat([pd.DataFrame({"Id": test}),
                                     pd.DataFrame(rng.integers(0, 2, (5, 12)), columns=flags)], axis=1))
    csv(raw / "sample_submission.csv", {"Id": test, "Pawpularity": 50.0})
    return flags


def test_regression_with_metadata(tmp_path):
    flags = write_petfinder(tmp_path / "raw")
    table, _, _ = init(tmp_path / "raw", tmp_path)
    assert (table["task"], table["label_column"], table["submission"], table["metric"]) == \
        ("regression", "Pawpularity", "value", "rmse")
    assert table["metadata"] == flags and table["test_file"] == "test.csv"
    unset(table, "group_column")  # the 0/1 flag "Group" groups nothing


def test_group_and_metadata_rules():
    """A group repeats and has many values; a column missing from the test CSV is never metadata."""
    from pipeline.download.spec_guess import Guess

    rows = range(30)
    labels = pd.DataFrame({"id": [f"i{k}" for k in rows], "StudyInstanceUID": [f"s{k // 3}" for k in rows],
                           "scanner_id": [f"m{k % 2}" for k in rows], "width": [str(0.5 + 1.3 * k) for k in rows],
                           "counter": [str(k) for k in rows], "label": ["a", "b", "c"] * 10})
    g = Guess()
    kinds.group_column(g, labels, {"id", "label"})
    assert g.fields["group_column"] == "StudyInstanceUID"
    kinds.metadata(g, labels, labels.drop(columns=["scanner_id"]), {"id", "label", "StudyInstanceUID"})
    assert g.fields["metadata"] == ["width"]  # the counter (one integer per row) is an id


# ---------------------------------------------------------------- 9. image folders nested under one folder


def test_images_train_and_images_test_beside_a_labels_csv(tmp_path):
    """images/train and images/test beside train.csv: the CSV's folders, never two classes 'train' and 'test'."""
    raw = tmp_path / "raw"
    train, test = [f"x{i}" for i in range(12)], [f"y{i}" for i in range(4)]
    images(raw / "images" / "train", train)
    images(raw / "images" / "test", test)
    csv(raw / "train.csv", {"id": train, "label": ["cat", "dog", "frog"] * 4})
    csv(raw / "sample_submission.csv", {"id": test, "label": "cat"})
    table, guess, check = init(raw, tmp_path)
    assert (table["layout"], table["train_dir"], table["test_dir"]) == ("csv", "images/train", "images/test")
    assert "12 training images, 4 test images, 3 classes" in check
    assert guess.why["train_dir"] == "the folder of training images"  # by its name, and the ids agree
    unset(table, "test_file")


def test_folders_holding_the_ids_are_never_classes(tmp_path):
    """images/part1 and images/part2: no name says train or test, the CSVs' ids do (once two classes)."""
    raw = tmp_path / "raw"
    train, test = [f"x{i}" for i in range(12)], [f"y{i}" for i in range(4)]
    images(raw / "images" / "part1", train)
    images(raw / "images" / "part2", test)
    csv(raw / "train.csv", {"id": train, "label": ["cat", "dog", "frog"] * 4})
    csv(raw / "sample_submission.csv", {"id": test, "label": "cat"})
    table, guess, check = init(raw, tmp_path)
    assert (table["layout"], table["train_dir"], table["test_dir"]) == ("csv", "images/part1", "images/part2")
    assert guess.why["train_dir"].endswith("it holds the images of the first 12 ids of train.csv")
    assert guess.why["test_dir"].endswith("it holds the images of the first 4 ids")
    assert "12 training images, 4 test images, 3 classes" in check


def test_nested_split_folders_without_a_labels_csv_are_not_classes(tmp_path):
    raw = tmp_path / "raw"
    images(raw / "images" / "train", ["a", "b"])
    images(raw / "images" / "test", ["c"])
    csv(raw / "sample_submission.csv", {"id": ["c"], "label": "x"})
    table, _, _ = init(raw, tmp_path, todo=("labels_file", "label_column"), loads=False)
    assert (table["layout"], table["train_dir"], table["test_dir"]) == ("csv", "images/train", "images/test")


# ---------------------------------------------------------------- 10. rare classes and labels


def test_rare_classes_and_labels_are_noted(tmp_path):
    raw = tmp_path / "raw"
    labels = ["cat"] * 30 + ["dog"] * 29 + ["frog"]  # frog: 1 of 60 rows, 1.7%
    write_numeric(raw, "label", labels, "cat")
    _, guess, _ = init(raw, tmp_path)
    assert any(n.startswith("rare classes: 1 under 2% of the 60 rows: 'frog' (1, 1.7%)") for n in guess.notes)

    planet = tmp_path / "planet"
    write_planet(planet, rows=60)
    frame = pd.read_csv(planet / "train_v2.csv")
    frame.loc[0, "tags"] = "clear primary blooming"
    frame.to_csv(planet / "train_v2.csv", index=False)
    (tmp_path / "p").mkdir()
    _, guess, _ = init(planet, tmp_path / "p")
    rare = next(n for n in guess.notes if n.startswith("rare labels"))
    assert "'blooming' (1, 1.7%)" in rare and "'primary'" not in rare
    assert rare.endswith("`pipeline train --balance loss` weighs them in the loss")  # F-beta scores no probability

    binary = tmp_path / "binary"
    write_numeric(binary, "target", [0] * 59 + [1], 0.5)
    (tmp_path / "b").mkdir()
    _, guess, _ = init(binary, tmp_path / "b")
    rare = next(n for n in guess.notes if n.startswith("rare classes"))
    assert "'1' (1, 1.7%)" in rare and rare.endswith("skews the probabilities that roc_auc scores: off by default")


def test_rare_label_of_a_file_name_is_noted(tmp_path):
    raw = tmp_path / "raw"
    images(raw / "train", [f"cat.{n}" for n in range(40)] + [f"dog.{n}" for n in range(19)] + ["bird.1"])
    images(raw / "test", range(3))
    csv(raw / "sample_submission.csv", {"id": range(3), "label": "cat"})
    _, guess, _ = init(raw, tmp_path)
    assert any(n.startswith("rare classes: 1 under 2% of the 60 rows: 'bird' (1, 1.7%)") for n in guess.notes)


def test_even_classes_are_not_noted(tmp_path):
    write_numeric(tmp_path / "raw", "label", ["cat", "dog", "frog"] * 10, "cat")
    _, guess, _ = init(tmp_path / "raw", tmp_path)
    assert not any("rare" in n for n in guess.notes)


@pytest.mark.parametrize("name, words", [("PatientID", ["patient", "id"]), ("anatom_site_general_challenge",
                                                                          ["anatom", "site", "general", "challenge"]),
                                        ("StudyInstanceUID", ["study", "instance", "uid"])])
def test_column_name_words(name, words):
    assert kinds.words(name) == words
