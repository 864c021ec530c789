"""Where the images of a Kaggle download are, as its Competition spec says.

The layouts (csv, folders) and test listings are described on
:class:`pipeline.competition.Competition`. Ids are kept as the exact strings of
the CSV or the file name: "007" matches ``007.png``, never ``7.png``.

A scan (:func:`scan_download`) lists the folders once, with each file's size
and mtime, so that reorg can tell an unchanged download without reading it
again; :func:`read_download` then turns a scan into ids, labels and files.
"""
from __future__ import annotations

import dataclasses
import logging
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.competition import Competition
from pipeline.errors import PipelineError
from pipeline.io import read_csv
from pipeline.download.scan import Folder
from pipeline.download.targets import TaskInfo, names_labels, targets_of
from pipeline.workdir import META_PREFIX

if TYPE_CHECKING:  # pandas loads only where a tree is planned: a no-op reorg starts fast
    import pandas as pd

log = logging.getLogger("pipeline")

# The spec fields a reorg depends on: part of its fingerprint
LAYOUT_FIELDS = ("slug", "layout", "labels_file", "id_column", "label_column", "sample_submission", "submission",
                 "train_dir", "valid_dir", "test_dir", "test_file", "path_column", "image_ext", "positive_label")
# issue 22's fields count only when set: a work folder of a spec without them keeps its fingerprint
TASK_FIELDS = ("task", "label_columns", "label_separator", "label_pattern", "group_column", "metadata")
_BAD_ID = r"[/\\\x00]|\.\."  # a separator, NUL or '..' could escape a folder


@dataclass(frozen=True)
class Download:
    """What reorg needs from a download: labelled ids, test ids, their files, the classes."""

    labels: pd.DataFrame  # columns id, label (strings), in the download's order
    train_paths: dict[str, str]  # id -> image path relative to RAW_DIR (train and given valid)
    test_paths: dict[str, str]  # id -> image path relative to RAW_DIR
    given_valid: frozenset[str] | None  # the ids of valid_dir, or None for a random split
    classes: list[str]  # in submission order: classes, labels, or the target column
    links: frozenset[str] = frozenset()  # image paths (relative to RAW_DIR) that are links: reorg links their targets
    task: TaskInfo = TaskInfo("single", [], [])
    test_meta: pd.DataFrame | None = None  # id and the metadata columns of the test images (metadata only)


# ---------------------------------------------------------------- scanning


def layout_spec(comp: Competition) -> dict:
    """The spec fields a reorg depends on, for its fingerprint (the task fields only when set)."""
    spec = {name: getattr(comp, name) for name in LAYOUT_FIELDS}
    defaults = {f.name: f.default for f in dataclasses.fields(Competition)}
    spec.update({name: getattr(comp, name) for name in TASK_FIELDS if getattr(comp, name) != defaults[name]})
    return spec


def input_files(comp: Competition) -> list[str]:
    """The download's CSV files that the spec reads."""
    return [name for name in (comp.labels_file, comp.test_file, comp.sample_submission) if name]


# ---------------------------------------------------------------- CSV files


def check_id(image_id: str, where: str) -> None:
    """Reject ids that could escape a folder or name no file."""
    if not image_id:
        raise PipelineError(f"{where}: empty id; every row needs an id")
    if any(c in image_id for c in ("/", "\\", "\0")) or ".." in image_id or image_id == ".":
        raise PipelineError(f"{where}: id {image_id!r} contains a path separator, NUL or '..'; fix the row")


def _check_ids(ids: pd.Series, path: Path) -> None:
    """check_id on a column at once; the first bad row is named."""
    import numpy as np
    bad = (ids == "") | (ids == ".") | ids.str.contains(_BAD_ID, regex=True)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        check_id(ids.iloc[row], f"{path} row {row + 2}")


def _check_unique(ids: pd.Series, path: Path, labels: pd.Series | None = None) -> None:
    import numpy as np
    dup = ids.duplicated(keep=False)
    if dup.any():
        first = ids[dup].iloc[0]
        rows = [i + 2 for i in np.flatnonzero(ids.to_numpy() == first)]
        seen = f" (labels {sorted(set(labels[ids == first]))})" if labels is not None else ""
        raise PipelineError(f"{path}: id {first!r} appears on rows {', '.join(map(str, rows))}{seen}; keep one row per id")


def _read_columns(path: Path, what: str, columns: dict[str, str]) -> pd.DataFrame:
    """The named columns of a CSV, renamed (``{file column: new name}``) and stripped."""
    frame = read_csv(path, what=what)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise PipelineError(
            f"{path}: no column {', '.join(map(repr, missing))}; columns found: {', '.join(map(repr, frame.columns))}"
        )
    frame = frame[list(columns)].set_axis(list(columns.values()), axis=1)
    return frame.apply(lambda col: col.str.strip())


def _listing_columns(comp: Competition, labelled: bool) -> dict[str, str]:
    columns = {comp.id_column: "id"}
    if labelled:
        if comp.label_column:
            columns[comp.label_column] = "label"
        columns.update({c: c for c in comp.label_columns})
        if comp.group_column:
            columns.setdefault(comp.group_column, "group")
    columns.update({c: META_PREFIX + c for c in comp.metadata if c not in columns})
    if comp.path_column:
        columns.setdefault(comp.path_column, "path")
    return columns


def read_labels(comp: Competition, raw_dir: Path, with_paths: bool = False) -> pd.DataFrame:
    """The labels CSV as string columns ``id``, ``label`` (and ``path``), validated."""
    import numpy as np
    import pandas as pd
    path = raw_dir / comp.labels_file
    frame = _read_columns(path, "labels file", _listing_columns(comp, labelled=True))
    if comp.path_column == comp.id_column:
        frame["path"] = frame["id"]
    _check_ids(frame["id"], path)
    empty = frame["label"] == "" if "label" in frame.columns else pd.Series(False, index=frame.index)
    if comp.task == "multilabel":  # an image with no tags is a valid row
        empty[:] = False
    if empty.any():
        row = int(np.flatnonzero(empty.to_numpy())[0])
        raise PipelineError(f"{path} row {row + 2}: id {frame['id'].iloc[row]!r} has an empty label; "
                            "fill it in or drop the row")
    _check_unique(frame["id"], path, frame["label"] if "label" in frame.columns else None)
    frame = frame.reset_index(drop=True)
    return frame if with_paths and comp.path_column else frame.drop(columns="path", errors="ignore")


def read_sample(comp: Competition, raw_dir: Path) -> tuple[list[str], list[str]]:
    """The sample submission's ids (in order) and its column names; the id column is found by name."""
    path = raw_dir / comp.sample_submission
    frame = read_csv(path, what="sample submission")
    if comp.id_column not in frame.columns:
        raise PipelineError(f"{path}: no id column {comp.id_column!r}; columns found: "
                            f"{', '.join(map(repr, frame.columns))}; use the competition's sample submission")
    ids = frame[comp.id_column].str.strip()
    if ids.duplicated().any():
        raise PipelineError(f"{path}: id {ids[ids.duplicated()].iloc[0]!r} appears twice; "
                            "download the sample submission again")
    return ids.tolist(), list(frame.columns)


# ---------------------------------------------------------------- ids -> files


def _join(folder: str, rel: str) -> str:
    return rel if folder == "." else f"{folder}/{rel}"


def _stem_index(folder: Folder, ext: str) -> dict[str, str]:
    """id -> file of every ``<id><ext>`` directly in ``folder`` (ext matched case-insensitively)."""
    low, n = ext.lower(), len(ext)
    found: dict[str, str] = {}
    for name in folder.files:
        if (name.endswith(ext) or name[-n:].lower() == low) and len(name) > n and "/" not in name:
            image_id = name[:-n]
            if image_id in found:
                raise PipelineError(f"{folder.rel}: {found[image_id]} and {name} share the id {image_id!r}; keep one")
            found[image_id] = name
    return found


def _clean_path(path: str, where: str) -> str:
    """A CSV path as a relative "/" path inside its folder, or an error."""
    norm = posixpath.normpath(path.replace("\\", "/")) if path else ""
    if not norm or norm == "." or norm.startswith(("/", "../")) or norm == "..":
        raise PipelineError(f"{where}: path {path!r} is empty or leaves its folder; fix the row")
    return norm


def _match(comp: Competition, folder: Folder, frame: pd.DataFrame, csv: Path,
           index: dict[str, str] | None = None) -> dict[str, str]:
    """id -> path relative to RAW_DIR for every row of ``frame``; an id without its file is an error.

    ``index`` is the folder's :func:`_stem_index` when the caller has it already.
    """
    ids = frame["id"].tolist()
    if "path" in frame.columns:
        present = set(folder.files)
        rels = [_clean_path(p, f"{csv} row {i + 2}") for i, p in enumerate(frame["path"].tolist())]
        wanted = dict(zip(ids, rels))
        missing = [i for i, rel in wanted.items() if rel not in present]
        shown = lambda i: wanted[i]  # noqa: E731
    else:
        index = _stem_index(folder, comp.image_ext) if index is None else index
        wanted = {i: index.get(i, "") for i in ids}
        missing = [i for i, name in wanted.items() if not name]
        shown = lambda i: f"{i}{comp.image_ext}"  # noqa: E731
    if missing:
        raise PipelineError(
            f"{csv}: id {missing[0]!r} has no image {_join(folder.rel, shown(missing[0]))} "
            f"({len(missing)} such ids); restore the images or drop those rows"
        )
    return {i: _join(folder.rel, rel) for i, rel in wanted.items()}


def _class_folders(comp: Competition, folder: Folder, raw_dir: Path) -> pd.DataFrame:
    """id, label, path of every ``<class>/<name><image_ext>`` in ``folder``, sorted by path."""
    import pandas as pd
    ext, n = comp.image_ext.lower(), len(comp.image_ext)
    rows = []
    for rel in folder.files:  # sorted by the scan
        if not (len(rel) > n and rel[-n:].lower() == ext):
            continue
        label, _, name = rel.rpartition("/")
        if not label:
            raise PipelineError(f"{raw_dir / folder.rel / rel} is not in a class folder; layout 'folders' "
                                f"expects {folder.rel}/<class>/<image>: move it or remove it")
        rows.append((name[:-n], label, _join(folder.rel, rel)))
    frame = pd.DataFrame(rows, columns=["id", "label", "path"])
    if frame.empty:
        raise PipelineError(f"{raw_dir / folder.rel} has no <class>/*{comp.image_ext} images; "
                            "unzip the training set there")
    dup = frame["id"].duplicated(keep=False)
    if dup.any():
        first = frame.loc[dup, "id"].iloc[0]
        a, b = frame.loc[frame["id"] == first, "path"].iloc[:2]
        raise PipelineError(f"{raw_dir / a} and {raw_dir / b} share the id {first!r}; "
                            "ids must be unique across classes: keep one")
    return frame


def _train_side(comp: Competition, raw_dir: Path, scans: dict[str, Folder]):
    """(labels, id -> path, given valid ids or None) of the labelled images."""
    import pandas as pd
    if comp.layout == "folders":
        frame = _class_folders(comp, scans["train"], raw_dir)
        given = None
        if "valid" in scans:
            valid = _class_folders(comp, scans["valid"], raw_dir)
            both = frame["id"][frame["id"].isin(set(valid["id"]))]
            if len(both):
                raise PipelineError(f"id {both.iloc[0]!r} is in both {raw_dir / comp.train_dir} and "
                                    f"{raw_dir / comp.valid_dir} ({len(both)} such ids); keep each image in one split")
            frame, given = pd.concat([frame, valid], ignore_index=True), frozenset(valid["id"])
        return frame[["id", "label"]], dict(zip(frame["id"].tolist(), frame["path"].tolist())), given
    if comp.layout == "names":
        index = _stem_index(scans["train"], comp.image_ext)
        if not index:
            raise PipelineError(f"{raw_dir / comp.train_dir} has no *{comp.image_ext} images; unzip the training set there")
        labels = names_labels(comp, index, raw_dir / comp.train_dir)
        return labels, {i: _join(scans["train"].rel, name) for i, name in index.items()}, None
    labels = read_labels(comp, raw_dir, with_paths=True)
    if comp.path_column:
        paths = _match(comp, scans["train"], labels, raw_dir / comp.labels_file)
        return labels.drop(columns="path"), paths, None
    index = _stem_index(scans["train"], comp.image_ext)
    paths = _match(comp, scans["train"], labels, raw_dir / comp.labels_file, index)
    if comp.train_dir != comp.test_dir:
        _check_no_unlabelled(comp, raw_dir, index, paths)
    return labels, paths, None


def _check_no_unlabelled(comp: Competition, raw_dir: Path, index: dict[str, str], paths: dict[str, str]) -> None:
    """A train folder of its own holds only labelled images: an extra one means a wrong labels file."""
    if len(index) == len(paths):  # every id matched a file of the index, so none is left over
        return
    extra = sorted(set(index) - set(paths))
    if extra:
        name = index[extra[0]]
        raise PipelineError(
            f"{raw_dir / comp.train_dir / name} has no row in {comp.labels_file} "
            f"({len(extra)} such images); add the rows or remove the images"
        )


def _test_side(comp: Competition, raw_dir: Path, folder: Folder, sample_ids: list[str],
               meta: list | None = None) -> dict[str, str]:
    """id -> path of every test image; the ids must be exactly the sample submission's. With ``meta`` (a
    list), the test file's id and metadata columns are appended to it."""
    if comp.test_file:
        csv = raw_dir / comp.test_file
        frame = _read_columns(csv, "test file", _listing_columns(comp, labelled=False))
        if comp.path_column == comp.id_column:
            frame["path"] = frame["id"]
        _check_ids(frame["id"], csv)
        _check_unique(frame["id"], csv)
        paths, against = _match(comp, folder, frame, csv), csv
        if meta is not None:
            meta.append(frame.drop(columns="path", errors="ignore"))
    else:
        index = _stem_index(folder, comp.image_ext)
        if not index:
            raise PipelineError(f"{raw_dir / comp.test_dir} has no *{comp.image_ext} images; unzip the test set there")
        paths, against = {i: _join(folder.rel, name) for i, name in index.items()}, raw_dir / comp.test_dir
    missing = [i for i in sample_ids if i not in paths]
    extra = sorted(set(paths) - set(sample_ids))
    if missing or extra:
        first = (f"id {missing[0]!r} has no test image" if missing
                 else f"test image {posixpath.basename(paths[extra[0]])!r} is not listed")
        raise PipelineError(
            f"{raw_dir / comp.sample_submission} disagrees with {against}: {first} "
            f"({len(missing)} ids without image, {len(extra)} images not listed); use the matching download"
        )
    return {i: paths[i] for i in sample_ids}


def binary_classes(comp: Competition, labels: list[str], sample_columns: list[str], where: Path | str) -> list[str]:
    """[other, positive] of a binary competition: positive_label, else "1" or "true"; one sample column."""
    columns = [c for c in sample_columns if c != comp.id_column]
    positive = comp.positive_label or next((c for c in labels if c.lower() in ("1", "true")), "")
    if len(columns) != 1 or len(labels) != 2 or positive not in labels:
        raise PipelineError(f"{where}: submission 'binary' needs one probability column beside {comp.id_column!r} "
                            f"(found {columns[:5]}) and two labels (found {labels[:5]}), one of them the "
                            f"positive_label {positive!r}: set submission or positive_label in the competition spec")
    return [c for c in labels if c != positive] + [positive]


def class_list(comp: Competition, labels: pd.DataFrame, sample_columns: list[str], sample_path: Path) -> list[str]:
    """Classes in submission order: the sample's class columns, binary [other, positive], or sorted labels."""
    if comp.submission != "probs":
        found = sorted(labels["label"].unique())
        return binary_classes(comp, found, sample_columns, sample_path) if comp.submission == "binary" else found
    classes = [c for c in sample_columns if c != comp.id_column]
    unknown = sorted(set(labels["label"]) - set(classes))
    if unknown:
        raise PipelineError(
            f"label {unknown[0]!r} is not a column of {sample_path} ({len(unknown)} such labels); "
            "check the labels file against the sample submission"
        )
    return classes


def read_download(comp: Competition, raw_dir: Path, scans: dict[str, Folder]) -> Download:
    """Ids, labels, files and classes of a scanned download; any inconsistency is a one-line error."""
    labels, train_paths, given = _train_side(comp, raw_dir, scans)
    sample_ids, sample_columns = read_sample(comp, raw_dir)
    labels, task = targets_of(comp, labels, raw_dir / (comp.labels_file or comp.train_dir), sample_columns)
    _check_two_classes(comp, raw_dir, labels)
    meta: list = []
    test_paths = _test_side(comp, raw_dir, scans["test"], sample_ids, meta if comp.metadata else None)
    if comp.train_dir == comp.test_dir:
        _warn_unlisted(comp, scans["train"], train_paths, test_paths)
    classes = task.names or class_list(comp, labels, sample_columns, raw_dir / comp.sample_submission)
    links = frozenset(_join(f.rel, rel) for f in scans.values() for rel in f.links)
    return Download(labels, train_paths, test_paths, given, classes, links, task, meta[0] if meta else None)


def _check_two_classes(comp: Competition, raw_dir: Path, labels: pd.DataFrame) -> None:
    """A classifier needs two classes: one label everywhere means a cut or wrong labels file."""
    if comp.task == "multilabel":
        return
    found = labels["label"].unique()
    if len(found) < 2:
        source = raw_dir / (comp.labels_file or comp.train_dir)
        raise PipelineError(f"{source}: every one of its {len(labels)} images has the label {found[0]!r}; "
                            f"a {'classifier needs at least two classes' if comp.task == 'single' else 'model needs at least two target values'}: use the full labels file")


def _warn_unlisted(comp: Competition, folder: Folder, train: dict[str, str], test: dict[str, str]) -> None:
    """Train and test share a folder: images that neither CSV lists are left out, with a warning."""
    ext = comp.image_ext.lower()
    listed = {p for p in (*train.values(), *test.values())}
    unlisted = [f for f in folder.files if f.lower().endswith(ext) and _join(folder.rel, f) not in listed]
    if unlisted:
        log.warning("%d images in %s are in neither %s nor %s and are left out (e.g. %s)", len(unlisted),
                    comp.train_dir, comp.labels_file or comp.train_dir, comp.test_file, unlisted[0])
