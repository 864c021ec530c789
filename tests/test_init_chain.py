"""`pipeline init` then the whole chain on layouts a, e and f (b, c, d and binary: tests/test_init.py).

a) a labels CSV with train/ and test/ folders; e) a download that is still
nested archives (a .zip holding a .tar.gz, a .7z and the CSVs), as a user who
saved it by hand has it; f) numeric ids, padded and not, matched exactly.
"""
from __future__ import annotations

import io
import shutil
import tarfile
import zipfile
from pathlib import Path

import pandas as pd
from PIL import Image

from pipeline.data.items import list_split, load_reorg
from tests.test_init import CLASSES, chain, csv, image, invoke, labelled, shade


def png_bytes(label: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (shade(label),) * 3).save(buf, format="PNG")
    return buf.getvalue()


def test_a_labels_csv_with_train_and_test_folders(tmp_path):
    raw, labels, test_ids = tmp_path / "raw", labelled(), [f"t{i}" for i in range(6)]
    for i, label in labels.items():
        image(raw / "train" / f"{i}.png", shade(label))
    for j, i in enumerate(test_ids):
        image(raw / "test" / f"{i}.png", shade(CLASSES[j % 3]))
    csv(raw / "labels.csv", id=list(labels), label=list(labels.values()))
    csv(raw / "sample_submission.csv", id=test_ids, label="cat")
    table, sub, _ = chain(tmp_path, raw)
    assert (table["layout"], table["labels_file"], table["label_column"]) == ("csv", "labels.csv", "label")
    assert (table["train_dir"], table["test_dir"], table["submission"]) == ("train", "test", "label")
    assert sub["id"].tolist() == test_ids and set(sub["label"]) <= set(CLASSES)


def write_e(raw: Path) -> dict[str, str]:
    """e) raw/download.zip holds train.tar.gz (train/*.png), test.7z (test/*.png) and the two CSVs."""
    import py7zr

    labels, test_ids = labelled(), [f"t{i}" for i in range(6)]
    raw.mkdir(parents=True)
    tar_buf = io.BytesIO()
    with tarfile.open(fileobj=tar_buf, mode="w:gz") as tf:
        for i, label in labels.items():
            data = png_bytes(label)
            info = tarfile.TarInfo(f"train/{i}.png")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    seven_buf = io.BytesIO()
    with py7zr.SevenZipFile(seven_buf, "w") as sz:
        for j, i in enumerate(test_ids):
            sz.writestr(png_bytes(CLASSES[j % 3]), f"test/{i}.png")
    frames = {"labels.csv": pd.DataFrame({"id": list(labels), "label": list(labels.values())}),
              "sample_submission.csv": pd.DataFrame({"id": test_ids, "label": "cat"})}
    with zipfile.ZipFile(raw / "download.zip", "w") as zf:
        zf.writestr("train.tar.gz", tar_buf.getvalue())
        zf.writestr("test.7z", seven_buf.getvalue())
        for name, frame in frames.items():
            zf.writestr(name, frame.to_csv(index=False))
    return labels


def test_e_nested_archives_init_names_them_then_unpacks(tmp_path):
    raw, zipped = tmp_path / "raw", tmp_path / "zipped"
    labels = write_e(raw)
    shutil.copytree(raw, zipped)
    spec = tmp_path / "spec.toml"
    first = invoke("init", raw, "--out", spec)  # what a user meets first: init says what to run
    assert first.exit_code == 0, first.output
    assert "download.zip" in first.stdout and "--unpack" in first.stdout and "does not read" in first.stdout
    unpacked = invoke("init", raw, "--out", spec, "--unpack", "--force")
    assert unpacked.exit_code == 0, unpacked.output
    assert "the spec reads the download" in unpacked.stdout and "not decided" not in unpacked.stdout
    assert "holds archives" not in unpacked.stdout  # every archive, the nested ones too, is unpacked
    assert (raw / "download.zip").is_file() and (raw / "train.tar.gz").is_file()  # the archives are kept
    table, sub, _ = chain(tmp_path, raw, init=False)
    assert (table["labels_file"], table["train_dir"], table["test_dir"]) == ("labels.csv", "train", "test")
    info = load_reorg(tmp_path / "work")
    assert {it.id for it in list_split(tmp_path / "work", info, "train_valid")} == set(labels) and len(sub) == 6
    refused = invoke("reorg", spec, zipped, tmp_path / "work2")  # the same spec on a download still zipped
    assert refused.exit_code == 1 and "download.zip" in refused.stderr and "--unpack" in refused.stderr


def test_e_init_unpack_twice_is_a_no_op(tmp_path):
    raw = tmp_path / "raw"
    write_e(raw)
    assert invoke("init", raw, "--out", tmp_path / "a.toml", "--unpack").exit_code == 0
    before = {p: p.stat().st_mtime_ns for p in raw.rglob("*.png")}
    again = invoke("init", raw, "--out", tmp_path / "b.toml", "--unpack")
    assert again.exit_code == 0, again.output
    assert {p: p.stat().st_mtime_ns for p in raw.rglob("*.png")} == before
    assert (tmp_path / "a.toml").read_text().split("\n", 3)[3] == (tmp_path / "b.toml").read_text().split("\n", 3)[3]


def test_f_numeric_ids_padded_and_not(tmp_path):
    raw = tmp_path / "raw"
    train_ids = [f"{i:03d}" if i % 2 else str(i) for i in range(18)]  # 0, 001, 2, 003, ...
    labels = {i: CLASSES[k % 3] for k, i in enumerate(train_ids)}
    test_ids = ["0007", "7", "10", "010", "1", "0"]  # distinct strings, one number each
    for i, label in labels.items():
        image(raw / "train" / f"{i}.png", shade(label))
    for j, i in enumerate(test_ids):
        image(raw / "test" / f"{i}.png", shade(CLASSES[j % 3]))
    csv(raw / "labels.csv", id=train_ids, label=list(labels.values()))
    csv(raw / "sample_submission.csv", id=test_ids, label="cat")
    table, sub, _ = chain(tmp_path, raw)
    assert table["id_column"] == "id"
    assert sub["id"].tolist() == test_ids  # as strings, in the sample's order, zeros kept
    info = load_reorg(tmp_path / "work")
    got = {it.id: info["classes"][it.target] for it in list_split(tmp_path / "work", info, "train_valid")}
    assert got == labels
