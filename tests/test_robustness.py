"""Bad inputs, full disks, hostile files: one clear line, exit code 1, nothing lost.

Every case drives the CLI in-process (typer's CliRunner) and checks three
things: the exit code, the one ``error: ...`` line naming the file, row or id
(no traceback), and that the inputs and earlier outputs are unchanged (a tree
hash of RAW_DIR, of a previous WORK_DIR or submission). The crash cases, which
need real processes killed with SIGKILL, are in test_crashes.py.
"""
from __future__ import annotations

import builtins
import errno
import json
import os
import pickle
import re
import shutil
import struct
import subprocess
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from competitions.digits import write_digits
from pipeline.download import kaggle as kaggle
from pipeline.checkpoint import load_checkpoint
from pipeline.cli.app import app
from pipeline.data.items import read_image
from pipeline.imagefile import UnreadableImage
from pipeline.download.layout import read_labels
from pipeline.download.reorg import plan_split
from tests.conftest import make_competition, tree_hash, write_raw

runner = CliRunner()
RED, BLUE = (220, 30, 30), (30, 30, 220)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def error_line(result) -> str:
    """The single ``error: ...`` line of a failed command: exit code 1, no traceback (warnings may precede it)."""
    assert result.exit_code == 1, (result.exit_code, result.output)
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def ok(result) -> str:
    assert result.exit_code == 0, result.output
    return result.stdout


def listing(root: Path) -> set[str]:
    """Every path under ``root``, relative to it."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def read_strings(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def train_fast(comp, work: Path, run: Path, *extra):
    """One quick epoch; -q keeps stderr to warnings and errors."""
    return invoke("-q", "train", comp.slug, work, run, "--epochs", "1", "--batch-size", "8", "--device", "cpu", *extra)


def reorg_ok(comp, raw: Path, work: Path) -> Path:
    """Reorganise without CV folds (the quickest tree); returns WORK_DIR."""
    ok(invoke("reorg", comp.slug, raw, work, "--folds", "0"))
    return work


def reorg_fails(comp, raw: Path, work: Path, *extra) -> str:
    """Run a reorg that must fail: its error line; the download and WORK_DIR untouched."""
    before = tree_hash(raw)
    line = error_line(invoke("reorg", comp.slug, raw, work, *extra))
    assert tree_hash(raw) == before
    assert not (work / "reorg.json").exists()
    return line


# ---------------------------------------------------------------- a trained toy run, shared


@pytest.fixture(scope="module")
def trained_toy(tmp_path_factory):
    """(raw, run) of the 3-class toy, trained one epoch; tests copy what they change."""
    from pipeline.competition import _REGISTRY

    root = tmp_path_factory.mktemp("trained")
    comp = make_competition("toy")
    raw = write_raw(root / "raw", comp)
    reorg_ok(comp, raw, root / "work")
    ok(train_fast(comp, root / "work", root / "run"))
    _REGISTRY.pop(comp.slug)  # each test registers it again (conftest unregisters it after)
    return raw, root / "run"


@pytest.fixture
def toy_run(trained_toy, tmp_path):
    """(comp, raw, run): a private copy of the download and the shared trained run."""
    raw, run = trained_toy
    comp = make_competition("toy")
    shutil.copytree(raw, tmp_path / "raw")
    return comp, tmp_path / "raw", run


def predict_fails(comp, raw: Path, run: Path, tmp_path: Path, *extra) -> str:
    """Reorg ``raw``, predict with ``run``: the error line; no submission written."""
    work, sub = tmp_path / "work", tmp_path / "sub.csv"
    reorg_ok(comp, raw, work)
    line = error_line(invoke("predict", comp.slug, work, run, sub, *extra))
    assert not sub.exists() and not list(tmp_path.glob(".sub.csv.*"))
    return line


# ---------------------------------------------------------------- labels CSV


def _labels(raw: Path) -> Path:
    return raw / "labels.csv"


def _edit(raw: Path, edit) -> None:
    frame = read_strings(_labels(raw))
    edit(frame).to_csv(_labels(raw), index=False)


@pytest.mark.parametrize("breakage, message", [
    (lambda raw: _labels(raw).unlink(), r"labels file {raw}/labels.csv not found; check the path"),
    (lambda raw: _labels(raw).write_bytes(b""), r"labels file {raw}/labels.csv is empty; download it again"),
    (lambda raw: _labels(raw).write_text("id,label\n"), r"labels file {raw}/labels.csv has a header but no rows"),
    (lambda raw: _labels(raw).write_bytes(b"\xff\xd8\xff\xe0JFIF\x00\x01"), r"{raw}/labels.csv is not a readable CSV"),
    (lambda raw: _edit(raw, lambda f: f.rename(columns={"label": "breed"})),
     r"{raw}/labels.csv: no column 'label'; columns found: 'id', 'breed'"),
    (lambda raw: _edit(raw, lambda f: f.rename(columns={"id": "image"})),
     r"{raw}/labels.csv: no column 'id'; columns found: 'image', 'label'"),
    (lambda raw: _edit(raw, lambda f: pd.concat([f, f.iloc[[2]]])),
     r"{raw}/labels.csv: id '3' appears on rows 4, 38 \(labels \['frog'\]\); keep one row per id"),
    (lambda raw: _edit(raw, lambda f: pd.concat([f, f.iloc[[2]].assign(label="dog")])),
     r"{raw}/labels.csv: id '3' appears on rows 4, 38 \(labels \['dog', 'frog'\]\)"),
    (lambda raw: _edit(raw, lambda f: f.assign(label=f["label"].where(f["id"] != "7", " "))),
     r"{raw}/labels.csv row 8: id '7' has an empty label; fill it in or drop the row"),
], ids=["missing", "empty", "header-only", "not-text", "no-label-column", "no-id-column",
        "duplicate-same-label", "duplicate-conflicting-labels", "empty-label"])
def test_bad_labels_file(toy, tmp_path, breakage, message):
    comp, raw = toy
    breakage(raw)
    line = reorg_fails(comp, raw, tmp_path / "work")
    assert re.search(message.format(raw=re.escape(str(raw))), line), line


@pytest.mark.parametrize("bad_id", ["../evil", "a/b", "a\\b", "x\0y", "..", "a..b"])
def test_ids_that_could_escape_a_folder_are_rejected(toy, tmp_path, bad_id):
    comp, raw = toy
    text = _labels(raw).read_text().replace("\n5,", f"\n{bad_id},", 1)  # the id on row 6
    _labels(raw).write_text(text)
    outside = listing(tmp_path)
    line = reorg_fails(comp, raw, tmp_path / "work")
    assert f"labels.csv row 6: id {bad_id!r} contains a path separator, NUL or '..'; fix the row" in line
    assert listing(tmp_path) - outside <= {"work", "work/.reorg.lock"}


def test_bom_and_stray_whitespace_are_tolerated(toy, tmp_path):
    comp, raw = toy
    frame = read_strings(_labels(raw))
    padded = frame.assign(id=" " + frame["id"] + "  ", label=frame["label"] + " ")
    _labels(raw).write_bytes(b"\xef\xbb\xbf" + padded.to_csv(index=False).encode())
    before = tree_hash(raw)
    ok(invoke("reorg", comp.slug, raw, tmp_path / "work", "--folds", "3"))
    assert tree_hash(raw) == before
    info = json.loads((tmp_path / "work" / "reorg.json").read_text())
    assert info["classes"] == ["cat", "dog", "frog"] and info["counts"]["train_valid"] == 36
    folds = read_strings(tmp_path / "work" / "folds.csv")
    assert list(folds.columns) == ["id", "label", "fold"]
    assert sorted(folds["id"]) == sorted(frame["id"])  # stripped, and still strings


def write_download(root: Path, comp, labelled: dict[str, str], test_ids: list[str]) -> Path:
    """A download with exactly these ids; each class a colour."""
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    classes = sorted(set(labelled.values()))
    colours = {c: np.full((16, 16, 3), 40 + 60 * i, np.uint8) for i, c in enumerate(classes)}
    for image_id, label in labelled.items():
        Image.fromarray(colours[label]).save(root / "train" / f"{image_id}.png")
    for j, image_id in enumerate(test_ids):
        Image.fromarray(colours[classes[j % len(classes)]]).save(root / "test" / f"{image_id}.png")
    pd.DataFrame({"id": list(labelled), "label": list(labelled.values())}).to_csv(root / "labels.csv", index=False)
    if comp.submission == "label":
        sample = pd.DataFrame({"id": test_ids, "label": classes[0]})
    else:
        sample = pd.DataFrame({"id": test_ids, **{c: 1 / len(classes) for c in classes}})
    sample.to_csv(root / "sample.csv", index=False)
    return root


def test_numeric_and_hex_ids_stay_exact_strings(tmp_path):
    comp = make_competition("toy")
    special = ["007", "7", "1e5", "NA", "nan", "0x1F", "1.0", "-3", "000bec180eb18c7604dcecc8fe0dba07"]
    ids = special + [f"x{i}" for i in range(15)]
    labelled = {image_id: ("cat", "dog", "frog")[i % 3] for i, image_id in enumerate(ids)}
    test_ids = ["0042", "42", "1E3", "NaN", "ab12cd", "0001"]
    raw = write_download(tmp_path / "raw", comp, labelled, test_ids)
    work, run, sub = tmp_path / "work", tmp_path / "run", tmp_path / "sub.csv"
    ok(invoke("reorg", comp.slug, raw, work, "--folds", "3"))
    assert sorted(read_strings(work / "folds.csv")["id"]) == sorted(ids)
    ok(train_fast(comp, work, run))
    ok(invoke("predict", comp.slug, work, run, sub))
    assert read_strings(sub)["id"].tolist() == test_ids  # not 42, 1000.0 or NaN
    assert sub.read_text().splitlines()[1].startswith("0042,")


CLASS_NAMES = ("../../etc", ".hidden", "a/b", "café au lait", "ü" * 120)


@pytest.mark.parametrize("kind", ["label", "probs"])
def test_odd_class_names_kept_exactly_and_folders_stay_inside(tmp_path, kind):
    comp = make_competition("toy", submission=kind)
    raw = write_raw(tmp_path / "raw", comp, classes=CLASS_NAMES, per_class=4)
    work, run, sub = tmp_path / "work", tmp_path / "run", tmp_path / "sub.csv"
    before = listing(tmp_path)
    reorg_ok(comp, raw, work)
    ok(train_fast(comp, work, run))
    ok(invoke("predict", comp.slug, work, run, sub))
    ok(invoke("check", comp.slug, sub, "--work-dir", work))
    created = listing(tmp_path) - before
    assert all(p.split("/")[0] in ("work", "run", "sub.csv") for p in created), sorted(created)
    info = json.loads((work / "reorg.json").read_text())
    assert sorted(info["classes"]) == sorted(CLASS_NAMES)
    for folder in info["class_dirs"]:
        assert "/" not in folder and not folder.startswith(".") and len(folder.encode()) <= 200
        assert (work / "train" / folder).resolve().parent == (work / "train").resolve()
    frame = read_strings(sub)
    if kind == "label":
        assert set(frame["label"]) <= set(CLASS_NAMES)
    else:
        assert list(frame.columns) == ["id", *sorted(CLASS_NAMES)]  # the sample's columns, exactly


# ---------------------------------------------------------------- structure


def _drop_test_images(raw: Path) -> None:
    for p in (raw / "test").iterdir():
        p.unlink()


@pytest.mark.parametrize("breakage, message", [
    (_drop_test_images, "{raw}/test has no *.png images; unzip the test set there"),
    (lambda raw: shutil.rmtree(raw / "test"), "image folder {raw}/test not found; point RAW_DIR at the unzipped"),
    (lambda raw: (raw / "train" / "5.png").unlink(),
     "{raw}/labels.csv: id '5' has no image train/5.png (1 such ids); restore the images or drop those rows"),
    (lambda raw: shutil.copy(raw / "train" / "1.png", raw / "train" / "extra.png"),
     "{raw}/train/extra.png has no row in labels.csv (1 such images); add the rows or remove the images"),
    (lambda raw: shutil.copy(raw / "test" / "t001.png", raw / "test" / "t999.png"),
     "{raw}/sample.csv disagrees with {raw}/test: test image 't999.png' is not listed (0 ids without image, "
     "1 images not listed); use the matching download"),
    (lambda raw: (raw / "test" / "t004.png").unlink(),
     "{raw}/sample.csv disagrees with {raw}/test: id 't004' has no test image (1 ids without image"),
    (lambda raw: (raw / "sample.csv").write_text("id,label\nt000,cat\nt000,cat\n"),
     "{raw}/sample.csv: id 't000' appears twice; download the sample submission again"),
    (lambda raw: (raw / "sample.csv").write_text("image,label\nt000,cat\n"),
     "{raw}/sample.csv: no id column 'id'; columns found: 'image', 'label'; use the competition's sample submission"),
    (lambda raw: (raw / "sample.csv").unlink(), "sample submission {raw}/sample.csv not found"),
], ids=["empty-test-folder", "no-test-folder", "label-without-image", "image-without-label",
        "test-image-not-in-sample", "sample-id-without-image", "sample-duplicate-id", "sample-wrong-column",
        "no-sample"])
def test_inconsistent_download(toy, tmp_path, breakage, message):
    comp, raw = toy
    breakage(raw)
    assert message.format(raw=raw) in reorg_fails(comp, raw, tmp_path / "work")


@pytest.mark.parametrize("folds, message", [
    (13, "--folds 13: no class has 13 images (largest has 12); use --folds 12 or fewer"),
    (40, "--folds 40 is more than the 36 labelled images; use fewer folds"),
], ids=["more-than-the-largest-class", "more-than-all-images"])
def test_more_folds_than_images_is_a_clear_error(toy, tmp_path, folds, message):
    comp, raw = toy
    assert message in reorg_fails(comp, raw, tmp_path / "work", "--folds", folds)


def test_a_class_with_one_image_trains_and_is_documented_in_folds(toy, tmp_path):
    comp, raw = toy
    _edit(raw, lambda f: f.assign(label=f["label"].where(f["id"] != "7", "rare")))
    work = tmp_path / "work"
    result = invoke("reorg", comp.slug, raw, work, "--folds", "3")
    ok(result)
    assert "1 classes have fewer than 3 images: some folds validate without them" in result.stderr
    info = json.loads((work / "reorg.json").read_text())
    rare = info["class_dirs"][info["classes"].index("rare")]
    assert os.listdir(work / "train" / rare) == ["7.png"] and os.listdir(work / "valid" / rare) == []
    ok(train_fast(comp, work, tmp_path / "run", "--fold", "0"))


# ---------------------------------------------------------------- images


def save_image(path: Path, kind: str, size: tuple[int, int] = (20, 12)) -> None:
    """One image of ``kind``: left half red, right half blue (W x H = ``size``)."""
    w, h = size
    img = Image.new("RGB", size, BLUE)
    img.paste(RED, (0, 0, w // 2, h))
    if kind == "grayscale":
        img.convert("L").save(path, format="PNG")
    elif kind == "palette":
        img.convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(path, format="PNG")
    elif kind == "rgba":
        img.convert("RGBA").save(path, format="PNG")
    elif kind == "16bit":
        Image.fromarray(np.full((h, w), 40000, np.uint16)).save(path, format="PNG")
    elif kind == "cmyk_jpeg":
        img.convert("CMYK").save(path, format="JPEG", quality=95)
    elif kind == "exif_rotated":
        exif = img.getexif()
        exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
        img.save(path, format="JPEG", quality=95, exif=exif)
    elif kind in ("png_named_jpg", "rgb"):
        img.save(path, format="PNG")
    else:
        img.save(path, format="JPEG", quality=95)


def png_header(path: Path, width: int, height: int) -> None:
    """A tiny PNG that declares ``width`` x ``height`` pixels (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


BROKEN = ["zero-byte", "truncated", "not-an-image", "bomb"]


def break_image(path: Path, how: str) -> None:
    """Make ``path`` unreadable. zero-byte empties the file in place (a hard link to
    it in a WORK_DIR sees that too); the others put a new file in its place."""
    if how == "zero-byte":
        path.write_bytes(b"")
    elif how == "truncated":
        data = path.read_bytes()
        path.unlink()  # a new file: the old one may be hard-linked into a WORK_DIR
        path.write_bytes(data[: len(data) // 2])
    elif how == "not-an-image":
        path.unlink()
        path.write_text("id,label\nthis is a CSV, not a picture\n")
    elif how == "bomb":  # over twice PIL's pixel limit: refused as it opens
        path.unlink()
        png_header(path, 50_000, 50_000)
    elif how == "big":  # over the limit, under twice it: PIL only warns, read_image refuses
        path.unlink()
        png_header(path, 10_000, 10_000)
    else:
        raise ValueError(how)


READABLE = ["rgb", "grayscale", "palette", "rgba", "16bit", "cmyk_jpeg", "exif_rotated", "png_named_jpg"]


@pytest.mark.parametrize("kind", READABLE)
def test_every_readable_kind_decodes_to_rgb_uint8(tmp_path, kind):
    path = tmp_path / "image.jpg"
    save_image(path, kind)
    arr = read_image(path)
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
    if kind == "exif_rotated":  # stored 20 x 12; displayed 12 wide, 20 high, red on top
        assert arr.shape == (20, 12, 3)
        assert np.abs(arr[1, 6].astype(int) - RED).max() < 40 and np.abs(arr[-2, 6].astype(int) - BLUE).max() < 40
    elif kind == "16bit":
        assert arr.shape == (12, 20, 3) and (arr == round(40000 / 65535 * 255)).all()
    elif kind == "grayscale":
        assert arr.shape == (12, 20, 3) and (arr[..., 0] == arr[..., 2]).all()
    else:
        assert arr.shape == (12, 20, 3)
        assert np.abs(arr[6, 1].astype(int) - RED).max() < 40 and np.abs(arr[6, -2].astype(int) - BLUE).max() < 40


@pytest.mark.parametrize("how", [*BROKEN, "big"])
def test_unreadable_kinds_raise(tmp_path, how):
    path = tmp_path / "image.png"
    save_image(path, "rgb")
    break_image(path, how)
    with pytest.raises((OSError, UnreadableImage)):  # opening fails as UnreadableImage, a bomb included
        read_image(path)


def test_a_download_of_mixed_image_kinds_runs_end_to_end(tmp_path):
    """JPEG competition whose files are of every readable kind, some named *.JPG."""
    comp = make_competition("toy", image_ext=".jpg")
    raw = tmp_path / "raw"
    (raw / "train").mkdir(parents=True)
    (raw / "test").mkdir()
    rows = []
    for i in range(24):
        name = f"{i}.JPG" if i % 5 == 0 else f"{i}.jpg"
        save_image(raw / "train" / name, READABLE[i % len(READABLE)])
        rows.append((str(i), ("left", "right")[i % 2]))
    pd.DataFrame(rows, columns=["id", "label"]).to_csv(raw / "labels.csv", index=False)
    test_ids = [f"t{k}" for k in range(len(READABLE))]
    for k, kind in enumerate(READABLE):
        save_image(raw / "test" / (f"{test_ids[k]}.JPG" if k == 0 else f"{test_ids[k]}.jpg"), kind)
    pd.DataFrame({"id": test_ids, "label": "left"}).to_csv(raw / "sample.csv", index=False)
    reorg_ok(comp, raw, tmp_path / "work")
    ok(train_fast(comp, tmp_path / "work", tmp_path / "run"))
    ok(invoke("predict", comp.slug, tmp_path / "work", tmp_path / "run", tmp_path / "sub.csv"))
    assert read_strings(tmp_path / "sub.csv")["id"].tolist() == test_ids


def broken_toy(toy, tmp_path: Path, split: str) -> tuple:
    """(comp, raw, work, ids): the toy with one image of each BROKEN kind in ``split``
    (train or valid) of the default plan, reorganised."""
    comp, raw = toy
    plan = plan_split(read_labels(comp, raw), valid_ratio=0.1, folds=0, seed=0)
    ids = sorted((i for i in plan.labels["id"] if plan.split_of(i) == split), key=int)[: len(BROKEN)]
    for image_id, how in zip(ids, BROKEN):
        break_image(raw / "train" / f"{image_id}.png", how)
    return comp, raw, reorg_ok(comp, raw, tmp_path / "work"), ids


def _warned_about(stderr: str, ids: list[str]) -> list[str]:
    """The stderr lines that name any of the broken files."""
    return [line for line in stderr.splitlines() if any(f"/{i}.png" in line for i in ids)]


# The image cache (small images, decoded once) and the per-file DataLoader path
# handle unreadable files separately: both are checked.
CACHE_ON, CACHE_OFF = ("--cache", "on"), ("--cache", "off")
FEATURES = ("--freeze-backbone", "--feature-cache")  # a frozen backbone: the head trains on cached features


@pytest.mark.parametrize("cache", [CACHE_ON, CACHE_OFF, FEATURES], ids=["cache", "no-cache", "features"])
def test_unreadable_training_images_are_skipped_with_a_warning_naming_each(toy, tmp_path, cache):
    comp, raw, work, ids = broken_toy(toy, tmp_path, "train")
    before = tree_hash(raw)
    result = train_fast(comp, work, tmp_path / "run", *cache)
    ok(result)
    warned = _warned_about(result.stderr, ids)
    assert warned and all("unreadable" in line for line in warned)
    assert all(any(f"/{i}.png" in line for line in warned) for i in ids), warned
    assert (tmp_path / "run" / "holdout" / "best.pt").is_file() and tree_hash(raw) == before


@pytest.mark.parametrize("cache", [CACHE_ON, CACHE_OFF, FEATURES],
                         ids=["cache", "no-cache", "features"])
def test_strict_makes_an_unreadable_training_image_an_error(toy, tmp_path, cache):
    comp, _, work, ids = broken_toy(toy, tmp_path, "train")
    line = error_line(train_fast(comp, work, tmp_path / "run", "--strict", *cache))
    assert line.startswith("error: cannot read image ") and "replace or remove the file" in line
    assert any(f"/{i}.png (id '{i}')" in line for i in ids)
    assert not (tmp_path / "run" / "holdout" / "best.pt").exists()


@pytest.mark.parametrize("cache", [CACHE_ON, CACHE_OFF],
                         ids=["cache", "no-cache"])
def test_skipped_training_images_are_counted_and_listed_once(toy, tmp_path, cache):
    comp, _, work, ids = broken_toy(toy, tmp_path, "train")
    result = train_fast(comp, work, tmp_path / "run", "--epochs", "2", *cache)
    ok(result)
    warned = _warned_about(result.stderr, ids)
    assert len(warned) == 1 and re.search(rf"\b{len(ids)} unreadable", warned[0]), warned
    assert all(f"/{i}.png" in warned[0] for i in ids)


def test_an_unreadable_validation_image_is_skipped_too(toy, tmp_path):
    comp, _, work, ids = broken_toy(toy, tmp_path, "valid")
    result = train_fast(comp, work, tmp_path / "run")
    ok(result)
    assert all(f"/{i}.png" in result.stderr for i in ids)


@pytest.mark.parametrize("how", BROKEN)
def test_an_unreadable_test_image_fails_predict_naming_it(toy_run, tmp_path, how):
    comp, raw, run = toy_run
    break_image(raw / "test" / "t003.png", how)
    line = predict_fails(comp, raw, run, tmp_path)
    assert line.startswith(f"error: cannot read image {tmp_path}/work/test/unknown/t003.png (id 't003'): ")
    assert line.endswith("; replace or remove the file")
    if how == "bomb":
        assert "decompression bomb" in line


def test_an_unreadable_test_image_in_a_worker_is_still_one_line(toy_run, tmp_path):
    comp, raw, run = toy_run
    break_image(raw / "test" / "t006.png", "truncated")
    line = predict_fails(comp, raw, run, tmp_path, "--num-workers", "1")
    assert line.startswith(f"error: cannot read image {tmp_path}/work/test/unknown/t006.png (id 't006')")


@pytest.mark.slow
def test_one_unreadable_test_image_among_thousands(tmp_path):
    comp = make_competition("toy")
    raw = write_raw(tmp_path / "raw", comp, per_class=4, n_test=1500, size=8)
    reorg_ok(comp, raw, tmp_path / "work")
    ok(train_fast(comp, tmp_path / "work", tmp_path / "run"))
    break_image(raw / "test" / "t1234.png", "zero-byte")  # the same file as WORK's hard link
    line = error_line(invoke("predict", comp.slug, tmp_path / "work", tmp_path / "run", tmp_path / "sub.csv",
                             "--batch-size", "512"))
    assert "test/unknown/t1234.png (id 't1234')" in line
    assert not (tmp_path / "sub.csv").exists()


@pytest.mark.slow
def test_one_unreadable_training_image_among_thousands(tmp_path):
    raw, work = tmp_path / "raw", tmp_path / "work"
    write_digits(raw)
    break_image(raw / "train" / "1234.png", "truncated")
    before = tree_hash(raw)
    ok(invoke("reorg", "digits", raw, work, "--folds", "0"))
    result = invoke("-q", "train", "digits", work, tmp_path / "run", "--epochs", "1", "--batch-size", "256",
                    "--device", "cpu")
    ok(result)
    warned = [line for line in result.stderr.splitlines() if "1234.png" in line]
    assert len(warned) == 1 and "unreadable" in warned[0]
    assert tree_hash(raw) == before


def test_a_documented_fallback_keeps_every_test_id(toy_run, tmp_path):
    comp, raw, run = toy_run
    break_image(raw / "test" / "t003.png", "zero-byte")
    work, sub = tmp_path / "work", tmp_path / "sub.csv"
    reorg_ok(comp, raw, work)
    result = invoke("predict", comp.slug, work, run, sub, "--unreadable-test", "uniform")
    ok(result)
    assert "t003.png" in result.stderr
    assert read_strings(sub)["id"].tolist() == [f"t{i:03d}" for i in range(10)]


# ---------------------------------------------------------------- full disks, read-only folders


def _fail_on(name: str, err: int, real):
    """A stand-in for an OS call that fails with ``err`` when a path argument is named ``name``."""
    def fake(*args, **kwargs):
        if any(Path(str(a)).name == name for a in args if isinstance(a, (str, os.PathLike))):
            raise OSError(err, os.strerror(err), str(args[-1]))
        return real(*args, **kwargs)
    return fake


def test_disk_full_while_writing_the_submission_keeps_the_old_one(toy_run, tmp_path, monkeypatch):
    comp, raw, run = toy_run
    work, sub = tmp_path / "work", tmp_path / "sub.csv"
    reorg_ok(comp, raw, work)
    ok(invoke("predict", comp.slug, work, run, sub))
    old = sub.read_bytes()
    monkeypatch.setattr(os, "replace", _fail_on("sub.csv", errno.ENOSPC, os.replace))
    line = error_line(invoke("predict", comp.slug, work, run, sub, "--force", "--tta", "flip"))
    assert line == f"error: cannot write {sub}: No space left on device; free some disk space and run again"
    assert sub.read_bytes() == old and sorted(os.listdir(tmp_path)) == ["raw", "sub.csv", "work"]


def test_disk_full_during_a_rebuild_keeps_the_previous_tree(toy, tmp_path, monkeypatch):
    comp, raw = toy
    work = tmp_path / "work"
    ok(invoke("reorg", comp.slug, raw, work, "--folds", "3"))
    before = tree_hash(work)
    monkeypatch.setattr(shutil, "copyfile", _fail_on("sample_submission.csv", errno.ENOSPC, shutil.copyfile))
    line = error_line(invoke("reorg", comp.slug, raw, work, "--folds", "3", "--seed", "1"))
    assert line == (f"error: cannot write the tree in {work}: No space left on device; free some disk space "
                    "and run again (the previous tree is unchanged)")
    assert tree_hash(work) == before and not (work / ".staging").exists()
    monkeypatch.undo()
    assert "up to date" in ok(invoke("reorg", comp.slug, raw, work, "--folds", "3"))


def test_disk_full_while_checkpointing_keeps_the_last_epoch(toy, tmp_path, monkeypatch):
    comp, raw = toy
    work, run = tmp_path / "work", tmp_path / "run"
    reorg_ok(comp, raw, work)
    real_save, saves = torch.save, []

    def save(obj, f, *args, **kwargs):
        if Path(f).name.startswith(".last.pt."):
            saves.append(f)
            if len(saves) == 2:  # epoch 1 saved; epoch 2 finds the disk full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    line = error_line(train_fast(comp, work, run, "--epochs", "2"))
    member = run / "holdout"
    assert line == f"error: cannot write {member}/last.pt: No space left on device; free some disk space and run again"
    monkeypatch.undo()
    assert load_checkpoint(member / "last.pt")["epoch"] == 1
    assert not [p for p in os.listdir(member) if p.endswith(".tmp")]
    ok(train_fast(comp, work, run, "--epochs", "2", "--resume"))
    assert load_checkpoint(member / "last.pt")["epoch"] == 2


def test_the_next_write_removes_temp_files_of_killed_writers_only(toy_run, tmp_path):
    comp, raw, run = toy_run
    work, sub = reorg_ok(comp, raw, tmp_path / "work"), tmp_path / "sub.csv"
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid names no process now, as after a SIGKILL
    stale, live = tmp_path / f".sub.csv.{dead.pid}-abc.tmp", tmp_path / f".sub.csv.{os.getpid()}-def.tmp"
    stale.write_text("id,label\nt000,cat\n")
    live.write_text("another writer, still running")
    ok(invoke("predict", comp.slug, work, run, sub))
    assert not stale.exists() and live.read_text() == "another writer, still running"
    assert len(read_strings(sub)) == 10


@pytest.fixture
def deny_writes(monkeypatch):
    """make(folder): writes into ``folder`` fail with EACCES.

    chmod 0o500 is enough for a normal user; root ignores it, so when a probe
    write still succeeds the OS calls that create entries are made to fail the
    way the kernel would.
    """
    folders = []

    def make(folder: Path) -> None:
        folder.chmod(0o500)
        folders.append(folder)
        try:
            (folder / ".probe").write_text("x")
        except PermissionError:
            return
        (folder / ".probe").unlink()
        inside = lambda p: Path(os.fspath(p)).absolute().parent == folder.absolute()  # noqa: E731

        def denied(p):
            return PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(p))

        real_open, real_os_open = builtins.open, os.open

        def fake_open(file, mode="r", *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and inside(file) and set(mode) & set("wax+"):
                raise denied(file)
            return real_open(file, mode, *args, **kwargs)

        def fake_os_open(path, flags, *args, **kwargs):
            if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                raise denied(path)
            return real_os_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(os, "open", fake_os_open)

    yield make
    for folder in folders:
        folder.chmod(0o755)


def test_reorg_into_a_read_only_folder(toy, tmp_path, deny_writes):
    comp, raw = toy
    work = tmp_path / "work"
    work.mkdir()
    deny_writes(work)
    line = reorg_fails(comp, raw, work)
    assert line == (f"error: cannot create the lock file {work}/.reorg.lock: Permission denied; "
                    "check the folder's permissions")


def test_predict_into_a_read_only_folder_keeps_the_old_submission(toy_run, tmp_path, deny_writes):
    comp, raw, run = toy_run
    work, subs = tmp_path / "work", tmp_path / "submissions"
    reorg_ok(comp, raw, work)
    ok(invoke("predict", comp.slug, work, run, subs / "toy.csv"))
    old = tree_hash(subs)
    deny_writes(subs)
    line = error_line(invoke("predict", comp.slug, work, run, subs / "toy.csv", "--force"))
    assert line == f"error: cannot write {subs}/toy.csv: Permission denied; check the folder's permissions"
    assert tree_hash(subs) == old


# ---------------------------------------------------------------- hostile files


class RunsCode:
    """Pickles to a call of os.system: loading it with plain pickle would run a command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused_by_predict(toy_run, tmp_path):
    comp, raw, run = toy_run
    hostile = tmp_path / "hostile"
    shutil.copytree(run, hostile)
    marker = tmp_path / "pwned"
    torch.save({"model": RunsCode(marker)}, hostile / "holdout" / "best.pt")  # torch's zip format, hostile pickle inside
    line = predict_fails(comp, raw, hostile, tmp_path)
    assert line.startswith(f"error: checkpoint {hostile}/holdout/best.pt was refused: it is not a plain-data checkpoint (")
    assert "GLOBAL posix.system" in line and line.endswith("; only load files you trust from a pipeline run")
    assert not marker.exists()


def test_a_raw_pickle_as_last_pt_is_refused_on_resume(toy, tmp_path):
    comp, raw = toy
    work, run, marker = tmp_path / "work", tmp_path / "run", tmp_path / "pwned"
    reorg_ok(comp, raw, work)
    (run / "holdout").mkdir(parents=True)
    (run / "holdout" / "last.pt").write_bytes(pickle.dumps({"model": RunsCode(marker)}))
    line = error_line(train_fast(comp, work, run, "--resume"))
    assert line.startswith(f"error: checkpoint {run}/holdout/last.pt was refused: it is not a plain-data checkpoint")
    assert not marker.exists() and (run / "holdout" / "last.pt").read_bytes() == pickle.dumps({"model": RunsCode(marker)})


def test_a_tampered_run_config_cannot_move_writes_outside_run_dir(toy_run, tmp_path):
    comp, raw, run = toy_run
    work, mine = tmp_path / "work", tmp_path / "run"
    reorg_ok(comp, raw, work)
    shutil.copytree(run, mine)
    doc = json.loads((mine / "config.json").read_text())
    doc["config"]["run_dir"] = str(tmp_path / "elsewhere")
    (mine / "config.json").write_text(json.dumps(doc))
    before = listing(tmp_path)
    train_fast(comp, work, mine, "--resume")
    # inside RUN_DIR, or training's own image cache inside WORK_DIR: nothing else
    assert {p for p in listing(tmp_path) - before if not p.startswith(("run/", "work/cache"))} == set()


def _fake_kaggle(monkeypatch, behave) -> list:
    """Replace the kaggle executable: ``behave(cmd)`` returns (returncode, stdout, stderr)."""
    calls = []

    def run(cmd, **kwargs):
        calls.append((cmd, kwargs))
        code, out, err = behave(cmd)
        return subprocess.CompletedProcess(cmd, code, out, err)

    monkeypatch.setattr(kaggle.shutil, "which", lambda name: f"/opt/bin/{name}")
    monkeypatch.setattr(kaggle.subprocess, "run", run)
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "sekrit-123")
    return calls


def test_kaggle_gets_an_argument_list_never_a_shell_string(monkeypatch):
    calls = _fake_kaggle(monkeypatch, lambda cmd: (0, "ok\n", ""))
    args = ["competitions", "download", "-c", "x; rm -rf /", "-p", "$(touch pwned) `id`"]
    assert kaggle.run_kaggle(args) == "ok\n"
    (cmd, kwargs), = calls
    assert cmd == ["/opt/bin/kaggle", *args]  # each argument one element, metacharacters inert
    assert not kwargs.get("shell", False)


def test_an_archive_member_escaping_raw_dir_is_refused(tmp_path, monkeypatch):
    comp = make_competition("toy-remote")

    def download(cmd):
        with zipfile.ZipFile(Path(cmd[cmd.index("-p") + 1]) / "toy.zip", "w") as zf:
            zf.writestr("labels.csv", "id,label\n")
            zf.writestr("../evil.txt", "gotcha")
        return 0, "", ""

    _fake_kaggle(monkeypatch, download)
    before = listing(tmp_path)
    line = error_line(invoke("download", comp.slug, tmp_path / "raw"))
    assert line == (f"error: {tmp_path}/raw/toy.zip: member '../evil.txt' would be written outside the folder it "
                    "unpacks into; refusing the archive (download it again from a source you trust)")
    assert listing(tmp_path) - before == {"raw", "raw/toy.zip"}


@pytest.mark.parametrize("setup, message", [
    (lambda mp: mp.setattr(kaggle.shutil, "which", lambda name: None),
     "error: the kaggle CLI is not installed; `pip install kaggle` (to skip downloading, unzip the data by hand "
     "and pass its folder: RAW_DIR, or DATA=... for make)"),
    (lambda mp: (mp.setattr(kaggle.shutil, "which", lambda name: "/opt/bin/kaggle"),
                 [mp.delenv(k, raising=False) for k in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN")]),
     "error: no Kaggle credentials found: create an API token on kaggle.com"),
    (lambda mp: _fake_kaggle(mp, lambda cmd: (1, "", "Traceback...\n403 - Forbidden - rules not accepted\n")),
     "error: `kaggle competitions download` failed: 403 - Forbidden - rules not accepted (accepted the "
     "competition's rules on kaggle.com? network up?)"),
], ids=["no-kaggle-cli", "no-credentials", "kaggle-fails"])
def test_download_problems_are_one_line(tmp_path, monkeypatch, setup, message):
    comp = make_competition("toy-remote")
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "no-config"))
    setup(monkeypatch)
    assert error_line(invoke("download", comp.slug, tmp_path / "raw")).startswith(message)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_no_output_or_file_holds_the_kaggle_key(toy_probs, tmp_path, monkeypatch):
    comp, raw = toy_probs
    secret = "sekrit-123"
    config = tmp_path / "kaggle-config"
    config.mkdir()
    (config / "kaggle.json").write_text(json.dumps({"username": "someone", "key": secret}))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(config))
    _fake_kaggle(monkeypatch, lambda cmd: (1, "", "401 - Unauthorized for someone\n"))
    work, run, subs = tmp_path / "work", tmp_path / "run", tmp_path / "submissions"
    outputs = [
        invoke("download", "toy-probs", tmp_path / "fresh-raw"),
        invoke("reorg", comp.slug, raw, work, "--folds", "0"),
        train_fast(comp, work, run),
        invoke("predict", comp.slug, work, run, subs / "toy.csv"),
        invoke("check", comp.slug, subs / "toy.csv", "--work-dir", work),
        invoke("--debug", "predict", comp.slug, work, tmp_path / "no-run", subs / "other.csv"),
    ]
    assert [r.exit_code for r in outputs] == [1, 0, 0, 0, 0, 1]
    assert not any(secret in r.output + repr(r.exception) for r in outputs)
    written = [p for d in (work, run, subs) for p in d.rglob("*") if p.is_file()]
    assert len(written) > 10 and not any(secret.encode() in p.read_bytes() for p in written)


# ---------------------------------------------------------------- --debug


def test_debug_shows_the_traceback_instead_of_the_line(tmp_path):
    plain = invoke("reorg", "digits", tmp_path / "raw-missing", tmp_path / "work")
    assert error_line(plain) == f"error: RAW_DIR {tmp_path}/raw-missing is not a folder; unzip the Kaggle download there first"
    debug = invoke("--debug", "reorg", "digits", tmp_path / "raw-missing", tmp_path / "work")
    assert debug.exit_code == 1 and "error: " not in debug.stderr
    assert type(debug.exception).__name__ == "PipelineError" and debug.exc_info[2] is not None



def test_the_feature_cache_marks_unreadable_images_so_no_black_image_is_trained(toy, tmp_path):
    """Issue 13.6: a frozen backbone's cached features of a broken file are left out of the loss."""
    from pipeline.data.features import feature_bank
    from pipeline.data.items import ImageDataset, build_transform, list_split, load_reorg
    from pipeline.models import create_model

    comp, raw, work, ids = broken_toy(toy, tmp_path, "train")
    info = load_reorg(work)
    pool = list_split(work, info, "train_valid")
    transform = build_transform("none", 16, comp.mean, comp.std, train=False)
    images = ImageDataset(pool, transform, 16)
    bank = feature_bank(create_model("fastnet_s", 3).eval(), images, images, 0, batch_size=8, workers=0,
                        pin_memory=False, seed=0, device=torch.device("cpu"))
    assert sorted(pool[i].id for i in bank["bad"].tolist()) == sorted(ids)
