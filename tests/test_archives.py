"""Safe, idempotent unpacking of downloads: synthetic archives built in tmp_path."""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from types import SimpleNamespace

import py7zr
import pytest

from pipeline.download import archives as archives

from pipeline.download import kaggle as kaggle
from pipeline.download.archives import MANIFEST_NAME, archive_kind, unpack_all
from pipeline.errors import PipelineError


def zip_bytes(members: dict[str, bytes], seven: bool = False) -> bytes:
    """A .zip (or with ``seven`` a .7z) holding ``members``, as bytes."""
    buf = io.BytesIO()
    with (py7zr.SevenZipFile(buf, "w") if seven else zipfile.ZipFile(buf, "w")) as out:
        for name, data in members.items():
            out.writestr(data, name) if seven else out.writestr(name, data)  # py7zr takes them the other way
    return buf.getvalue()


def sevenz_bytes(members: dict[str, bytes]) -> bytes:
    return zip_bytes(members, seven=True)


def write_tar(path: Path, members: dict[str, object], mode: str = "w") -> Path:
    """Members: bytes for a file, ("dir",), or ("sym"|"hard", link target)."""
    with tarfile.open(path, mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(data, bytes):
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE}[data[0]]
            info.linkname = data[1] if len(data) > 1 else ""
            tf.addfile(info)
    return path


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` but the manifest, by relative path."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != MANIFEST_NAME}


def mtimes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_archive_kind_from_the_name():
    kinds = {n: archive_kind(n) for n in ("a.zip", "A.ZIP", "b.7z", "c.tar", "d.tar.gz", "e.tgz", "f.gz", "g.png")}
    assert kinds == {"a.zip": "zip", "A.ZIP": "zip", "b.7z": "7z", "c.tar": "tar", "d.tar.gz": "tar",
                     "e.tgz": "tar", "f.gz": None, "g.png": None}


def test_zip_in_zip_is_unpacked_where_it_lands(tmp_path):
    inner = zip_bytes({"a.txt": b"alpha", "deep/b.txt": b"beta"})
    outer = tmp_path / "dl.zip"
    outer.write_bytes(zip_bytes({"labels.csv": b"id,label\n", "data/inner.zip": inner}))
    written = unpack_all(tmp_path)
    assert tree(tmp_path) == {"dl.zip": outer.read_bytes(), "labels.csv": b"id,label\n", "data/inner.zip": inner,
                              "data/a.txt": b"alpha", "data/deep/b.txt": b"beta"}
    assert sorted(p.relative_to(tmp_path).as_posix() for p in written) == [
        "data/a.txt", "data/deep/b.txt", "data/inner.zip", "labels.csv"]


def test_7z_inside_zip_like_the_cifar_download(tmp_path):
    train = sevenz_bytes({"train/1.png": b"one", "train/2.png": b"two", "train/empty.png": b""})
    test = sevenz_bytes({"test/1.png": b"uno"})
    (tmp_path / "cifar-10.zip").write_bytes(zip_bytes({"trainLabels.csv": b"id,label\n1,cat\n",
                                                       "train.7z": train, "test.7z": test}))
    unpack_all(tmp_path)
    got = tree(tmp_path)
    assert {k: got[k] for k in ("train/1.png", "train/2.png", "train/empty.png", "test/1.png")} == {
        "train/1.png": b"one", "train/2.png": b"two", "train/empty.png": b"", "test/1.png": b"uno"}
    assert not [p for p in tmp_path.rglob(".*") if p.name != MANIFEST_NAME]  # no staging or temp left
    umask = os.umask(0o022)
    os.umask(umask)
    assert (tmp_path / "train/1.png").stat().st_mode & 0o777 == 0o666 & ~umask  # not py7zr's 0600


@pytest.mark.parametrize("name, mode", [("d.tar", "w"), ("d.tar.gz", "w:gz"), ("d.tgz", "w:gz")])
def test_tar_files_with_inside_links_become_copies(tmp_path, name, mode):
    raw = tmp_path / "raw"
    raw.mkdir()
    write_tar(raw / name, {".": ("dir",), "top": ("dir",), "./top/a.txt": b"alpha", "top/sym.txt": ("sym", "a.txt"),
                           "top/hard.txt": ("hard", "./top/a.txt")}, mode)  # "." as `tar -C dir .` makes
    unpack_all(raw, tmp_path / "out")
    assert tree(tmp_path / "out") == {"top/a.txt": b"alpha", "top/sym.txt": b"alpha", "top/hard.txt": b"alpha"}
    assert not (tmp_path / "out/top/sym.txt").is_symlink()
    assert tree(raw) == {name: (raw / name).read_bytes()}  # the download folder gained nothing


def test_second_call_is_a_no_op_and_rewrites_nothing(tmp_path, monkeypatch):
    (tmp_path / "dl.zip").write_bytes(zip_bytes({"x.txt": b"x", "in.7z": sevenz_bytes({"y.txt": b"y"})}))
    unpack_all(tmp_path)
    before = mtimes(tmp_path)
    monkeypatch.setattr(archives._Unpacker, "_unpack", lambda *a: pytest.fail(f"opened {a[1]} again"))
    assert unpack_all(tmp_path) == []
    assert mtimes(tmp_path) == before and MANIFEST_NAME in before


def test_changed_archive_is_unpacked_again(tmp_path):
    archive = tmp_path / "dl.zip"
    archive.write_bytes(zip_bytes({"a.txt": b"1", "b.txt": b"same"}))
    unpack_all(tmp_path)
    before = mtimes(tmp_path)
    archive.write_bytes(zip_bytes({"a.txt": b"2", "b.txt": b"same", "c.txt": b"new"}))
    os.utime(archive, ns=(before["dl.zip"] + 10**9, before["dl.zip"] + 10**9))  # a coarse clock can't hide it
    written = unpack_all(tmp_path)
    assert [p.name for p in written] == ["a.txt", "c.txt"]
    assert (tmp_path / "a.txt").read_bytes() == b"2" and (tmp_path / "c.txt").read_bytes() == b"new"
    assert (tmp_path / "b.txt").stat().st_mtime_ns == before["b.txt"]  # identical: not rewritten


def test_changed_archive_does_not_replace_a_file_the_user_edited(tmp_path):
    archive = tmp_path / "dl.zip"
    archive.write_bytes(zip_bytes({"a.txt": b"1"}))
    unpack_all(tmp_path)
    (tmp_path / "a.txt").write_bytes(b"mine")
    archive.write_bytes(zip_bytes({"a.txt": b"2"}))
    os.utime(archive, ns=(1, 1))
    with pytest.raises(PipelineError, match=rf"dl.zip member 'a.txt' differs from the existing file {tmp_path}/a.txt"):
        unpack_all(tmp_path)
    assert (tmp_path / "a.txt").read_bytes() == b"mine"


def test_existing_user_file_differing_is_refused_and_untouched(tmp_path):
    (tmp_path / "labels.csv").write_bytes(b"user's own\n")
    (tmp_path / "same.csv").write_bytes(b"same\n")
    same_mtime = (tmp_path / "same.csv").stat().st_mtime_ns
    (tmp_path / "dl.zip").write_bytes(zip_bytes({"same.csv": b"same\n", "labels.csv": b"archive's\n"}))
    with pytest.raises(PipelineError, match=r"dl.zip member 'labels.csv' differs from the existing file .*labels.csv"):
        unpack_all(tmp_path)
    assert (tmp_path / "labels.csv").read_bytes() == b"user's own\n"
    assert (tmp_path / "same.csv").stat().st_mtime_ns == same_mtime
    assert not list(tmp_path.glob("*.part"))


ZIP_SYMLINK = zipfile.ZipInfo("link")
ZIP_SYMLINK.external_attr = 0o120777 << 16


def _zip_symlink(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ok.txt", b"fine")
        zf.writestr(ZIP_SYMLINK, "/etc/passwd")


def _7z_symlink(path: Path) -> None:
    folder = path.parent.parent / "src"  # outside the download folder, and removed again
    folder.mkdir()
    (folder / "ok.txt").write_bytes(b"fine")
    (folder / "link").symlink_to("/etc/passwd")
    with py7zr.SevenZipFile(path, "w") as sz:
        sz.writeall(folder, "d")
    shutil.rmtree(folder)


@pytest.mark.parametrize("name, build, member", [
    ("up.zip", lambda p: p.write_bytes(zip_bytes({"ok.txt": b"fine", "../x": b"evil"})), "'../x'"),
    ("abs.zip", lambda p: p.write_bytes(zip_bytes({"ok.txt": b"fine", "/abs/x": b"evil"})), "'/abs/x'"),
    ("link.zip", _zip_symlink, "'link' is a symlink"),
    ("link.7z", _7z_symlink, "'d/link' is a link or special file"),
    ("up.tar", lambda p: write_tar(p, {"ok.txt": b"fine", "a/../../x": b"evil"}), "'a/../../x'"),
    ("sym.tar", lambda p: write_tar(p, {"ok.txt": b"fine", "etc": ("sym", "/etc")}), "'etc' links to '/etc'"),
    ("symup.tar.gz", lambda p: write_tar(p, {"ok.txt": b"fine", "d/l": ("sym", "../../x")}, "w:gz"), "'d/l'"),
    ("hard.tar", lambda p: write_tar(p, {"ok.txt": b"fine", "h": ("hard", "../x")}), "'h' links to '../x'"),
])
def test_escape_attempts_are_refused_before_anything_is_written(tmp_path, name, build, member):
    raw = tmp_path / "raw"
    raw.mkdir()
    build(raw / name)
    with pytest.raises(PipelineError, match=rf"{raw}/{name}: member {member}.*refusing the archive"):
        unpack_all(raw)
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(["raw", name])  # not even a manifest


@pytest.mark.parametrize("name", ["broken.zip", "broken.7z", "broken.tar.gz", "broken.tar"])
def test_corrupt_archive_is_one_line_naming_it(tmp_path, name):
    (tmp_path / name).write_bytes(b"this is not an archive " * 40)
    with pytest.raises(PipelineError, match=rf"^{tmp_path}/{name}: cannot unpack it as .*download it again") as err:
        unpack_all(tmp_path)
    assert "\n" not in str(err.value)


def test_corrupt_nested_archive_is_named(tmp_path):
    (tmp_path / "dl.zip").write_bytes(zip_bytes({"train.7z": sevenz_bytes({"a": b"a" * 100})[:40]}))
    with pytest.raises(PipelineError, match=rf"^{tmp_path}/train.7z: cannot unpack it as 7z"):
        unpack_all(tmp_path)


def test_rar_is_named_as_unsupported(tmp_path):
    (tmp_path / "data.rar").write_bytes(b"Rar!")
    with pytest.raises(PipelineError, match=r"data.rar: .rar archives are not supported; unpack it by hand"):
        unpack_all(tmp_path)


def test_a_failed_write_leaves_no_half_file(tmp_path, monkeypatch):
    (tmp_path / "dl.zip").write_bytes(zip_bytes({"big.bin": b"x" * 1000}))

    def broken_copy(src, dst, length=0):
        dst.write(src.read(10))
        raise OSError("disk full")
    monkeypatch.setattr(archives.shutil, "copyfileobj", broken_copy)
    with pytest.raises(PipelineError, match=f"^cannot unpack into {tmp_path}: disk full"):  # one line, not OSError
        unpack_all(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dl.zip"]  # nothing written: not even the manifest
    monkeypatch.undo()
    unpack_all(tmp_path)  # the interrupted archive is unpacked on the next call
    assert (tmp_path / "big.bin").read_bytes() == b"x" * 1000


def test_kaggle_download_unpacks_once_and_keeps_the_zip(tmp_path, monkeypatch):
    calls = []

    def fake_kaggle(args):
        calls.append(args)
        Path(args[-1], "toy.zip").write_bytes(zip_bytes({"labels.csv": b"id,label\n", "train.7z": sevenz_bytes(
            {"train/1.png": b"one"})}))
        return ""
    monkeypatch.setattr(kaggle, "run_kaggle", fake_kaggle)
    comp = SimpleNamespace(slug="toy", labels_file="labels.csv", make_raw=None)
    raw = tmp_path / "raw"
    assert kaggle.download(comp, raw) == raw
    assert (raw / "train/1.png").read_bytes() == b"one" and (raw / "toy.zip").is_file()
    before = mtimes(raw)
    kaggle.download(comp, raw)
    assert len(calls) == 1 and mtimes(raw) == before


def test_py7zr_is_loaded_only_for_a_7z():
    """It is slow to import and may be missing where only zips are met (a Kaggle kernel)."""
    code = "import sys, pipeline.download.kaggle; print('py7zr' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
