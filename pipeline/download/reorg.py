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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from pipeline.competition import Competition
from pipeline.errors import PipelineError
from pipeline.io import atomic_write_json, exclusive_lock, made_folder, os_error_message, remove_stale_temps
from pipeline.download.layout import LAYOUT_FIELDS, Download, Folder, input_files, read_download
from pipeline.download.scan import scan_download
from pipeline.workdir import FOLDS_FILE, LOCK_FILE, REORG_FILE, SAMPLE_FILE, SPLITS, TEST_CLASS_DIR

if TYPE_CHECKING:  # numpy and pandas load only where a tree is planned: a no-op reorg starts fast
    import numpy as np
    import pandas as pd

log = logging.getLogger("pipeline")

FORMAT_VERSION = 2  # part of the fingerprint: bump when the split algorithm changes
STAGING_DIR, TRASH_DIR = ".staging", ".trash"  # the next tree, the replaced one (inside WORK_DIR)
MAX_DIR_NAME = 200  # bytes of a class folder name, under every file system's 255


@dataclass(frozen=True)
class SplitPlan:
    """Which labelled id goes where; computed without touching the disk."""

    labels: pd.DataFrame  # columns id, label (strings), in labels-file order
    valid_ids: frozenset[str]
    folds: pd.Series | None  # id -> fold number, or None without CV

    def split_of(self, image_id: str) -> str:
        return "valid" if image_id in self.valid_ids else "train"


# ---------------------------------------------------------------- naming


def class_dir_name(label: str) -> str:
    """A folder name for a class that stays inside its parent whatever the label.

    Percent-encoding keeps names distinct and free of separators; a leading dot
    is encoded so no class folder is hidden or '..'. Names that would pass the
    file-system limit (255 bytes) are cut and end in a digest of the label.
    """
    name = quote(label, safe=" _-+,()'&=@")
    name = "%2E" + name[1:] if name.startswith(".") else name
    if len(name) > MAX_DIR_NAME:
        name = name[: MAX_DIR_NAME - 17] + "~" + hashlib.sha256(label.encode()).hexdigest()[:16]
    return name


# ---------------------------------------------------------------- planning


def valid_counts(class_sizes: pd.Series, valid_ratio: float, rng: np.random.Generator) -> pd.Series:
    """How many images of each class go to valid (largest-remainder rounding).

    The total is round(N * valid_ratio) and each class gets its share rounded
    down or up; a class with n >= 2 images keeps at least one in train, a class
    of one stays in train. Plain per-class rounding would send nothing to valid
    when classes are small (dog breeds in a sample: 1-4 images each).
    """
    import numpy as np
    cap = (class_sizes - 1).clip(lower=0)
    quota = class_sizes * valid_ratio
    counts = np.minimum(np.floor(quota), cap).astype(int)
    spare = int(min(round(class_sizes.sum() * valid_ratio), cap.sum())) - int(counts.sum())
    if spare > 0:
        # random tie-break, then the largest fractional parts first
        order = np.lexsort((rng.random(len(quota)), -(quota - np.floor(quota)).to_numpy()))
        for i in order:
            if spare == 0:
                break
            if counts.iloc[i] < cap.iloc[i]:
                counts.iloc[i] += 1
                spare -= 1
    return counts


def plan_split(labels: pd.DataFrame, valid_ratio: float, folds: int, seed: int,
               given_valid: frozenset[str] | None = None) -> SplitPlan:
    """Stratified holdout split and stratified K folds, deterministic in ``seed``.

    Valid sizes per class come from :func:`valid_counts`; ``given_valid`` (the
    download's own validation split) replaces the random holdout. Folds come
    from :func:`stratified_folds` over all labelled images; a class with fewer
    images than folds is spread over as many folds as it has images, so some
    folds validate without it.
    """
    import numpy as np
    import pandas as pd
    if not 0 <= valid_ratio < 1:
        raise PipelineError(f"--valid-ratio must be in [0, 1), got {valid_ratio}")
    if given_valid is not None:
        return SplitPlan(labels=labels, valid_ids=given_valid, folds=plan_folds(labels, folds, seed))
    rng = np.random.default_rng(seed)
    groups = {label: np.sort(ids.to_numpy()) for label, ids in labels.groupby("label")["id"]}
    sizes = pd.Series({label: len(ids) for label, ids in groups.items()}).sort_index()
    counts = valid_counts(sizes, valid_ratio, rng)
    valid: list[str] = []
    for label, n_valid in counts.items():
        valid.extend(rng.permutation(groups[label])[:n_valid].tolist())
    return SplitPlan(labels=labels, valid_ids=frozenset(valid), folds=plan_folds(labels, folds, seed))


def stratified_folds(labels: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """The fold of each sample, as scikit-learn's StratifiedKFold(shuffle=True) assigns it.

    Classes are numbered by first appearance; dealing the class-sorted samples
    round-robin over the folds fixes how many of each class every fold gets;
    each class's fold numbers, in blocks, are then shuffled by one
    RandomState(seed) drawn class after class. Written out here (rather than
    calling scikit-learn, same result) because importing sklearn costs seconds.
    """
    import numpy as np
    rng = np.random.RandomState(seed)
    _, first_seen, inverse = np.unique(labels, return_index=True, return_inverse=True)
    order_of_class = np.argsort(np.argsort(first_seen))
    codes = order_of_class[inverse.reshape(-1)]
    n_classes = len(first_seen)
    dealt = np.sort(codes)
    per_fold = np.stack([np.bincount(dealt[f::n_folds], minlength=n_classes) for f in range(n_folds)])
    assignment = np.empty(len(codes), dtype=np.int64)
    for k in range(n_classes):
        blocks = np.repeat(np.arange(n_folds), per_fold[:, k])
        rng.shuffle(blocks)
        assignment[codes == k] = blocks
    return assignment


def plan_folds(labels: pd.DataFrame, folds: int, seed: int) -> pd.Series | None:
    """Fold number per id (in labels order), or None when ``folds`` < 2."""
    import pandas as pd
    if folds < 2:
        if folds not in (0, 1):
            raise PipelineError(f"--folds must be 0 (no CV) or >= 2, got {folds}")
        return None
    counts = labels["label"].value_counts()
    if folds > len(labels):
        raise PipelineError(f"--folds {folds} is more than the {len(labels)} labelled images; use fewer folds")
    if counts.max() < folds:
        raise PipelineError(
            f"--folds {folds}: no class has {folds} images (largest has {counts.max()}); use --folds {counts.max()} or fewer"
        )
    assignment = stratified_folds(labels["label"].to_numpy(), folds, seed)
    small = int((counts < folds).sum())
    if small:
        log.warning("%d classes have fewer than %d images: some folds validate without them", small, folds)
    return pd.Series(assignment, index=labels["id"].to_numpy(), name="fold")


# ---------------------------------------------------------------- writing


def fingerprint(comp: Competition, raw_dir: Path, params: dict, scans: dict[str, Folder]) -> str:
    """A digest of everything the tree depends on: the spec, options, CSV bytes, each image's size and mtime.

    Needs no parsing: on an unchanged download the no-op costs one scan.
    """
    spec = {name: getattr(comp, name) for name in LAYOUT_FIELDS}
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


def link_name(image_id: str, source: str, image_ext: str) -> str:
    """The file name of an image in WORK_DIR: its id and the source's own spelling of image_ext.

    Every name ends in image_ext (any case), so pipeline.data.items reads the id back
    exactly: ``abc.jpg`` listed by path becomes ``abc.jpg.jpg``, id ``abc.jpg``.
    """
    suffix = source[-len(image_ext):]
    return image_id + (suffix if suffix.lower() == image_ext.lower() else image_ext)


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


def _link_all(jobs: list[tuple[str, str]], mode: str) -> None:
    """Create every link; a few threads overlap the file-system calls (they release the GIL)."""
    def run(chunk: list[tuple[str, str]]) -> None:
        for src, dst in chunk:
            _place(mode, src, dst)

    workers = min(4, os.cpu_count() or 1)
    size = max(1024, -(-len(jobs) // (4 * workers)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(run, [jobs[i : i + size] for i in range(0, len(jobs), size)]))


def materialize(plan: SplitPlan, download: Download, raw_dir: Path, image_ext: str, staging: Path) -> str:
    """Write the class-folder trees into ``staging``; returns the link mode used.

    Paths are plain strings: building 110,000 pathlib objects took longer than the links.
    """
    class_dirs = {c: class_dir_name(c) for c in download.classes}
    for split in SPLITS:
        for folder in class_dirs.values():
            (staging / split / folder).mkdir(parents=True)
    (staging / "test" / TEST_CLASS_DIR).mkdir(parents=True)
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
        tail = f"/{class_dirs[label]}/{link_name(image_id, path, image_ext)}"
        jobs.append((source(path), out + ("valid" if image_id in held_out else "train") + tail))
        both.append((source(path), out + "train_valid" + tail))
    test = f"{out}test/{TEST_CLASS_DIR}/"
    jobs += both
    jobs += [(source(path), test + link_name(i, path, image_ext)) for i, path in download.test_paths.items()]
    _link_all(jobs, mode)
    return mode


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
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        list(pool.map(lambda part: shutil.rmtree(part, ignore_errors=True), parts))
    shutil.rmtree(root, ignore_errors=True)


def _is_current(work_dir: Path, digest: str) -> dict | None:
    """The existing reorg.json when it describes a complete tree of these inputs."""
    path = work_dir / REORG_FILE
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    complete = all((work_dir / s).is_dir() for s in (*SPLITS, "test"))
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
        download = read_download(comp, raw_dir, scans)
        plan = plan_split(download.labels, valid_ratio, folds, seed, download.given_valid)
        info = _build(comp, raw_dir, work_dir, plan, download, params, digest)
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
    mode = materialize(plan, download, raw_dir, comp.image_ext, staging)
    shutil.copyfile(raw_dir / comp.sample_submission, staging / SAMPLE_FILE)
    names = [*SPLITS, "test", SAMPLE_FILE]
    if plan.folds is not None:
        frame = pd.DataFrame({"id": plan.labels["id"], "label": plan.labels["label"],
                              "fold": plan.folds.to_numpy()})
        frame.to_csv(staging / FOLDS_FILE, index=False)
        names.append(FOLDS_FILE)
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
        "class_dirs": [class_dir_name(c) for c in download.classes],
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
