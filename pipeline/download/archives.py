"""Safe unpacking of a download's archives, the archives inside them included.

A Kaggle download is a .zip that may hold more archives (CIFAR-10's holds
train.7z and test.7z). :func:`unpack_all` unpacks every .zip, .7z, .tar and
.tar.gz/.tgz/.tar.bz2/.tar.xz lying in the download folder into the destination,
then every archive that came out of one into the folder it landed in, and so on.

Rules, so that a download can be unpacked again without harm:

- Each archive is unpacked once: ``.unpacked.json`` in the destination records
  its size and mtime and the files written from it. A second call is a no-op; an
  archive whose size or mtime changed is unpacked again.
- A member never escapes its folder (absolute paths, ``..``, tar links pointing
  outside are refused, as are zip and 7z symlinks); tar links that stay inside
  are written as copies of their target, so no symlink is ever created.
- An existing file is never overwritten unless this module wrote it and it is
  unchanged since: identical content is skipped, anything else is an error.
- Every file is written to a temporary name and renamed, so a failure leaves no
  half file. The archives themselves are only read.
"""
from __future__ import annotations

import filecmp
import functools
import gzip
import json
import lzma
import os
import posixpath
import secrets
import shutil
import sys
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import IO

from pipeline.errors import PipelineError
from pipeline.io import DISK_ERRNOS, atomic_path, os_error_message, write_failure

MANIFEST_NAME = ".unpacked.json"
# longest suffix first, so "x.tar.gz" is a tar and not an unknown ".gz"
_KINDS = ((".tar.gz", "tar"), (".tar.bz2", "tar"), (".tar.xz", "tar"), (".tgz", "tar"), (".tar", "tar"),
          (".zip", "zip"), (".7z", "7z"), (".rar", "rar"))
# what a damaged or unreadable archive raises while it is read (RuntimeError: encrypted zip,
# NotImplementedError: a zip compression method Python lacks); py7zr's own are added where it is used
_UNREADABLE = (zipfile.BadZipFile, zipfile.LargeZipFile, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError,
               gzip.BadGzipFile, RuntimeError, NotImplementedError)
_S_IFMT, _S_IFLNK = 0o170000, 0o120000  # a zip member's file type sits in external_attr's high 16 bits


def archive_kind(path: Path | str) -> str | None:
    """"zip", "7z", "tar" or "rar" (recognised, not supported) from the file name; None if not an archive."""
    name = str(path).lower()
    return next((kind for suffix, kind in _KINDS if name.endswith(suffix)), None)


def unpack_all(raw_dir: Path, dest: Path | None = None) -> list[Path]:
    """Unpack the archives in ``raw_dir`` (not its sub-folders) into ``dest`` (default ``raw_dir``).

    An archive found among the unpacked files is unpacked into the folder it
    lies in, recursively. Returns the files this call wrote (new or replaced),
    in order; an empty list when everything was unpacked before.
    """
    raw_dir = Path(raw_dir)
    dest = raw_dir if dest is None else Path(dest)
    if not raw_dir.is_dir():
        raise PipelineError(f"download folder {raw_dir} does not exist; download the competition's files there")
    queue = [(path, dest) for path in sorted(raw_dir.iterdir()) if path.is_file() and archive_kind(path)]
    if not queue:
        return []
    dest.mkdir(parents=True, exist_ok=True)
    fresh = not (dest / MANIFEST_NAME).exists()
    unpacker = _Unpacker(dest)
    seen: set[Path] = set()
    try:
        while queue:
            archive, into = queue.pop(0)
            if archive in seen or not archive.is_file():  # seen: an archive that holds its own name
                continue
            seen.add(archive)
            queue.extend((dest / rel, (dest / rel).parent) for rel in unpacker.visit(archive, into))
    except PipelineError:
        if fresh and not unpacker.written and not unpacker.manifest:  # refused before writing anything
            (dest / MANIFEST_NAME).unlink(missing_ok=True)
        raise
    return unpacker.written


UNPACK_HINT = ("unpack them in place with `pipeline init RAW_DIR --out FILE --unpack` "
               "(once; the archives are kept and no file of yours is overwritten)")


def not_unpacked(raw_dir: Path, found: list[str] | None = None) -> list[str]:
    """The archives under ``raw_dir`` (``found``, relative; default: those directly in it) that
    :func:`unpack_all` has not unpacked there, or that changed since."""
    raw_dir = Path(raw_dir)
    if found is None:
        found = sorted(p.name for p in raw_dir.iterdir() if p.is_file() and archive_kind(p)) \
            if raw_dir.is_dir() else []
    manifest = _load_manifest(raw_dir / MANIFEST_NAME)
    pending = []
    for rel in found:
        entry, path = manifest.get(rel), raw_dir / rel
        if rel == MANIFEST_NAME or not path.is_file():
            continue
        if entry is None or (entry["size"], entry["mtime_ns"]) != _stat_key(path):
            pending.append(rel)
    return pending


class _Unpacker:
    """Unpacks archives into folders under ``dest``, keeping ``dest``'s manifest."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.manifest = _load_manifest(dest / MANIFEST_NAME)
        # the files an earlier unpack wrote, as (size, mtime_ns): those may be replaced
        self.owned = {rel: tuple(st) for entry in self.manifest.values() for rel, st in entry["files"].items()}
        self.written: list[Path] = []
        self.files: dict[str, tuple[int, int]] = {}  # the current archive's files: written or still ours
        self.nested: list[str] = []  # the current archive's archive members, even those found already there
        if not (dest / MANIFEST_NAME).exists():
            self._save()  # marks the folder as being unpacked, so an interrupted first run is resumed

    def visit(self, archive: Path, into: Path) -> list[str]:
        """Unpack ``archive`` into ``into`` unless done before; the archives it holds (relative to dest)."""
        key = Path(os.path.relpath(archive, self.dest)).as_posix()
        st = archive.stat()
        entry = self.manifest.get(key)
        if entry is None or (entry["size"], entry["mtime_ns"]) != (st.st_size, st.st_mtime_ns):
            self.files, self.nested = {}, []
            self._unpack(archive, into)
            entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "files": self.files, "archives": self.nested}
            self.manifest[key] = entry
            self._save()
        return [rel for rel in entry.get("archives", []) if rel != key]

    def _save(self) -> None:
        text = json.dumps(self.manifest, separators=(",", ":"))  # compact: it may list 300,000 files
        _atomic_write_bytes(self.dest / MANIFEST_NAME, text.encode())

    def _unpack(self, archive: Path, into: Path) -> None:
        """Dispatch on the kind; a damaged archive becomes one PipelineError naming it."""
        kind = archive_kind(archive)
        if kind == "rar":
            raise PipelineError(f"{archive}: .rar archives are not supported; unpack it by hand into {into} "
                                f"(e.g. `unrar x`) and move the .rar out of {archive.parent}")
        unpack = {"zip": self._unpack_zip, "tar": self._unpack_tar, "7z": self._unpack_7z}[kind]
        try:
            unpack(archive, into)
        except PipelineError:
            raise
        except Exception as exc:  # noqa: BLE001 - sorted below: the disk's fault, the archive's, or a bug
            unreadable = isinstance(exc, _unreadable_errors())  # evaluated once raised, when py7zr may be loaded
            disk = write_failure(exc, into)  # py7zr and zlib word a full disk their own way
            if disk is not None and (not unreadable or disk.errno in DISK_ERRNOS):
                raise PipelineError(os_error_message(disk, into, "unpack into")) from exc
            if not unreadable:
                raise
            if type(exc).__name__ == "PasswordRequired":
                raise PipelineError(f"{archive} is password-protected; unpack it by hand with its password "
                                    f"(`7z x {archive} -o{into}`) and move the archive out of {archive.parent}") from None
            reason = _reason(exc)
            raise PipelineError(f"{archive}: cannot unpack it as {kind} ({reason}); download it again, or unpack "
                                f"it by hand into {into} and move the archive out of {archive.parent}") from None

    def _unpack_zip(self, archive: Path, into: Path) -> None:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            for info in infos:  # every member is checked before anything is written
                _member_parts(archive, info.filename)
                if (info.external_attr >> 16) & _S_IFMT == _S_IFLNK:
                    raise PipelineError(f"{archive}: member {info.filename!r} is a symlink; refusing the archive "
                                        "(unpack it by hand if you trust it)")
            for info in infos:
                target = into.joinpath(*_member_parts(archive, info.filename))
                where = f"{archive} member {info.filename!r}"
                if info.is_dir():
                    _make_dir(target, where)
                else:
                    with zf.open(info) as src:
                        self._store(src, target, where)

    def _unpack_tar(self, archive: Path, into: Path) -> None:
        with tarfile.open(archive, "r:*") as tf:
            members = tf.getmembers()
            for m in members:
                _check_tar_member(archive, m)
            for m in members:
                target = into.joinpath(*_member_parts(archive, m.name))
                where = f"{archive} member {m.name!r}"
                if m.isdir():
                    _make_dir(target, where)
                    continue
                try:
                    src = tf.extractfile(m)  # a link's target member's data: links become copies
                except KeyError:
                    raise PipelineError(f"{where} links to {m.linkname!r}, which is not in the archive; "
                                        "download it again") from None
                if src is None:
                    raise PipelineError(f"{where} links to the folder {m.linkname!r}; unpack it by hand")
                with src:
                    self._store(src, target, where)

    def _unpack_7z(self, archive: Path, into: Path) -> None:
        """py7zr writes a folder of its own at once: stage it beside the targets, then rename in."""
        import py7zr  # here, not at the top: it is slow to import and only .7z needs it

        with py7zr.SevenZipFile(archive) as sz:
            infos = list(sz.files)  # ArchiveFile: its is_* properties are the same in py7zr 0.20 and 1.x
            for info in infos:
                _member_parts(archive, info.filename)
                if info.is_symlink or info.is_junction or info.is_socket:
                    raise PipelineError(f"{archive}: member {info.filename!r} is a link or special file; "
                                        "refusing the archive (unpack it by hand if you trust it)")
            _make_dir(into, str(archive))
            staging = Path(tempfile.mkdtemp(prefix=".unpacking-", dir=into))
            try:
                sz.extractall(path=staging)
                for info in infos:
                    parts = _member_parts(archive, info.filename)
                    where = f"{archive} member {info.filename!r}"
                    target, staged = into.joinpath(*parts), staging.joinpath(*parts)
                    _make_dir(target if info.is_directory else target.parent, where)
                    if not info.is_directory and staged.is_file():
                        os.chmod(staged, _default_file_mode())  # py7zr keeps the archive's modes
                        self._place(staged, target, where)
            finally:
                shutil.rmtree(staging, ignore_errors=True)

    def _store(self, src: IO[bytes], target: Path, where: str) -> None:
        """Copy ``src`` to a temporary file beside ``target``, then place it."""
        _make_dir(target.parent, where)
        tmp = _new_temp(target)
        try:
            with open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            self._place(tmp, target, where)
        finally:
            tmp.unlink(missing_ok=True)

    def _place(self, tmp: Path, target: Path, where: str) -> None:
        """Rename ``tmp`` onto ``target``: skip identical content, refuse to replace a file not ours."""
        rel = Path(os.path.relpath(target, self.dest)).as_posix()
        if archive_kind(rel):
            self.nested.append(rel)
        if target.is_dir() and not target.is_symlink():
            raise PipelineError(f"{where}: a folder {target} is in the way; move it away and run again")
        if target.is_symlink() or target.exists():
            was_ours = self._ours(rel, target)
            if not target.is_symlink() and filecmp.cmp(tmp, target, shallow=False):
                if was_ours:  # still ours: keep the record so a changed archive may replace it
                    self.files[rel] = _stat_key(target)
                return
            if not was_ours:
                raise PipelineError(f"{where} differs from the existing file {target}, which it would overwrite; "
                                    "move that file away (it was left untouched) and run again")
        os.replace(tmp, target)
        self.files[rel] = self.owned[rel] = _stat_key(target)
        self.written.append(target)

    def _ours(self, rel: str, target: Path) -> bool:
        """Whether an earlier unpack wrote ``target`` and it has not changed since."""
        return not target.is_symlink() and self.owned.get(rel) == _stat_key(target)


def _reason(exc: BaseException) -> str:
    """The first line of an exception's words: its last text argument (py7zr puts a dict of codec
    details first), else its type."""
    texts = [a for a in exc.args if isinstance(a, str) and a.strip()]
    return texts[-1].strip().splitlines()[0] if texts else type(exc).__name__


def _unreadable_errors() -> tuple[type[BaseException], ...]:
    """The errors of an unreadable archive, py7zr's among them once it is loaded."""
    py7zr = sys.modules.get("py7zr")
    if py7zr is None:
        return _UNREADABLE
    return (*_UNREADABLE, py7zr.exceptions.ArchiveError, py7zr.exceptions.PasswordRequired)


def _member_parts(archive: Path, name: str) -> tuple[str, ...]:
    """The path parts of a member name (none for "./"); an error if it is absolute or climbs out with ``..``."""
    posix = name.replace("\\", "/")  # a zip made on Windows may use backslashes
    parts = tuple(p for p in posix.split("/") if p not in ("", "."))
    if posix.startswith("/") or (len(posix) > 1 and posix[1] == ":") or ".." in parts:
        raise PipelineError(f"{archive}: member {name!r} would be written outside the folder it unpacks into; "
                            "refusing the archive (download it again from a source you trust)")
    return parts


def _check_tar_member(archive: Path, m: tarfile.TarInfo) -> None:
    """A tar member's name is safe, and a link points inside; other special files are refused."""
    _member_parts(archive, m.name)
    if m.issym() or m.islnk():
        # a symlink is relative to its own folder, a hard link to the archive's root
        base = posixpath.dirname(m.name) if m.issym() else ""
        resolved = posixpath.normpath(posixpath.join(base, m.linkname))
        if m.linkname.startswith("/") or resolved == ".." or resolved.startswith("../"):
            raise PipelineError(f"{archive}: member {m.name!r} links to {m.linkname!r}, outside the folder it "
                                "unpacks into; refusing the archive (download it again from a source you trust)")
    elif not (m.isreg() or m.isdir()):
        raise PipelineError(f"{archive}: member {m.name!r} is a device or pipe; refusing the archive")


def _make_dir(path: Path, where: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise PipelineError(f"{where}: a file is in the way of the folder {path}; move it away and run again") from None


def _new_temp(target: Path) -> Path:
    """An empty, new file beside ``target`` (mode from the umask, like any new file)."""
    while True:
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.part")
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:
            continue


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


@functools.cache
def _default_file_mode() -> int:
    """0o666 less the umask: what a newly created file gets."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _stat_key(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _load_manifest(path: Path) -> dict:
    """The manifest's entries; an unreadable one starts afresh (unpacking again only skips identical files)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    ok = isinstance(data, dict) and all(isinstance(e, dict) and {"size", "mtime_ns", "files"} <= e.keys()
                                        for e in data.values())
    return data if ok else {}
