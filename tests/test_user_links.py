"""A user's own links are followed for reading; a refused command leaves nothing; archive errors read as one line."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import py7zr
import pytest
from typer.testing import CliRunner

from pipeline.cli.app import app
from tests.test_inputs import download_hash


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def other_disk(tmp_path):
    """A folder on another file system than tmp_path where one is available (/dev/shm), so hard links fail."""
    for base in ("/dev/shm", None):
        if base is None or (os.path.isdir(base) and os.access(base, os.W_OK)):
            folder = Path(tempfile.mkdtemp(prefix="bigdisk-", dir=base or tmp_path))
            yield folder
            shutil.rmtree(folder, ignore_errors=True)
            return


def test_image_links_to_another_disk_are_followed_for_reading_never_written(toy, tmp_path, other_disk):
    comp, raw = toy
    for name in ("1.png", "2.png", "3.png"):
        shutil.move(raw / "train" / name, other_disk / name)  # the user keeps images on a big drive
        (raw / "train" / name).symlink_to(other_disk / name)
    stored = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in other_disk.iterdir()}
    before = download_hash(raw)
    work = tmp_path / "work"
    result = invoke("reorg", comp.slug, raw, work)
    assert result.exit_code == 0, result.output
    placed = {p.name: p for p in (work / "train_valid").rglob("*.png") if p.name in stored}
    assert sorted(placed) == sorted(stored)
    assert all(p.read_bytes() == stored[p.name][0] for p in placed.values())  # the images, read through
    assert invoke("reorg", comp.slug, raw, work, "--force").exit_code == 0  # a rebuild removes links, not targets
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in other_disk.iterdir()} == stored
    assert download_hash(raw) == before


def test_a_refused_first_reorg_removes_the_work_dir_it_made_but_never_one_that_existed(toy, tmp_path):
    comp, raw = toy
    (raw / comp.labels_file).write_text("id,label\n")  # a header and no rows: refused
    work = tmp_path / "new" / "work"
    refused = invoke("reorg", comp.slug, raw, work)
    assert refused.exit_code == 1 and "no rows" in refused.stderr
    assert not work.exists()
    existing = tmp_path / "mine"
    existing.mkdir()
    assert invoke("reorg", comp.slug, raw, existing).exit_code == 1
    assert existing.is_dir() and list(existing.iterdir()) == []


def test_a_password_protected_7z_is_one_readable_line(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (tmp_path / "a.txt").write_text("hello")
    with py7zr.SevenZipFile(raw / "secret.7z", "w", password="pw") as archive:
        archive.write(tmp_path / "a.txt", "a.txt")
    result = invoke("init", raw, "--out", tmp_path / "spec.toml", "--unpack")
    assert result.exit_code == 1
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert line == (f"error: {raw / 'secret.7z'} is password-protected; unpack it by hand with its password "
                    f"(`7z x {raw / 'secret.7z'} -o{raw}`) and move the archive out of {raw}")
    assert "{" not in line
