"""`pipeline init`: specs guessed from downloads, the real ones in ../shared and synthetic layouts.

On the real downloads the written spec must reorganise exactly as the
registered competition does; on synthetic layouts (b, c, d, binary) init is
followed by the whole chain: reorg, a 1-epoch train, predict and check.
"""
from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli.app import app
from pipeline.competition import get_competition
from pipeline.data.items import list_split, load_reorg, read_folds
from pipeline.download.spec_guess import guess as guess_spec, init_spec, survey
from pipeline.download.reorg import reorg
from pipeline.download.specfile import load_spec

SHARED = next((p for p in (Path(__file__).resolve().parents[1].parent / "shared", Path("/work/shared"))
               if (p / "data").is_dir()), None)
CLASSES = ("cat", "dog", "frog")


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def image(path: Path, shade: int, size: int = 16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((size, size, 3), shade, dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="PNG" if path.suffix == ".png" else "JPEG")


def csv(path: Path, **columns) -> None:
    pd.DataFrame(columns).to_csv(path, index=False)


def labelled(n: int = 18, classes=CLASSES) -> dict[str, str]:
    return {f"img{i:02d}": classes[i % len(classes)] for i in range(n)}


def shade(label: str, classes=CLASSES) -> int:
    return 40 + 80 * classes.index(label)


# ---------------------------------------------------------------- the real downloads


def split_of(work: Path) -> dict:
    info = load_reorg(work)
    splits = {s: [(it.id, it.target) for it in list_split(work, info, s)] for s in ("train", "valid", "train_valid", "test")}
    return {"classes": info["classes"], "counts": info["counts"], "splits": splits,
            "folds": read_folds(work).sort_index().to_dict()}


@pytest.mark.skipif(SHARED is None, reason="../shared/data is absent")
@pytest.mark.parametrize("folder, slug", [("cifar-10-tiny", "cifar-10"), ("dog-breed-identification",
                                                                         "dog-breed-identification")])
def test_init_on_real_downloads_reorganises_like_the_registered_competition(tmp_path, folder, slug):
    raw = SHARED / "data" / folder
    if not raw.is_dir():
        pytest.skip(f"{raw} is absent")
    registered = get_competition(slug)
    result = init_spec(raw, tmp_path / "spec.toml", slug=f"init-{slug}")
    assert "the spec reads the download" in result.check, result.check
    spec = load_spec(tmp_path / "spec.toml")
    for name in ("layout", "labels_file", "id_column", "label_column", "submission", "metric", "image_ext",
                 "sample_submission", "train_dir", "test_dir"):
        assert getattr(spec, name) == getattr(registered, name), name
    assert spec.image_size == registered.image_size
    mine = reorg(spec, raw, tmp_path / "mine", 0.1, 3, 0, False)
    theirs = reorg(registered, raw, tmp_path / "theirs", 0.1, 3, 0, False)
    assert mine.info["counts"] == theirs.info["counts"]
    assert split_of(tmp_path / "mine") == split_of(tmp_path / "theirs")


# ---------------------------------------------------------------- synthetic layouts, init + the chain


def write_b(raw: Path) -> None:
    """b) one images/ folder; train.csv and test.csv list the ids, with extra columns."""
    labels, test_ids = labelled(), [f"t{i}" for i in range(6)]
    for i, label in labels.items():
        image(raw / "images" / f"{i}.jpg", shade(label))
    for j, i in enumerate(test_ids):
        image(raw / "images" / f"{i}.jpg", shade(CLASSES[j % 3]))
    csv(raw / "train.csv", image_id=list(labels), source="web", label=list(labels.values()))
    csv(raw / "test.csv", source="web", image_id=test_ids)
    csv(raw / "sample_submission.csv", image_id=test_ids, label="cat")


def write_c(raw: Path) -> None:
    """c) class folders train/<class>/*.png and a flat test/ folder."""
    for i, label in labelled().items():
        image(raw / "train" / label / f"{i}.png", shade(label))
    test_ids = [f"t{i}" for i in range(6)]
    for j, i in enumerate(test_ids):
        image(raw / "test" / f"{i}.png", shade(CLASSES[j % 3]))
    csv(raw / "sample_submission.csv", id=test_ids, label="cat")


def write_d(raw: Path) -> None:
    """d) the id column is the file name with its extension."""
    labels = {f"{i}.png": label for i, label in labelled().items()}
    for name, label in labels.items():
        image(raw / "train_images" / name, shade(label))
    test_ids = [f"t{i}.png" for i in range(6)]
    for j, name in enumerate(test_ids):
        image(raw / "test_images" / name, shade(CLASSES[j % 3]))
    csv(raw / "train.csv", image=list(labels), diagnosis=list(labels.values()))
    csv(raw / "sample_submission.csv", image=test_ids, diagnosis="cat")


def write_binary(raw: Path) -> None:
    """A binary competition: labels cat/dog, the sample asks for is_cat, a probability."""
    labels = labelled(classes=("cat", "dog"))
    for i, label in labels.items():
        image(raw / "train" / f"{i}.png", shade(label))
    test_ids = [f"t{i}" for i in range(6)]
    for j, i in enumerate(test_ids):
        image(raw / "test" / f"{i}.png", shade(CLASSES[j % 2]))
    csv(raw / "labels.csv", id=list(labels), label=list(labels.values()))
    csv(raw / "sample_submission.csv", id=test_ids, is_cat=0.5)


def chain(tmp_path: Path, raw: Path, init: bool = True) -> tuple[dict, pd.DataFrame, Path]:
    """init (unless done), reorg, a 1-epoch train, predict and check; (the spec's table, the submission, the run)."""
    spec, work, run, sub = tmp_path / "spec.toml", tmp_path / "work", tmp_path / "run", tmp_path / "sub.csv"
    if init:
        result = invoke("init", raw, "--out", spec)
        assert result.exit_code == 0, result.output
        assert "the spec reads the download" in result.stdout and "not decided" not in result.stdout, result.stdout
    result = invoke("reorg", spec, raw, work, "--folds", "0", "--valid-ratio", "0.34")
    assert result.exit_code == 0, result.output
    result = invoke("train", spec, work, run, "--model", "fastnet_s", "--image-size", "16", "--epochs", "1",
                    "--batch-size", "8", "--device", "cpu", "--num-workers", "0")
    assert result.exit_code == 0, result.output
    result = invoke("predict", spec, work, run, sub, "--num-workers", "0")
    assert result.exit_code == 0, result.output
    result = invoke("check", spec, sub, "--work-dir", work)
    assert result.exit_code == 0, result.output
    table = tomllib.loads(spec.read_text())
    return table, pd.read_csv(sub, dtype=str, keep_default_na=False), run


def test_b_shared_image_folder(tmp_path):
    write_b(tmp_path / "raw")
    table, sub, _ = chain(tmp_path, tmp_path / "raw")
    assert (table["train_dir"], table["test_dir"], table["test_file"]) == ("images", "images", "test.csv")
    assert (table["labels_file"], table["id_column"], table["label_column"]) == ("train.csv", "image_id", "label")
    assert list(sub.columns) == ["image_id", "label"] and sub["image_id"].tolist() == [f"t{i}" for i in range(6)]
    assert set(sub["label"]) <= set(CLASSES)


def test_c_class_folders(tmp_path):
    write_c(tmp_path / "raw")
    table, sub, _ = chain(tmp_path, tmp_path / "raw")
    assert table["layout"] == "folders" and "labels_file" not in table and table["image_ext"] == ".png"
    assert len(sub) == 6 and set(sub["label"]) <= set(CLASSES)


def test_d_path_column(tmp_path):
    write_d(tmp_path / "raw")
    table, sub, _ = chain(tmp_path, tmp_path / "raw")
    assert (table["path_column"], table["id_column"], table["label_column"]) == ("image", "image", "diagnosis")
    assert (table["train_dir"], table["test_dir"]) == ("train_images", "test_images")
    assert sub["image"].tolist() == [f"t{i}.png" for i in range(6)]


def test_binary_competition_end_to_end(tmp_path):
    write_binary(tmp_path / "raw")
    table, sub, run = chain(tmp_path, tmp_path / "raw")
    assert (table["submission"], table["metric"], table["positive_label"]) == ("binary", "roc_auc", "cat")
    assert load_reorg(tmp_path / "work")["classes"] == ["dog", "cat"]  # [other, positive]
    assert list(sub.columns) == ["id", "is_cat"]
    values = sub["is_cat"].astype(float)
    assert values.between(0, 1).all() and values.nunique() > 1
    metrics = pd.read_csv(next(run.rglob("metrics.csv")))
    assert "valid_roc_auc" in metrics.columns


# ---------------------------------------------------------------- what init decides, and refuses


def test_zero_one_target_with_a_whole_number_sample_is_a_probability_of_one(tmp_path):
    # Kaggle's two-class competitions with a 0/1 target (histopathologic cancer, SIIM-ISIC, aerial cactus) score
    # the probability of 1 by AUC, and their sample submissions hold a whole 0 or 0.5
    raw = tmp_path / "raw"
    labels = labelled(classes=("0", "1"))
    for i, label in labels.items():
        image(raw / "train" / f"{i}.png", 60 + 100 * int(label))
    image(raw / "test" / "a.png", 60)
    csv(raw / "train_labels.csv", id=list(labels), label=list(labels.values()))
    csv(raw / "sample_submission.csv", id=["a"], label=0)
    guess = guess_spec(survey(raw), "toy")
    assert guess.fields["submission"] == "binary" and "submission" not in guess.undecided
    assert guess.fields["metric"] == "roc_auc" and 'set "label"' in guess.why["submission"]


def test_archives_are_named_and_out_is_never_overwritten(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "train.zip").write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip
    csv(raw / "sample_submission.csv", id=["a"], label="x")
    out = tmp_path / "spec.toml"
    result = invoke("init", raw, "--out", out)
    assert result.exit_code == 0, result.output
    assert "train.zip" in result.stdout and "--unpack" in result.stdout and "does not read" in result.stdout
    again = invoke("init", raw, "--out", out)
    assert again.exit_code == 1 and "already exists; pass --force" in again.stderr
    assert invoke("init", raw, "--out", out, "--force").exit_code == 0
