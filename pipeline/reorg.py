"""Kaggle download -> WORK_DIR/{train,valid,train_valid}/<class>/ and test/unknown/.

The download is never modified: images are hard-linked (symlinked, then copied,
where links are impossible). The tree is built in a staging folder and swapped
in; ``reorg.json`` is written last and is the completion marker, so a run
killed half-way leaves no tree that claims to be complete. A lock file keeps a
second reorg of the same WORK_DIR out (it fails at once, naming the holder),
and the next run removes what a killed one left behind.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pandas as pd

from pipeline.competition import Competition
from pipeline.errors import PipelineError
from pipeline.io import atomic_write_json, exclusive_lock, os_error_message, read_csv, remove_stale_temps

log = logging.getLogger("pipeline")

SPLITS = ("train", "valid", "train_valid")
TEST_CLASS_DIR = "unknown"
REORG_FILE = "reorg.json"
FOLDS_FILE = "folds.csv"
SAMPLE_FILE = "sample_submission.csv"  # a copy of the download's, for predict and check
FORMAT_VERSION = 2  # part of the fingerprint: bump when the split algorithm changes
STAGING_DIR, TRASH_DIR = ".staging", ".trash"  # the next tree, the replaced one (inside WORK_DIR)
LOCK_FILE = ".reorg.lock"
MAX_DIR_NAME = 200  # bytes of a class folder name, under every file system's 255


@dataclass(frozen=True)
class SplitPlan:
    """Which labelled id goes where; computed without touching the disk."""

    labels: pd.DataFrame  # columns id, label (strings), in labels-file order
    valid_ids: frozenset[str]
    folds: pd.Series | None  # id -> fold number, or None without CV

    def split_of(self, image_id: str) -> str:
        return "valid" if image_id in self.valid_ids else "train"


# ---------------------------------------------------------------- reading input


def check_id(image_id: str, where: str) -> None:
    """Reject ids that could escape a folder or name no file."""
    if not image_id:
        raise PipelineError(f"{where}: empty id; every row needs an id")
    if any(c in image_id for c in ("/", "\\", "\0")) or ".." in image_id or image_id == ".":
        raise PipelineError(f"{where}: id {image_id!r} contains a path separator, NUL or '..'; fix the row")


def read_labels(comp: Competition, raw_dir: Path) -> pd.DataFrame:
    """The labels CSV as a frame of string columns ``id`` and ``label``, validated."""
    path = raw_dir / comp.labels_file
    frame = read_csv(path, what="labels file")
    missing = [c for c in (comp.id_column, comp.label_column) if c not in frame.columns]
    if missing:
        raise PipelineError(
            f"{path}: no column {', '.join(map(repr, missing))}; columns found: {', '.join(map(repr, frame.columns))}"
        )
    frame = frame[[comp.id_column, comp.label_column]].rename(
        columns={comp.id_column: "id", comp.label_column: "label"}
    )
    frame = frame.apply(lambda col: col.str.strip())
    for row, (image_id, label) in enumerate(frame.itertuples(index=False), start=2):
        check_id(image_id, f"{path} row {row}")
        if not label:
            raise PipelineError(f"{path} row {row}: id {image_id!r} has an empty label; fill it in or drop the row")
    dup = frame["id"].duplicated(keep=False)
    if dup.any():
        first = frame.loc[dup, "id"].iloc[0]
        rows = [i + 2 for i in np.flatnonzero(frame["id"].to_numpy() == first)]
        labels = sorted(set(frame.loc[frame["id"] == first, "label"]))
        raise PipelineError(
            f"{path}: id {first!r} appears on rows {', '.join(map(str, rows))} (labels {labels}); keep one row per id"
        )
    return frame.reset_index(drop=True)


def scan_images(folder: Path, ext: str) -> dict[str, str]:
    """Map id -> file name for every ``*<ext>`` file in ``folder`` (case-insensitive)."""
    if not folder.is_dir():
        raise PipelineError(f"image folder {folder} not found; point RAW_DIR at the unzipped Kaggle download")
    ext = ext.lower()
    found: dict[str, str] = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            name = entry.name
            if name.lower().endswith(ext) and len(name) > len(ext):
                image_id = name[: -len(ext)]
                if image_id in found:
                    raise PipelineError(f"{folder}: {found[image_id]} and {name} share the id {image_id!r}; keep one")
                found[image_id] = name
    return found


def read_sample_ids_and_columns(comp: Competition, raw_dir: Path) -> tuple[list[str], list[str]]:
    """The sample submission's ids (in order) and its column names."""
    path = raw_dir / comp.sample_submission
    frame = read_csv(path, what="sample submission", usecols=None)
    if frame.columns[0] != comp.id_column:
        raise PipelineError(f"{path}: first column is {frame.columns[0]!r}, expected {comp.id_column!r}")
    return frame[comp.id_column].str.strip().tolist(), list(frame.columns)


def class_list(comp: Competition, labels: pd.DataFrame, sample_columns: list[str], sample_path: Path) -> list[str]:
    """Classes in submission order: the sample's class columns, else sorted labels."""
    if comp.submission == "label":
        return sorted(labels["label"].unique())
    classes = sample_columns[1:]
    unknown = sorted(set(labels["label"]) - set(classes))
    if unknown:
        raise PipelineError(
            f"label {unknown[0]!r} is not a column of {sample_path} ({len(unknown)} such labels); "
            "check the labels file against the sample submission"
        )
    return classes


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


def plan_split(labels: pd.DataFrame, valid_ratio: float, folds: int, seed: int) -> SplitPlan:
    """Stratified holdout split and stratified K folds, deterministic in ``seed``.

    Valid sizes per class come from :func:`valid_counts`. Folds come from
    scikit-learn's StratifiedKFold over all labelled images; a class with fewer
    images than folds is spread over as many folds as it has images, so some
    folds validate without it.
    """
    if not 0 <= valid_ratio < 1:
        raise PipelineError(f"--valid-ratio must be in [0, 1), got {valid_ratio}")
    rng = np.random.default_rng(seed)
    groups = {label: np.sort(ids.to_numpy()) for label, ids in labels.groupby("label")["id"]}
    sizes = pd.Series({label: len(ids) for label, ids in groups.items()}).sort_index()
    counts = valid_counts(sizes, valid_ratio, rng)
    valid: list[str] = []
    for label, n_valid in counts.items():
        valid.extend(rng.permutation(groups[label])[:n_valid].tolist())
    return SplitPlan(labels=labels, valid_ids=frozenset(valid), folds=plan_folds(labels, folds, seed))


def plan_folds(labels: pd.DataFrame, folds: int, seed: int) -> pd.Series | None:
    """Fold number per id from StratifiedKFold, or None when ``folds`` < 2."""
    from sklearn.model_selection import StratifiedKFold

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
    assignment = pd.Series(-1, index=labels["id"], name="fold")
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class" is handled as documented
        for fold, (_, val_idx) in enumerate(splitter.split(np.zeros(len(labels)), labels["label"])):
            assignment.iloc[val_idx] = fold
    small = int((counts < folds).sum())
    if small:
        log.warning("%d classes have fewer than %d images: some folds validate without them", small, folds)
    return assignment


# ---------------------------------------------------------------- writing


def fingerprint(comp: Competition, raw_dir: Path, params: dict, train: dict, test: dict) -> str:
    """A digest of everything the tree depends on: options, label files, file names."""
    digest = hashlib.sha256(json.dumps([comp.slug, params, FORMAT_VERSION], sort_keys=True).encode())
    for name in (comp.labels_file, comp.sample_submission):
        digest.update((raw_dir / name).read_bytes())
    for listing in (train, test):
        digest.update("\0".join(sorted(listing.values())).encode())
    return digest.hexdigest()


def _link_mode(src: Path, probe_dir: Path) -> str:
    """'hardlink' where the file system allows it, else 'symlink', else 'copy'."""
    probe = probe_dir / ".link-probe"
    for mode, make in (("hardlink", os.link), ("symlink", os.symlink)):
        try:
            make(src.resolve() if mode == "symlink" else src, probe)
            probe.unlink()
            return mode
        except OSError:
            continue
    return "copy"


def _place(mode: str, src: Path, dst: Path) -> None:
    if mode == "hardlink":
        os.link(src, dst)
    elif mode == "symlink":
        os.symlink(src, dst)
    else:
        shutil.copy2(src, dst)


def _link_all(jobs: list[tuple[Path, Path]], mode: str) -> None:
    """Create every link; threads overlap the metadata syscalls."""
    def run(chunk: list[tuple[Path, Path]]) -> None:
        for src, dst in chunk:
            _place(mode, src, dst)

    chunks = [jobs[i : i + 2048] for i in range(0, len(jobs), 2048)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(run, chunks))


def materialize(plan: SplitPlan, classes: list[str], raw_train: Path, raw_test: Path,
                train_files: dict[str, str], test_files: dict[str, str], staging: Path) -> str:
    """Write the class-folder trees into ``staging``; returns the link mode used."""
    class_dirs = {c: class_dir_name(c) for c in classes}
    folders = {(s, d) for s in SPLITS for d in class_dirs.values()}
    for split, d in sorted(folders):
        (staging / split / d).mkdir(parents=True)
    (staging / "test" / TEST_CLASS_DIR).mkdir(parents=True)
    mode = _link_mode(raw_train / next(iter(train_files.values())), staging)
    src_train = raw_train.resolve() if mode == "symlink" else raw_train
    src_test = raw_test.resolve() if mode == "symlink" else raw_test
    jobs: list[tuple[Path, Path]] = []
    for image_id, label in plan.labels.itertuples(index=False):
        name = train_files[image_id]
        folder = class_dirs[label]
        jobs.append((src_train / name, staging / plan.split_of(image_id) / folder / name))
        jobs.append((src_train / name, staging / "train_valid" / folder / name))
    test_dir = staging / "test" / TEST_CLASS_DIR
    jobs.extend((src_test / name, test_dir / name) for name in test_files.values())
    _link_all(jobs, mode)
    return mode



# ---------------------------------------------------------------- the stage


@dataclass(frozen=True)
class ReorgResult:
    work_dir: Path
    info: dict
    skipped: bool  # the tree was already complete and up to date
    seconds: float


def _check_coverage(comp: Competition, raw_dir: Path, labels: pd.DataFrame, train_files: dict[str, str]) -> None:
    """Every labelled id has an image and every image has a label."""
    labelled = set(labels["id"])
    no_image = [i for i in labels["id"] if i not in train_files]
    if no_image:
        raise PipelineError(
            f"{raw_dir / comp.labels_file}: id {no_image[0]!r} has no image {comp.train_dir}/{no_image[0]}{comp.image_ext} "
            f"({len(no_image)} such ids); restore the images or drop those rows"
        )
    no_label = sorted(i for i in train_files if i not in labelled)
    if no_label:
        raise PipelineError(
            f"{raw_dir / comp.train_dir / train_files[no_label[0]]} has no row in {comp.labels_file} "
            f"({len(no_label)} such images); add the rows or remove the images"
        )


def _check_test(comp: Competition, raw_dir: Path, test_files: dict[str, str], sample_ids: list[str]) -> None:
    """The test folder holds exactly the sample submission's ids."""
    if not test_files:
        raise PipelineError(f"{raw_dir / comp.test_dir} has no *{comp.image_ext} images; unzip the test set there")
    sample_path = raw_dir / comp.sample_submission
    if len(set(sample_ids)) != len(sample_ids):
        dup = pd.Series(sample_ids)[pd.Series(sample_ids).duplicated()].iloc[0]
        raise PipelineError(f"{sample_path}: id {dup!r} appears twice; download the sample submission again")
    missing = [i for i in sample_ids if i not in test_files]
    extra = sorted(set(test_files) - set(sample_ids))
    if missing or extra:
        first = f"id {missing[0]!r} has no test image" if missing else f"test image {test_files[extra[0]]!r} is not listed"
        raise PipelineError(
            f"{sample_path} disagrees with {raw_dir / comp.test_dir}: {first} "
            f"({len(missing)} ids without image, {len(extra)} images not listed); use the matching download"
        )


def _swap_in(staging: Path, work_dir: Path, names: list[str]) -> None:
    """Replace each ``work_dir/name`` by ``staging/name``; the old ones go to a trash folder."""
    trash = work_dir / TRASH_DIR
    shutil.rmtree(trash, ignore_errors=True)
    trash.mkdir()
    for name in names:
        if (work_dir / name).exists() or (work_dir / name).is_symlink():
            os.replace(work_dir / name, trash / name)
        os.replace(staging / name, work_dir / name)
    shutil.rmtree(trash, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)


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
    """Build (or confirm up to date) the class-folder trees of ``comp`` in ``work_dir``."""
    start = time.perf_counter()
    raw_dir, work_dir = Path(raw_dir), Path(work_dir)
    check_work_dir(raw_dir, work_dir)
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PipelineError(os_error_message(exc, work_dir, "create")) from exc
    with exclusive_lock(work_dir / LOCK_FILE, f"WORK_DIR {work_dir}"):
        _remove_leftovers(work_dir)
        labels = read_labels(comp, raw_dir)
        train_files = scan_images(raw_dir / comp.train_dir, comp.image_ext)
        test_files = scan_images(raw_dir / comp.test_dir, comp.image_ext)
        _check_coverage(comp, raw_dir, labels, train_files)
        sample_ids, sample_columns = read_sample_ids_and_columns(comp, raw_dir)
        _check_test(comp, raw_dir, test_files, sample_ids)
        classes = class_list(comp, labels, sample_columns, raw_dir / comp.sample_submission)
        params = {"valid_ratio": valid_ratio, "folds": folds, "seed": seed}
        digest = fingerprint(comp, raw_dir, params, train_files, test_files)
        current = None if force else _is_current(work_dir, digest)
        if current is not None:
            return ReorgResult(work_dir, current, skipped=True, seconds=time.perf_counter() - start)
        plan = plan_split(labels, valid_ratio, folds, seed)
        info = _build(comp, raw_dir, work_dir, plan, classes, train_files, test_files, params, digest)
    return ReorgResult(work_dir, info, skipped=False, seconds=time.perf_counter() - start)


def _remove_leftovers(work_dir: Path) -> None:
    """Remove what a killed reorg left: a half-built staging tree, a half-emptied trash.

    Called with the lock held, so no other reorg is using them.
    """
    for name in (STAGING_DIR, TRASH_DIR):
        shutil.rmtree(work_dir / name, ignore_errors=True)
    remove_stale_temps(work_dir / REORG_FILE)


def _stage(comp: Competition, raw_dir: Path, plan: SplitPlan, classes: list[str],
           train_files: dict[str, str], test_files: dict[str, str], staging: Path) -> tuple[str, list[str]]:
    """The whole new tree in ``staging``; returns the link mode and the names to swap in."""
    mode = materialize(plan, classes, raw_dir / comp.train_dir, raw_dir / comp.test_dir,
                       train_files, test_files, staging)
    shutil.copyfile(raw_dir / comp.sample_submission, staging / SAMPLE_FILE)
    names = [*SPLITS, "test", SAMPLE_FILE]
    if plan.folds is not None:
        frame = pd.DataFrame({"id": plan.labels["id"], "label": plan.labels["label"],
                              "fold": plan.folds.loc[plan.labels["id"]].to_numpy()})
        frame.to_csv(staging / FOLDS_FILE, index=False)
        names.append(FOLDS_FILE)
    return mode, names


def _build(comp: Competition, raw_dir: Path, work_dir: Path, plan: SplitPlan, classes: list[str],
           train_files: dict[str, str], test_files: dict[str, str], params: dict, digest: str) -> dict:
    staging = work_dir / STAGING_DIR
    swapping = False
    try:
        mode, names = _stage(comp, raw_dir, plan, classes, train_files, test_files, staging)
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
    n_valid = len(plan.valid_ids)
    info = {
        "competition": comp.slug,
        "classes": classes,
        "class_dirs": [class_dir_name(c) for c in classes],
        "image_ext": comp.image_ext,
        "counts": {"train": len(plan.labels) - n_valid, "valid": n_valid,
                   "train_valid": len(plan.labels), "test": len(test_files)},
        **params,
        "link_mode": mode,
        "fingerprint": digest,
        "format_version": FORMAT_VERSION,
    }
    atomic_write_json(work_dir / REORG_FILE, info)
    return info
