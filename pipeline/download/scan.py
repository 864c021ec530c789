"""Scanning a download's image folders: which regular image files are there, their sizes and mtimes.

Only regular files (or links to them) count; pipes, sockets, devices,
broken links, links to a folder above themselves and folders named like
images are skipped with one warning per folder. A link may lead anywhere,
another disk included (a common way to keep data on a big drive): it is
followed for reading and never written through. Archives cannot bring links
in: pipeline/download/archives.py refuses those that lead out of the folder
they unpack into. pipeline/download/layout.py reads the scans.
"""
from __future__ import annotations

import logging
import os
import posixpath
import stat
from array import array
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.download.archives import UNPACK_HINT, not_unpacked
from pipeline.competition import Competition
from pipeline.errors import PipelineError

log = logging.getLogger("pipeline")


@dataclass(frozen=True)
class Folder:
    """One scanned image folder of the download."""

    rel: str  # its path relative to RAW_DIR ("." for RAW_DIR itself)
    files: list[str]  # every non-hidden file under it, relative to it, "/"-separated, sorted
    stamp: bytes  # the files' names, sizes and mtimes: what the fingerprint sees
    links: frozenset[str] = frozenset()  # the files that are links (followed for reading, wherever they lead)
    stats: array = field(default_factory=lambda: array("q"), compare=False, repr=False)  # size, mtime per file


def _scan(root: Path, depth: int | None, ext: str) -> tuple[list[str], bytes, frozenset, array]:
    """(sorted regular files, stamp, links, size and mtime of each) under ``root`` to ``depth`` levels; anything else skipped, with a warning."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    seen = _Seen(os.path.realpath(root), ext.lower(), [], [])
    try:
        files = sorted(_list_files(fd, depth, seen))
        stamp = _sizes_and_mtimes(fd, files)
    finally:
        os.close(fd)
    if seen.skipped:
        log.warning("skipped %d entries of %s that are not regular image files: %s%s", len(seen.skipped), root,
                    ", ".join(seen.skipped[:5]), ", ..." if len(seen.skipped) > 5 else "")
    return files, "\0".join(files).encode() + stamp.tobytes(), frozenset(seen.links), stamp


@dataclass
class _Seen:  # what a scan needs to judge an entry, what it skipped, which files are links
    real_root: str
    ext: str  # lower-case image_ext: a folder with such a name is reported, not silently passed over
    skipped: list[str]
    links: list[str]


def _kind(entry: os.DirEntry) -> str:
    """'file', 'dir', or what the entry is instead (named pipe, socket, device, broken link)."""
    try:
        if entry.is_file():
            return "file"
        if entry.is_dir():
            return "dir"
        mode = entry.stat().st_mode
    except OSError:  # a broken link or a link loop
        return "a broken link"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device or special file"


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root + os.sep)


def _link_loops(rel: str, seen: _Seen) -> bool:
    """Whether a link loops back to a folder above itself (a link to another disk is the user's: followed)."""
    target = os.path.realpath(os.path.join(seen.real_root, rel))
    return _within(os.path.realpath(os.path.join(seen.real_root, posixpath.dirname(rel))), target)


def _list_files(fd: int, depth: int | None, seen: _Seen) -> list[str]:
    """Relative paths of the regular files below the folder ``fd``; the file type comes free with the listing."""
    files: list[str] = []
    pending = [("", 1)]
    while pending:
        prefix, level = pending.pop()
        sub = os.open(prefix, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd) if prefix else os.dup(fd)
        try:
            with os.scandir(sub) as entries:
                for entry in entries:
                    name = entry.name
                    if name[0] == ".":  # .DS_Store, ._x.png resource forks, .ipynb_checkpoints
                        continue
                    if entry.is_file(follow_symlinks=False):  # the common case, from the listing alone
                        files.append(prefix + name)
                        continue
                    rel, kind = prefix + name, _kind(entry)
                    if kind != "file" and kind != "dir":
                        seen.skipped.append(f"{rel} ({kind})")
                        continue
                    if entry.is_symlink() and _link_loops(rel, seen):
                        seen.skipped.append(f"{rel} (a link to a folder above it)")
                        continue
                    if kind == "file":
                        files.append(rel)
                        if entry.is_symlink():
                            seen.links.append(rel)
                    elif depth is None or level < depth:
                        pending.append((f"{rel}/", level + 1))
                    elif entry.name.lower().endswith(seen.ext):
                        seen.skipped.append(f"{rel} (a folder)")
        finally:
            os.close(sub)
    return files


def _sizes_and_mtimes(fd: int, files: list[str]) -> array:
    """Size and mtime (ns) of each file, flat (they catch an image rewritten in place); one thread is fastest."""
    values: list[int] = []
    add, stat_at = values.extend, os.stat  # bound once: this loop runs once per image
    for rel in files:
        st = stat_at(rel, dir_fd=fd)
        add((st.st_size, st.st_mtime_ns))
    return array("q", values)


def _depth(comp: Competition, role: str) -> int | None:
    """How deep a folder's images lie: class folders at 2, CSV paths anywhere, else 1."""
    if comp.layout == "folders" and role != "test":
        return 2
    return None if comp.path_column else 1


def scan_download(comp: Competition, raw_dir: Path) -> dict[str, Folder]:
    """Scan every image folder of the spec once, keyed by its role: train, valid, test."""
    roles = {"train": comp.train_dir, "test": comp.test_dir}
    if comp.valid_dir:
        roles["valid"] = comp.valid_dir
    depths: dict[str, int | None] = {}
    for role, rel in roles.items():
        mine, theirs = _depth(comp, role), depths.get(rel, 0)
        depths[rel] = None if mine is None or theirs is None else max(mine, theirs)
    scans: dict[str, Folder] = {}
    for rel, depth in depths.items():
        root = raw_dir / rel
        if not root.is_dir():
            pending = not_unpacked(raw_dir)
            if pending:
                raise PipelineError(f"image folder {root} not found, and {raw_dir} holds archives not unpacked "
                                    f"({', '.join(pending[:4])}): {UNPACK_HINT}")
            raise PipelineError(f"image folder {root} not found; point RAW_DIR at the unzipped Kaggle download")
        scans[rel] = Folder(posixpath.normpath(rel), *_scan(root, depth, comp.image_ext))
    return {role: scans[rel] for role, rel in roles.items()}


def file_sizes(scans: dict[str, Folder]) -> dict[str, int]:
    """Every scanned file's size in bytes, keyed by its path relative to RAW_DIR (as the download's paths are)."""
    sizes: dict[str, int] = {}
    for folder in scans.values():
        prefix = "" if folder.rel == "." else f"{folder.rel}/"
        sizes.update(zip((prefix + name for name in folder.files), folder.stats[::2]))
    return sizes
