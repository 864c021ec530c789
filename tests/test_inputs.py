"""Inputs as users really have them, through the CLI: one clear line and exit 1, or it works.

Special files in image folders, links in a download, labels CSVs as
spreadsheets write them, one class, a read-only work dir, a current folder
that was removed, stray folders in a run.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from conftest import make_competition, tree_hash, write_raw
from pipeline.cli.app import app
from pipeline.competition import _REGISTRY, register

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_error_line(result, *needles: str) -> str:
    """The result is exit 1 with exactly one stderr line holding every needle, and no traceback."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("skipped ")]
    assert len(lines) == 1, lines  # warnings about skipped entries may come before it
    assert "Traceback" not in result.output and "internal error" not in lines[0], lines
    for needle in needles:
        assert needle in lines[0], lines
    return lines[0]


def download_hash(root: Path) -> str:
    """tree_hash that reads only regular files (a pipe would block it), links by their target."""
    import hashlib
    import stat

    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        digest.update(f"{path.relative_to(root)}|{st.st_mode}|{st.st_size}|{st.st_mtime_ns}".encode())
        if stat.S_ISREG(st.st_mode):
            digest.update(path.read_bytes())
        elif stat.S_ISLNK(st.st_mode):
            digest.update(os.readlink(path).encode())
    return digest.hexdigest()


def reorged(result, work: Path) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads((work / "reorg.json").read_text())


# ---------------------------------------------------------------- 1. not regular image files


def test_special_entries_in_image_folders_are_skipped_with_one_warning(toy, tmp_path):
    comp, raw = toy
    (raw / "train" / "99.png").mkdir()  # a folder named like an image
    os.mkfifo(raw / "test" / "t900.png")  # a named pipe: opening it would hang
    (raw / "train" / "98.png").symlink_to(raw / "nowhere.png")  # a broken link
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(raw / "test" / "t901.png"))
    (raw / "train" / "._5.png").write_bytes(b"\0\5\26\7AppleDouble")  # macOS resource fork
    (raw / "train" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    before = download_hash(raw)
    work = tmp_path / "work"
    result = invoke("reorg", comp.slug, raw, work)
    info = reorged(result, work)
    assert info["counts"]["train_valid"] == 36 and info["counts"]["test"] == 10
    warnings = [line for line in result.stderr.splitlines() if "not regular" in line]
    assert len(warnings) == 2, result.stderr  # one per folder, naming what was skipped
    text = "\n".join(warnings)
    for name in ("99.png (a folder)", "98.png (a broken link)", "t900.png (a named pipe)", "t901.png (a socket)"):
        assert name in text, text
    assert "._5.png" not in text and not any(p.name.startswith("._") for p in work.rglob("*"))
    assert download_hash(raw) == before


def test_a_labelled_id_whose_image_is_a_pipe_is_one_line(toy, tmp_path):
    comp, raw = toy
    (raw / "train" / "5.png").unlink()
    os.mkfifo(raw / "train" / "5.png")
    one_error_line(invoke("reorg", comp.slug, raw, tmp_path / "work"), "labels.csv", "'5'", "5.png")
    assert not (tmp_path / "work" / "reorg.json").exists()


# ---------------------------------------------------------------- 2. links


def test_links_inside_the_download_work_and_the_download_is_untouched(toy, tmp_path):
    comp, raw = toy
    (raw / "store").mkdir()
    for name, target in (("1.png", "../store/1.png"), ("2.png", None)):
        os.replace(raw / "train" / name, raw / "store" / name)
        (raw / "train" / name).symlink_to(target or (raw / "store" / name))  # relative, absolute
    before = download_hash(raw)
    work = tmp_path / "work"
    info = reorged(invoke("reorg", comp.slug, raw, work), work)
    assert info["counts"]["train_valid"] == 36
    linked = [p for p in (work / "train_valid").rglob("*.png") if p.name in ("1.png", "2.png")]
    assert len(linked) == 2 and all(p.read_bytes() == (raw / "store" / p.name).read_bytes() for p in linked)
    assert download_hash(raw) == before


def test_a_linked_image_folder_is_followed(toy, tmp_path):
    """RAW_DIR/train itself a link to another disk: the folder's own location counts as the download."""
    comp, raw = toy
    os.replace(raw / "train", tmp_path / "bigdisk-train")
    (raw / "train").symlink_to(tmp_path / "bigdisk-train")
    work = tmp_path / "work"
    assert reorged(invoke("reorg", comp.slug, raw, work), work)["counts"]["train_valid"] == 36


@pytest.mark.parametrize("target", [".kaggle/kaggle.json", ".kaggle/access_token", "project/.env"])
def test_a_link_to_credentials_is_never_packaged(tmp_path, monkeypatch, target):
    from pipeline.kernel.dataset import check_sources

    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    secret = home / target
    secret.parent.mkdir(parents=True)
    secret.write_text('{"username": "me", "key": "0123456789abcdef"}')
    innocent = tmp_path / "run" / "fold0" / "best.pt"
    innocent.parent.mkdir(parents=True)
    innocent.symlink_to(secret)
    with pytest.raises(Exception) as caught:
        check_sources([innocent], [])
    message = str(caught.value)
    assert "best.pt" in message and "credentials" in message and "0123456789abcdef" not in message


def test_a_plain_file_is_still_packaged(tmp_path, monkeypatch):
    from pipeline.kernel.dataset import check_sources

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home" / ".kaggle").mkdir(parents=True)
    plain = tmp_path / "run" / "best.pt"
    plain.parent.mkdir()
    plain.write_bytes(b"weights")
    check_sources([plain], [])  # no error


# ---------------------------------------------------------------- 3. CSVs as spreadsheets write them


def _respell(path: Path, encoding: str, newline: str, tail: str, pad: bool) -> None:
    frame = pd.read_csv(path, dtype=str)
    lines = [",".join((f" {c} " if pad else c) for c in frame.columns)]
    lines += [",".join((f" {v} " if pad else v) for v in row) for row in frame.itertuples(index=False)]
    path.write_bytes((newline.join(lines) + newline + tail).encode(encoding))


@pytest.mark.parametrize("encoding, newline, tail, pad", [
    ("utf-8-sig", "\r\n", "", False),
    ("utf-16", "\r\n", "", False),  # Excel's "Unicode text": UTF-16 with a BOM
    ("utf-8", "\n", "\n\n", False),  # trailing blank lines
    ("utf-8-sig", "\r\n", ",\r\n,\r\n", False),  # trailing rows of only commas
    ("utf-8", "\n", "", True),  # spaces around names, ids and labels
    ("utf-16", "\r\n", ",\r\n \r\n", True),  # all of it at once
])
def test_spreadsheet_csvs_read_as_the_plain_file(toy_probs, tmp_path, encoding, newline, tail, pad):
    comp, raw = toy_probs
    plain_work, work = tmp_path / "plain", tmp_path / "work"
    plain = reorged(invoke("reorg", comp.slug, raw, plain_work), plain_work)
    for name in (comp.labels_file, comp.sample_submission):
        _respell(raw / name, encoding, newline, tail, pad)
    info = reorged(invoke("reorg", comp.slug, raw, work), work)
    assert info["classes"] == plain["classes"] == ["cat", "dog", "frog"]
    assert info["counts"] == plain["counts"]
    assert sorted(p.name for p in (work / "train_valid").rglob("*.png")) == \
        sorted(p.name for p in (plain_work / "train_valid").rglob("*.png"))
    assert (pd.read_csv(work / "folds.csv", dtype=str) == pd.read_csv(plain_work / "folds.csv", dtype=str)).all().all()


def test_a_row_with_only_an_id_is_still_an_error(toy, tmp_path):
    comp, raw = toy
    with open(raw / comp.labels_file, "a") as fh:
        fh.write("999,\n")
    one_error_line(invoke("reorg", comp.slug, raw, tmp_path / "work"), "labels.csv", "'999'", "empty label")


# ---------------------------------------------------------------- 4. one class, no images


def test_a_single_class_is_one_line_at_reorg(tmp_path):
    comp = make_competition("toy-one")
    raw = write_raw(tmp_path / "raw", comp, classes=("cat",))
    one_error_line(invoke("reorg", comp.slug, raw, tmp_path / "work"), "labels.csv", "at least two classes")
    assert not (tmp_path / "work" / "reorg.json").exists()


def test_a_single_class_folder_is_one_line_at_reorg(tmp_path):
    flat = make_competition("toy-folders")
    _REGISTRY.pop(flat.slug)
    comp = register(dataclasses.replace(flat, layout="folders", labels_file="", label_column=""))
    raw = write_raw(tmp_path / "raw", flat, classes=("cat",))
    for png in sorted((raw / "train").glob("*.png")):
        (raw / "train" / "cat").mkdir(exist_ok=True)
        os.replace(png, raw / "train" / "cat" / png.name)
    one_error_line(invoke("reorg", comp.slug, raw, tmp_path / "work"), str(raw / "train"), "at least two classes")


def test_no_training_images_is_one_line_at_reorg(toy, tmp_path):
    comp, raw = toy
    (raw / comp.labels_file).write_text("id,label\n")
    for png in (raw / "train").glob("*.png"):
        png.unlink()
    one_error_line(invoke("reorg", comp.slug, raw, tmp_path / "work"), "labels.csv")


# ---------------------------------------------------------------- 5-7. work dir, cwd, run dir


def _read_only(monkeypatch, root: Path) -> None:
    """Make ``root`` read-only for this process: chmod for everyone, os.access for root (who ignores modes)."""
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod(path.stat().st_mode & ~0o222)
    real = os.access
    inside = str(root.resolve())

    def access(path, mode, *args, **kwargs):
        resolved = os.path.realpath(path)
        if mode & os.W_OK and (resolved == inside or resolved.startswith(inside + os.sep)):
            return False
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


def test_read_only_work_dir_caches_in_the_run_and_stray_folders_are_ignored(toy_probs, tmp_path, monkeypatch):
    comp, raw = toy_probs
    work, run, sub = tmp_path / "work", tmp_path / "run", tmp_path / "sub.csv"
    reorged(invoke("reorg", comp.slug, raw, work, "--folds", "2"), work)
    _read_only(monkeypatch, work)
    before = tree_hash(work)
    try:
        result = invoke("train", comp.slug, work, run, "--epochs", "1", "--batch-size", "8", "--device", "cpu",
                        "--folds", "2", "--cache", "on")
        assert result.exit_code == 0, result.output
        assert tree_hash(work) == before and not (work / "cache").exists()
        assert list((run / "cache").glob("images-*.npy"))
    finally:
        for path in [work, *work.rglob("*")]:
            if not path.is_symlink():
                path.chmod(path.stat().st_mode | 0o200)
    (run / "notes").mkdir()
    (run / "notes" / "todo.txt").write_text("try a bigger model")
    (run / "fold_old").mkdir()
    (run / "fold_old" / "best.pt").write_bytes(b"not a checkpoint")
    (run / "fold7x").mkdir()
    result = invoke("predict", comp.slug, work, run, sub)
    assert result.exit_code == 0, result.output
    assert "2 model(s)" in result.stdout
    frame = pd.read_csv(sub, dtype={"id": str})
    assert len(frame) == 10 and (frame[["cat", "dog", "frog"]].sum(axis=1) - 1).abs().max() < 1e-6
    report = invoke("report", run, "--device", "cpu")
    assert report.exit_code == 0, report.output
    assert "fold_old" not in (run / "report" / "report.html").read_text()


@pytest.mark.parametrize("args", [("competitions",), ("reorg", "toy", "raw", "work"), ("check", "toy", "s.csv")])
def test_a_removed_current_folder_is_one_line(toy, tmp_path, monkeypatch, args):
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    line = one_error_line(invoke(*args), "current folder no longer exists", "cd into an existing folder")
    assert line.startswith("error: ")
