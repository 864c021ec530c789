"""reorg on each download layout a spec can describe, written synthetically in tmp_path.

Every test goes through ``reorg()`` and reads the result back with
pipeline.data.items, as train and predict do, so ids must survive the round trip.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from pipeline.competition import Competition, Recipe
from pipeline.data.items import list_split, load_reorg, read_folds
from pipeline.errors import PipelineError
from pipeline.download.reorg import reorg
from tests.conftest import tree_hash

CLASSES = ("cat", "dog", "frog")


def make_competition(slug: str = "toy", **fields) -> Competition:
    """A toy spec: conftest's defaults, any of which ``fields`` may replace (not registered)."""
    base = dict(slug=slug, title="toy", labels_file="labels.csv", id_column="id", label_column="label",
                sample_submission="sample.csv", submission="label", metric="accuracy", image_size=16,
                mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), recipe=Recipe(model="fastnet_s"))
    return Competition(**(base | fields))


def png(shade: int, size: int = 4) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (shade, shade, shade)).save(buf, format="PNG")
    return buf.getvalue()


def put(path: Path, data: bytes | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png(len(path.name)) if data is None else data)


def csv(path: Path, **columns) -> None:
    pd.DataFrame(columns).to_csv(path, index=False)


def labelled(n: int = 18, prefix: str = "img") -> dict[str, str]:
    return {f"{prefix}{i:02d}": CLASSES[i % 3] for i in range(n)}


def sample(raw: Path, test_ids: list[str], id_column: str = "id", first: str | None = None) -> None:
    """A label-kind sample submission; ``first`` puts another column before the id."""
    columns = {id_column: test_ids, "label": CLASSES[0]}
    if first:
        columns = {first: "x", **columns}
    csv(raw / "sample.csv", **columns)


def tree(work: Path) -> dict[str, dict[str, str]]:
    """split -> {id: class} as pipeline.data.items reads the tree back."""
    info = load_reorg(work)
    names = [None, *info["classes"]]
    return {split: {it.id: names[it.target + 1] for it in list_split(work, info, split)}
            for split in ("train", "valid", "train_valid", "test")}


def run(comp, raw: Path, work: Path, **kw) -> tuple[dict, dict]:
    before = tree_hash(raw)
    result = reorg(comp, raw, work, **kw)
    assert tree_hash(raw) == before  # the download is never modified
    return result.info, tree(work)


def check_labels(got: dict, labels: dict[str, str], test_ids: list[str]) -> None:
    assert got["train_valid"] == labels
    assert {**got["train"], **got["valid"]} == labels and not set(got["train"]) & set(got["valid"])
    assert sorted(got["test"]) == sorted(test_ids)


# ---------------------------------------------------------------- a) labels CSV + train/ + test/


def test_a_labels_csv_with_train_and_test_folders(tmp_path):
    comp = make_competition("toy")
    raw, labels, test_ids = tmp_path / "raw", labelled(), ["t1", "t2", "t3"]
    for image_id in labels:
        put(raw / "train" / f"{image_id}.png")
    for image_id in test_ids:
        put(raw / "test" / f"{image_id}.png")
    csv(raw / "labels.csv", id=list(labels), label=list(labels.values()))
    sample(raw, test_ids)
    info, got = run(comp, raw, tmp_path / "work", valid_ratio=0.2, folds=3)
    check_labels(got, labels, test_ids)
    assert info["layout"] == "csv" and info["valid_source"] == "random"
    assert info["counts"] == {"train": 14, "valid": 4, "train_valid": 18, "test": 3}
    assert sorted(read_folds(tmp_path / "work").index) == sorted(labels)


# ---------------------------------------------------------------- b) one folder, train.csv + test.csv


def write_one_folder(raw: Path, labels: dict[str, str], test_ids: list[str], unlisted: int = 0) -> None:
    for image_id in [*labels, *test_ids, *(f"zz{i}" for i in range(unlisted))]:
        put(raw / "images" / f"{image_id}.jpg")
    n = len(labels)
    csv(raw / "train.csv", width=[4] * n, image_id=list(labels), source=["web"] * n, breed=list(labels.values()))
    csv(raw / "test.csv", source=["web"] * len(test_ids), image_id=test_ids)


def test_b_one_image_folder_listed_by_train_and_test_csv(tmp_path, caplog):
    comp = make_competition("toy", labels_file="train.csv", id_column="image_id", label_column="breed",
                            train_dir="images", test_dir="images", test_file="test.csv", image_ext=".jpg")
    raw, labels = tmp_path / "raw", labelled(prefix="Train_")
    test_ids = ["Test_0", "Test_1", "Test_2", "Test_3"]
    write_one_folder(raw, labels, test_ids, unlisted=2)
    sample(raw, test_ids[::-1], id_column="image_id", first="extra")  # id column found by name, any order
    info, got = run(comp, raw, tmp_path / "work", folds=0)
    check_labels(got, labels, test_ids)
    assert info["counts"]["test"] == 4 and info["image_ext"] == ".jpg"
    assert "2 images in images are in neither train.csv nor test.csv" in caplog.text


def test_b_test_csv_must_match_the_sample(tmp_path):
    comp = make_competition("toy", labels_file="train.csv", id_column="image_id", label_column="breed",
                            train_dir="images", test_dir="images", test_file="test.csv", image_ext=".jpg")
    raw = tmp_path / "raw"
    write_one_folder(raw, labelled(), ["Test_0", "Test_1"])
    sample(raw, ["Test_0"], id_column="image_id")
    with pytest.raises(PipelineError, match=r"sample.csv disagrees with .*test.csv: test image 'Test_1.jpg'"):
        reorg(comp, raw, tmp_path / "work")


def test_b_test_id_without_image_names_the_file(tmp_path):
    comp = make_competition("toy", labels_file="train.csv", id_column="image_id", label_column="breed",
                            train_dir="images", test_dir="images", test_file="test.csv", image_ext=".jpg")
    raw = tmp_path / "raw"
    write_one_folder(raw, labelled(), ["Test_0"])
    csv(raw / "test.csv", image_id=["Test_0", "Test_9"])
    sample(raw, ["Test_0", "Test_9"], id_column="image_id")
    with pytest.raises(PipelineError, match=r"test.csv: id 'Test_9' has no image images/Test_9.jpg \(1 such"):
        reorg(comp, raw, tmp_path / "work")


# ---------------------------------------------------------------- c) class folders


def write_folders(raw: Path, train: dict[str, str], valid: dict[str, str], test_ids: list[str]) -> None:
    for split, ids in (("train", train), ("val", valid)):
        for image_id, label in ids.items():
            put(raw / split / label / f"{image_id}.png")
    for image_id in test_ids:
        put(raw / "test" / f"{image_id}.png")
    put(raw / "train" / ".DS_Store", b"junk")  # hidden files are not images
    sample(raw, test_ids)


def folders_comp(**kw):
    return make_competition("toy", labels_file="", label_column="", layout="folders", **kw)


def test_c_class_folders_with_a_random_split(tmp_path):
    raw, train, test_ids = tmp_path / "raw", labelled(), ["u1", "u2"]
    write_folders(raw, train, {}, test_ids)
    info, got = run(folders_comp(), raw, tmp_path / "work", valid_ratio=0.2, folds=3)
    check_labels(got, train, test_ids)
    assert info["layout"] == "folders" and info["valid_source"] == "random" and info["classes"] == list(CLASSES)
    assert info["counts"]["valid"] == 4


def test_c_class_folders_with_a_given_valid_split(tmp_path):
    raw, train, valid = tmp_path / "raw", labelled(12), labelled(6, prefix="v")
    write_folders(raw, train, valid, ["u1"])
    info, got = run(folders_comp(valid_dir="val"), raw, tmp_path / "work", valid_ratio=0.5, folds=3)
    assert got["train"] == train and got["valid"] == valid  # the download's split, not a random one
    assert got["train_valid"] == {**train, **valid}
    assert info["valid_source"] == "valid_dir" and info["counts"]["valid"] == 6
    assert sorted(read_folds(tmp_path / "work").index) == sorted({**train, **valid})


@pytest.mark.parametrize("breakage, message", [
    (lambda raw: put(raw / "train" / "loose.png"), r"train/loose.png is not in a class folder"),
    (lambda raw: put(raw / "train" / "dog" / "img00.png"), r"share the id 'img00'"),
    (lambda raw: put(raw / "val" / "cat" / "img03.png"), r"id 'img03' is in both .*train and .*val"),
], ids=["image-outside-a-class", "same-id-in-two-classes", "same-id-in-train-and-valid"])
def test_c_class_folder_mistakes_are_named(tmp_path, breakage, message):
    raw = tmp_path / "raw"
    write_folders(raw, labelled(), labelled(3, prefix="v"), ["u1"])
    breakage(raw)
    with pytest.raises(PipelineError, match=message):
        reorg(folders_comp(valid_dir="val"), raw, tmp_path / "work")


# ---------------------------------------------------------------- d) a column of paths


def test_d_path_column_relative_to_the_download(tmp_path):
    comp = make_competition("toy", labels_file="train.csv", id_column="uid", label_column="label",
                            path_column="file", train_dir=".", test_dir=".", test_file="test.csv")
    raw, labels = tmp_path / "raw", labelled()
    paths = {i: f"images/{'a' if n % 2 else 'b'}/{i}.PNG" for n, i in enumerate(labels)}
    for rel in paths.values():
        put(raw / rel)
    put(raw / "images" / "t" / "q1.png")
    csv(raw / "train.csv", uid=list(labels), file=list(paths.values()), label=list(labels.values()))
    csv(raw / "test.csv", uid=["q1"], file=["./images/t/q1.png"])
    sample(raw, ["q1"], id_column="uid")
    info, got = run(comp, raw, tmp_path / "work", folds=0)
    check_labels(got, labels, ["q1"])
    cls = info["class_dirs"][info["classes"].index(labels["img00"])]
    assert (tmp_path / "work" / "train_valid" / cls / "img00.PNG").is_file()  # the source's own spelling


def test_d_id_column_holding_file_names_with_their_extension(tmp_path):
    comp = make_competition("toy", id_column="file", path_column="file", test_file="sample.csv")
    raw = tmp_path / "raw"
    labels = {f"f{i:03d}.png": CLASSES[i % 3] for i in range(18)}
    for name in labels:
        put(raw / "train" / name)
    for name in ("x1.png", "x2.png"):
        put(raw / "test" / name)
    csv(raw / "labels.csv", file=list(labels), label=list(labels.values()))
    sample(raw, ["x1.png", "x2.png"], id_column="file")
    info, got = run(comp, raw, tmp_path / "work", folds=0)
    check_labels(got, labels, ["x1.png", "x2.png"])  # ids keep their extension, as the submission needs


@pytest.mark.parametrize("bad", ["../outside.png", "/etc/passwd", "", "images/../../x.png"])
def test_d_paths_that_leave_the_folder_are_refused(tmp_path, bad):
    comp = make_competition("toy", path_column="file")
    raw = tmp_path / "raw"
    put(raw / "train" / "a.png")
    put(raw / "test" / "t.png")
    csv(raw / "labels.csv", id=["a", "b"], file=["a.png", bad], label=["cat", "dog"])
    sample(raw, ["t"])
    with pytest.raises(PipelineError, match=r"labels.csv row 3: path .* is empty or leaves its folder"):
        reorg(comp, raw, tmp_path / "work")


# ---------------------------------------------------------------- f) numeric ids


def test_f_numeric_ids_match_file_names_exactly(tmp_path):
    comp = make_competition("toy")
    raw = tmp_path / "raw"
    labels = {"007": "cat", "7": "dog", "0": "frog", "00": "cat", "1e3": "dog", "12": "frog"}
    labels |= {str(100 + i): CLASSES[i % 3] for i in range(9)}
    for image_id in labels:
        put(raw / "train" / f"{image_id}.png")
    for image_id in ("001", "1"):
        put(raw / "test" / f"{image_id}.png")
    csv(raw / "labels.csv", id=list(labels), label=list(labels.values()))
    sample(raw, ["001", "1"])
    info, got = run(comp, raw, tmp_path / "work", folds=3)
    check_labels(got, labels, ["001", "1"])
    folds = pd.read_csv(tmp_path / "work" / "folds.csv", dtype=str, keep_default_na=False)
    assert sorted(folds["id"]) == sorted(labels)


def test_f_a_padded_file_does_not_match_an_unpadded_id(tmp_path):
    comp = make_competition("toy")
    raw = tmp_path / "raw"
    put(raw / "train" / "007.png")
    put(raw / "train" / "8.png")
    put(raw / "test" / "t.png")
    csv(raw / "labels.csv", id=["7", "8"], label=["cat", "dog"])
    sample(raw, ["t"])
    with pytest.raises(PipelineError, match=r"id '7' has no image train/7.png"):
        reorg(comp, raw, tmp_path / "work")


# ---------------------------------------------------------------- the spec


@pytest.mark.parametrize("fields, message", [
    (dict(layout="grid"), "layout must be 'csv', 'folders' or 'names'"),
    (dict(labels_file=""), "layout 'csv' needs labels_file and label_column"),
    (dict(layout="folders"), "leave labels_file, label_column and label_columns empty"),
    (dict(valid_dir="val"), "valid_dir needs layout 'folders'"),
    (dict(test_dir="train"), "train_dir and test_dir are both 'train'; set test_file"),
    (dict(train_dir="../elsewhere"), "train_dir '../elsewhere' must be a relative '/' path"),
    (dict(test_file="/abs.csv"), "test_file '/abs.csv' must be a relative"),
    (dict(id_column=""), "id_column is empty"),
], ids=["layout", "csv-without-labels", "folders-with-labels", "valid-dir-in-csv", "shared-dir-without-test-file",
        "dir-outside", "absolute-file", "no-id-column"])
def test_inconsistent_specs_are_refused_with_the_field_to_fix(fields, message):
    with pytest.raises(PipelineError, match=message):
        make_competition("toy", **fields)


def test_reorg_json_keeps_every_key_pipeline_data_reads(tmp_path):
    raw = tmp_path / "raw"
    write_folders(raw, labelled(), {}, ["u1"])
    reorg(folders_comp(), raw, tmp_path / "work", folds=0)
    info = json.loads((tmp_path / "work" / "reorg.json").read_text())
    assert {"competition", "classes", "class_dirs", "image_ext", "counts", "valid_ratio", "folds", "seed",
            "link_mode", "fingerprint", "format_version"} <= set(info)
