"""Kaggle download -> WORK_DIR/{train,valid,train_valid}/<class>/ and test/unknown/.

Where the images of a download are is pipeline/download/layout.py's business; this
module plans the split (pure) and writes the tree.

The download is never modified: images are hard-linked (symlinked, then copied,
where links are impossible). The tree is built in a staging folder and swapped
in; ``reorg.json`` is written last and is the completion marker, so a run
killed half-way leaves no tree that claims to be complete. A lock file keeps a
second reorg of the same WORK_DIR out (it fails at once, naming the holder),
and the next run removes what a killed one left behind.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.competition import Competition
from pipeline.errors import PipelineError
from pipeline.io import atomic_write_json, exclusive_lock, made_folder, os_error_message, remove_stale_temps
from pipeline.download.naming import MAX_DIR_NAME, class_dir_name, link_name  # noqa: F401  (re-exported)
from pipeline.download.layout import Download, Folder, input_files, layout_spec, read_download
from pipeline.download.scan import file_sizes, scan_download
from pipeline.workdir import (FOLDS_FILE, IMAGES_DIR, LOCK_FILE, REORG_FILE, SAMPLE_FILE, SPLITS, TEST_CLASS_DIR,
                              TEST_ITEMS_FILE)

if TYPE_CHECKING:  # numpy and pandas (splits, items_table, duplicates) load only where a tree is built:
    import pandas as pd  # a reorg with nothing to do starts fast

log = logging.getLogger("pipeline")

FORMAT_VERSION = 2  # part of the fingerprint: bump when the split algorithm changes
STAGING_DIR, TRASH_DIR = ".staging", ".trash"  # the next tree, the replaced one (inside WORK_DIR)


@dataclass(frozen=True)
class SplitPlan:
    """Which labelled id goes where; computed without touching the disk."""

    labels: pd.DataFrame  # columns id, label (strings), in labels-file order
    valid_ids: frozenset[str]
    folds: pd.Series | None  # id -> fold number, or None without CV

    def split_of(self, image_id: str) -> str:
        return "valid" if image_id in self.valid_ids else "train"


# ---------------------------------------------------------------- planning


def plan_split(labels: pd.DataFrame, valid_ratio: float, folds: int, seed: int,
               given_valid: frozenset[str] | None = None, groups: pd.Series | None = None) -> SplitPlan:
    """The split of a labels frame (id, label): :func:`pipeline.download.splits.plan_split` stratified on the label.

    Deterministic in ``seed``; with ``groups`` (one value per row) no group is on both sides.
    """
    from pipeline.download import splits

    split = splits.plan_split(labels["id"].to_numpy(), labels["label"].to_numpy(), valid_ratio, folds, seed,
                              given_valid=given_valid, groups=groups)
    return SplitPlan(labels=labels, valid_ids=split.valid_ids, folds=split.folds)


# ---------------------------------------------------------------- writing


def fingerprint(comp: Competition, raw_dir: Path, params: dict, scans: dict[str, Folder]) -> str:
    """A digest of everything the tree depends on: the spec, options, CSV bytes, each image's size and mtime.

    Needs no parsing: on an unchanged download the no-op costs one scan.
    """
    spec = layout_spec(comp)
    digest = hashlib.sha256(json.dumps([spec, params, FORMAT_VERSION], sort_keys=True).encode())
    for name in input_files(comp):
        try:
            digest.update(name.encode() + b"\0" + (raw_dir / name).read_bytes())
        except OSError:  # reading the download reports it, with a better message
            digest.update(name.encode() + b"\0missing")
    for role in sorted(scans):
        digest.update(f"\0{role}\0{scans[role].rel}\0".encode())
        digest.update(scans[role].stamp)
    return digest.hexdigest()


def _link_mode(src: str, probe_dir: Path) -> str:
    """'hardlink' where the file system allows it, else 'symlink', else 'copy'."""
    probe = probe_dir / ".link-probe"
    for mode, make in (("hardlink", os.link), ("symlink", os.symlink)):
        try:
            make(os.path.realpath(src) if mode == "symlink" else src, probe)
            probe.unlink()
            return mode
        except OSError:
            continue
    return "copy"


def _place(mode: str, src: str, dst: str) -> None:
    if mode == "hardlink":
        try:
            os.link(src, dst)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            os.symlink(os.path.realpath(src), dst)  # a user's link to another disk: read there, never copied
    elif mode == "symlink":
        os.symlink(src, dst)
    else:
        shutil.copy2(src, dst)


def _fs_threads() -> int:
    """Threads for many small file-system calls (links, unlinks): they release the GIL."""
    return min(4, os.cpu_count() or 1)


def _link_all(jobs: list[tuple[str, str]], mode: str, pool: ThreadPoolExecutor) -> list[Future]:
    """Start making every link in ``pool`` (its threads overlap the file-system calls, which release the GIL)."""
    def run(chunk: list[tuple[str, str]]) -> None:
        for src, dst in chunk:
            _place(mode, src, dst)

    size = max(1024, -(-len(jobs) // (4 * _fs_threads())))
    return [pool.submit(run, jobs[i : i + size]) for i in range(0, len(jobs), size)]


def materialize(plan: SplitPlan, download: Download, raw_dir: Path, image_ext: str, staging: Path,
                pool: ThreadPoolExecutor) -> tuple[str, list[Future]]:
    """Start writing the class-folder trees into ``staging`` in ``pool``; returns the link mode and the pending work.

    Paths are plain strings: building 110,000 pathlib objects took longer than the links.
    """
    single = download.task.kind == "single"  # the others: every labelled image in images/, items.csv says what
    class_dirs = {c: class_dir_name(c) for c in download.classes} if single else {}
    for split in SPLITS:
        for folder in class_dirs.values():
            (staging / split / folder).mkdir(parents=True)
    (staging / "test" / TEST_CLASS_DIR).mkdir(parents=True)
    if not single:
        (staging / IMAGES_DIR).mkdir()
    first = next(iter(download.train_paths.values()))
    mode = _link_mode(f"{raw_dir}/{first}", staging)
    src = f"{raw_dir.resolve() if mode == 'symlink' else raw_dir}/"
    out = f"{staging}/"
    held_out, paths = plan.valid_ids, download.train_paths
    # a link in the download is replaced by its target: a hard link to a relative link would dangle
    real = {p: os.path.realpath(raw_dir / p) for p in download.links}
    source = lambda path: real.get(path) or src + path  # noqa: E731
    jobs: list[tuple[str, str]] = []
    both: list[tuple[str, str]] = []
    for image_id, label in zip(plan.labels["id"].tolist(), plan.labels["label"].tolist()):
        path = paths[image_id]
        if not single:
            jobs.append((source(path), f"{out}{IMAGES_DIR}/{link_name(image_id, path, image_ext)}"))
            continue
        tail = f"/{class_dirs[label]}/{link_name(image_id, path, image_ext)}"
        jobs.append((source(path), out + ("valid" if image_id in held_out else "train") + tail))
        both.append((source(path), out + "train_valid" + tail))
    test = f"{out}test/{TEST_CLASS_DIR}/"
    jobs += both
    jobs += [(source(path), test + link_name(i, path, image_ext)) for i, path in download.test_paths.items()]
    return mode, _link_all(jobs, mode, pool)


# ---------------------------------------------------------------- the stage


@dataclass(frozen=True)
class ReorgResult:
    work_dir: Path
    info: dict
    skipped: bool  # the tree was already complete and up to date
    seconds: float


def _swap_in(staging: Path, work_dir: Path, names: list[str]) -> None:
    """Replace each ``work_dir/name`` by ``staging/name``; the old ones go to a trash folder."""
    trash = work_dir / TRASH_DIR
    shutil.rmtree(trash, ignore_errors=True)
    trash.mkdir()
    for name in names:
        if (work_dir / name).exists() or (work_dir / name).is_symlink():
            os.replace(work_dir / name, trash / name)
        os.replace(staging / name, work_dir / name)
    _remove_tree(trash)
    shutil.rmtree(staging, ignore_errors=True)


def _remove_tree(root: Path) -> None:
    """rmtree, one thread per split folder: a replaced tree has 100,000 links to unlink."""
    with os.scandir(root) as entries:
        parts = [Path(e.path) for e in entries if e.is_dir(follow_symlinks=False)]
    with ThreadPoolExecutor(max_workers=_fs_threads()) as pool:
        list(pool.map(lambda part: shutil.rmtree(part, ignore_errors=True), parts))
    shutil.rmtree(root, ignore_errors=True)


def _is_current(work_dir: Path, digest: str) -> dict | None:
    """The existing reorg.json when it describes a complete tree of these inputs."""
    path = work_dir / REORG_FILE
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    trees = SPLITS if info.get("task", "single") == "single" else (IMAGES_DIR,)
    complete = all((work_dir / s).is_dir() for s in (*trees, "test"))
    return info if complete and info.get("fingerprint") == digest else None


def check_work_dir(raw_dir: Path, work_dir: Path) -> None:
    raw, work = raw_dir.resolve(), work_dir.resolve()
    if not raw_dir.is_dir():
        raise PipelineError(f"RAW_DIR {raw_dir} is not a folder; unzip the Kaggle download there first")
    if work == raw or raw in work.parents or work in raw.parents:
        raise PipelineError(f"WORK_DIR {work_dir} overlaps RAW_DIR {raw_dir}; choose a separate folder (the download is never modified)")


def reorg(comp: Competition, raw_dir: Path, work_dir: Path, valid_ratio: float = 0.1,
          folds: int = 5, seed: int = 0, force: bool = False) -> ReorgResult:
    """Build (or confirm up to date) the class-folder trees of ``comp`` in ``work_dir``.

    The download is scanned once; when its fingerprint (spec, options, CSV
    bytes, every image's size and mtime) matches the tree's reorg.json, nothing
    else is read.
    """
    start = time.perf_counter()
    raw_dir, work_dir = Path(raw_dir), Path(work_dir)
    check_work_dir(raw_dir, work_dir)
    with made_folder(work_dir), exclusive_lock(work_dir / LOCK_FILE, f"WORK_DIR {work_dir}"):
        _remove_leftovers(work_dir)
        scans = scan_download(comp, raw_dir)
        params = {"valid_ratio": valid_ratio, "folds": folds, "seed": seed}
        digest = fingerprint(comp, raw_dir, params, scans)
        current = None if force else _is_current(work_dir, digest)
        if current is not None:
            return ReorgResult(work_dir, current, skipped=True, seconds=time.perf_counter() - start)
        from pipeline.download.duplicates import warn_duplicates
        from pipeline.download.items_table import split_frame

        download = read_download(comp, raw_dir, scans)
        plan = plan_split(split_frame(download, folds), valid_ratio, folds, seed, download.given_valid,
                          groups=download.labels.get("group"))
        with ThreadPoolExecutor(max_workers=1) as side:
            checked = None
            if not comp.group_column:  # a group keeps its copies on one side; without one, say where copies straddle
                # read and hashed beside the links being made: each waits on the file system, not on the other
                sizes, paths = file_sizes(scans), {i: download.train_paths[i] for i in plan.labels["id"]}
                checked = side.submit(warn_duplicates, {i: f"{raw_dir}/{p}" for i, p in paths.items()},
                                      plan.valid_ids, plan.folds, {i: sizes[p] for i, p in paths.items() if p in sizes})
            info = _build(comp, raw_dir, work_dir, plan, download, params, digest)
            if checked is not None:
                checked.result()
    return ReorgResult(work_dir, info, skipped=False, seconds=time.perf_counter() - start)


def _remove_leftovers(work_dir: Path) -> None:
    """Remove what a killed reorg left: a half-built staging tree, a half-emptied trash.

    Called with the lock held, so no other reorg is using them.
    """
    for name in (STAGING_DIR, TRASH_DIR):
        shutil.rmtree(work_dir / name, ignore_errors=True)
    remove_stale_temps(work_dir / REORG_FILE)


def _stage(comp: Competition, raw_dir: Path, plan: SplitPlan, download: Download,
           staging: Path) -> tuple[str, list[str]]:
    """The whole new tree in ``staging``; returns the link mode and the names to swap in."""
    import pandas as pd

    from pipeline.download.items_table import write_items

    with ThreadPoolExecutor(max_workers=_fs_threads()) as pool:
        mode, linking = materialize(plan, download, raw_dir, comp.image_ext, staging, pool)
        # the tables are written while the links are made
        shutil.copyfile(raw_dir / comp.sample_submission, staging / SAMPLE_FILE)
        trees = [*SPLITS] if download.task.kind == "single" else [IMAGES_DIR]
        names = [*trees, "test", SAMPLE_FILE, *write_items(plan, download, comp.image_ext, staging)]
        if plan.folds is not None:
            frame = pd.DataFrame({"id": plan.labels["id"], "label": plan.labels["label"],
                                  "fold": plan.folds.to_numpy()})
            frame.to_csv(staging / FOLDS_FILE, index=False)
            names.append(FOLDS_FILE)
        for part in linking:
            part.result()  # the first error, raised here
    return mode, names


def _build(comp: Competition, raw_dir: Path, work_dir: Path, plan: SplitPlan, download: Download,
           params: dict, digest: str) -> dict:
    staging = work_dir / STAGING_DIR
    swapping = False
    try:
        mode, names = _stage(comp, raw_dir, plan, download, staging)
        # Up to here a failure leaves the previous tree complete; from here on
        # it is not, until the new reorg.json says otherwise.
        swapping = True
        (work_dir / REORG_FILE).unlink(missing_ok=True)
        if plan.folds is None:
            (work_dir / FOLDS_FILE).unlink(missing_ok=True)
        _swap_in(staging, work_dir, names)
        for stale in sorted({*SPLITS, IMAGES_DIR} - set(names)):  # the trees of another task kind
            shutil.rmtree(work_dir / stale, ignore_errors=True)
        if TEST_ITEMS_FILE not in names:
            (work_dir / TEST_ITEMS_FILE).unlink(missing_ok=True)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        state = "WORK_DIR is incomplete until a reorg succeeds" if swapping else "the previous tree is unchanged"
        raise PipelineError(f"{os_error_message(exc, work_dir, 'write the tree in')} ({state})") from exc
    info = _info(comp, plan, download, params, mode, digest)
    atomic_write_json(work_dir / REORG_FILE, info)
    return info


def _info(comp: Competition, plan: SplitPlan, download: Download, params: dict, mode: str, digest: str) -> dict:
    """reorg.json: what pipeline.data.items reads (classes, class_dirs, image_ext) and what the tree came from."""
    n_valid = len(plan.valid_ids)
    return {
        "competition": comp.slug,
        "classes": download.classes,
        **download.task.to_json(),
        **({"metadata": list(comp.metadata)} if comp.metadata else {}),
        **({"group_column": comp.group_column} if comp.group_column else {}),
        "class_dirs": [class_dir_name(c) for c in download.classes] if download.task.kind == "single" else [],
        "image_ext": comp.image_ext,
        "counts": {"train": len(plan.labels) - n_valid, "valid": n_valid,
                   "train_valid": len(plan.labels), "test": len(download.test_paths)},
        **params,
        "layout": comp.layout,
        "valid_source": "random" if download.given_valid is None else "valid_dir",
        "link_mode": mode,
        "fingerprint": digest,
        "format_version": FORMAT_VERSION,
    }


def __getattr__(name: str):
    """The split functions, re-exported here without importing numpy when the module loads."""
    if name in ("stratified_folds", "valid_counts"):
        from pipeline.download import splits

        return getattr(splits, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
