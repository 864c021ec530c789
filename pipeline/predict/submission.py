"""Submission frames: built and checked in memory, written atomically.

Kaggle rejects, or silently mis-scores, a file whose ids, columns or values are
off; :func:`check_submission` names each such problem before anything is
written or uploaded.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.competition import Competition
from pipeline.errors import PipelineError
from pipeline.io import atomic_write_csv
from pipeline.metrics import clip_probs

PROB_FLOOR = 1e-6  # probability submissions: no class below this before renormalising (bounds the log loss)
SUM_TOLERANCE = 1e-3  # Kaggle rescales each probability row by its sum: rows this close to 1 are rounding
SUM_RULE = (f"rows summing to within {SUM_TOLERANCE:g} of 1 pass (rounding); Kaggle rescales every row by its sum, "
            "so others are scored rescaled, with a warning; a row summing to 0 cannot be rescaled and is refused")


def clean_probs(probs: np.ndarray) -> np.ndarray:
    """Rows that sum to 1, with every class at least PROB_FLOOR: what is submitted, and what the CV scores."""
    return clip_probs(np.nan_to_num(probs, nan=0.0), PROB_FLOOR)


def submission_clip(comp: Competition) -> float | None:
    """The probability floor the submission applies, hence the one its CV score must apply."""
    return PROB_FLOOR if comp.submission == "probs" else None


def positive_index(comp: Competition) -> int | None:
    """The positive class's index for roc_auc: second of a binary competition's classes, else None."""
    return 1 if comp.submission == "binary" else None


def class_difference(have: list[str], want: list[str]) -> str:
    """'' when both name the same classes, else a short account of the names that differ."""
    missing, extra = [c for c in want if c not in have], [c for c in have if c not in want]
    parts = [f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''} ({len(missing)})" if missing else "",
             f"unexpected {extra[:3]}{' ...' if len(extra) > 3 else ''} ({len(extra)})" if extra else ""]
    return ", ".join(p for p in parts if p)


def _prediction_column(comp: Competition, sample: pd.DataFrame) -> str:
    """The one prediction column of a tags, value or grade submission: submission_label_column when the
    sample has it, else the sample's only column beside the id."""
    others = [c for c in sample.columns if c != comp.id_column]
    if comp.submission_label_column in others:
        return comp.submission_label_column
    if len(others) != 1:
        raise PipelineError(f"submission {comp.submission!r} writes one column, but the sample submission has "
                            f"{others[:5]} beside {comp.id_column!r}; set submission_label_column to the right one")
    return others[0]


def _task_frame(comp: Competition, ids: list[str], outputs: np.ndarray, classes: list[str], sample: pd.DataFrame,
                task) -> pd.DataFrame:
    """The frame of the kinds other than single: tags, per-label probabilities, a number, a grade."""
    outputs = np.asarray(outputs, dtype=np.float64)
    if comp.submission == "probs":  # multilabel: one probability per label, rows do not sum to 1
        columns = [c for c in sample.columns if c != comp.id_column]
        differ = class_difference(list(classes), columns)
        if differ:
            raise PipelineError(f"the run's labels are not the sample submission's columns: {differ}; "
                                "predict with a run trained on this competition's data")
        frame = pd.DataFrame(np.clip(in_class_order(outputs, classes, columns), 0.0, 1.0), columns=columns)
        frame.insert(0, comp.id_column, ids)
        return frame
    column = _prediction_column(comp, sample)
    decided = task.decide(outputs)
    if comp.submission == "tags":
        names = np.asarray(classes)
        values = [" ".join(names[row > 0]) for row in decided]
    elif comp.submission == "grade":
        values = [int(task.grades[int(g)]) for g in decided.reshape(-1)]
    else:
        values = outputs[:, 0]
    return pd.DataFrame({comp.id_column: ids, column: values})


def build_submission(comp: Competition, ids: list[str], probs: np.ndarray, classes: list[str],
                     sample: pd.DataFrame, task=None) -> pd.DataFrame:
    """The submission frame, rows in the sample submission's order, class columns matched by name.

    ``classes`` names the columns of ``probs`` (the run's classes); they are
    written under the sample submission's column of the same name, never by
    position. ``task`` (pipeline/models/task.py, with its fitted thresholds) makes the decisions of the kinds other
    than single.
    """
    if task is not None and task.kind != "single":
        frame = _task_frame(comp, ids, probs, classes, sample, task)
    elif comp.submission == "label":
        frame = pd.DataFrame({comp.id_column: ids, comp.submission_label_column: np.asarray(classes)[probs.argmax(1)]})
    elif comp.submission == "binary":
        from pipeline.download.layout import binary_classes  # layout reads the download: only binary needs it here

        positive = binary_classes(comp, sorted(classes), list(sample.columns), "the sample submission")[1]
        column = [c for c in sample.columns if c != comp.id_column][0]
        probs = np.nan_to_num(np.asarray(probs, dtype=np.float64), nan=0.0)
        probs = probs / np.maximum(probs.sum(axis=1, keepdims=True), 1e-12)
        frame = pd.DataFrame({comp.id_column: ids, column: probs[:, list(classes).index(positive)]})
    else:
        columns = [c for c in sample.columns if c != comp.id_column]
        differ = class_difference(list(classes), columns)
        if differ:
            raise PipelineError(f"the run's classes are not the sample submission's class columns: {differ}; "
                                "predict with a run trained on this competition's data")
        frame = pd.DataFrame(in_class_order(clean_probs(probs), classes, columns), columns=columns)
        frame.insert(0, comp.id_column, ids)
    order = sample[comp.id_column]
    frame = frame.set_index(comp.id_column)
    missing = order[~order.isin(frame.index)]
    if len(missing):
        raise PipelineError(f"no prediction for test id {missing.iloc[0]!r} ({len(missing)} missing); rerun reorg")
    frame = frame.loc[order.to_numpy()].reset_index()
    return frame[[c for c in sample.columns if c in frame.columns]]  # the sample's column order, by name


def check_submission(comp: Competition, frame: pd.DataFrame, sample: pd.DataFrame,
                     classes: list[str] | None = None, grades: list[str] | None = None) -> list[str]:
    """Every problem Kaggle would reject ``frame`` for, worded for the user; [] when valid.

    Checks the columns, the id set and order against the sample submission,
    duplicates, and the values: known class names (when ``classes`` is given)
    for label submissions; numbers in [0, 1] whose rows sum to 1 for
    probability submissions; numbers in [0, 1] for binary ones.
    """
    found = []
    idc = comp.id_column
    if list(frame.columns) != list(sample.columns):
        missing = [c for c in sample.columns if c not in frame.columns]
        extra = [c for c in frame.columns if c not in sample.columns]
        if missing or extra:
            found.append(f"columns differ from the sample submission: missing {missing[:5]}, unexpected {extra[:5]}")
        else:
            found.append("columns are not in the sample submission's order")
    if idc not in frame.columns:
        return found + [f"no {idc!r} column"]
    ids = frame[idc].astype(str)
    expected = sample[idc].astype(str)
    dup = ids[ids.duplicated()]
    if len(dup):
        found.append(f"id {dup.iloc[0]!r} appears more than once ({len(dup)} duplicates)")
    missing_ids = expected[~expected.isin(ids)]
    if len(missing_ids):
        found.append(f"id {missing_ids.iloc[0]!r} of the sample submission is missing ({len(missing_ids)} missing)")
    extra_ids = ids[~ids.isin(expected)]
    if len(extra_ids):
        found.append(f"id {extra_ids.iloc[0]!r} is not in the sample submission ({len(extra_ids)} unknown)")
    if len(frame) != len(sample):
        found.append(f"{len(frame)} rows, the sample submission has {len(sample)}")
    elif not found and not (ids.to_numpy() == expected.to_numpy()).all():
        found.append("rows are not in the sample submission's order")
    found += _value_problems(comp, frame, sample, classes, grades)
    return found


def _value_problems(comp: Competition, frame: pd.DataFrame, sample: pd.DataFrame, classes: list[str] | None,
                    grades: list[str] | None = None) -> list[str]:
    if comp.submission in ("tags", "value", "grade"):
        return _task_value_problems(comp, frame, sample, classes, grades)
    if comp.submission == "label":
        col = comp.submission_label_column
        if col not in frame.columns or classes is None:
            return []
        values = frame[col].astype(str)
        bad = values[~values.isin(classes)]
        if len(bad):
            row = int(bad.index[0]) + 2
            return [f"row {row}: {bad.iloc[0]!r} is not a class name ({len(bad)} such rows)"]
        return []
    cols = [c for c in sample.columns if c != comp.id_column and c in frame.columns]  # by name, wherever the id is
    values = frame[cols].apply(pd.to_numeric, errors="coerce")
    found = []
    if values.isna().any().any():
        r, c = np.argwhere(values.isna().to_numpy())[0]
        found.append(f"row {r + 2}, column {cols[c]!r}: {frame[cols[c]].iloc[r]!r} is not a number")
    arr = values.to_numpy(dtype=np.float64)
    out_of_range = (arr < 0) | (arr > 1)
    if out_of_range.any():
        r, c = np.argwhere(out_of_range)[0]
        found.append(f"row {r + 2}, column {cols[c]!r}: {arr[r, c]} is outside [0, 1]")
    zero = np.flatnonzero(np.nansum(arr, axis=1) <= 0)
    if len(zero) and comp.submission == "probs" and comp.task == "single":  # a label set may be all 0
        found.append(f"row {zero[0] + 2}: probabilities sum to 0, which Kaggle cannot rescale ({len(zero)} such rows)")
    return found


def _task_value_problems(comp: Competition, frame: pd.DataFrame, sample: pd.DataFrame, classes: list[str] | None,
                         grades: list[str] | None) -> list[str]:
    """Tags only from the label set; numbers finite; grades whole numbers among the training grades."""
    others = [c for c in sample.columns if c != comp.id_column and c in frame.columns]
    if len(others) != 1:
        return []
    col = others[0]
    if comp.submission == "tags":
        if classes is None:
            return []
        known = set(classes)
        for r, cell in enumerate(frame[col].fillna("").astype(str)):
            unknown = [t for t in cell.split() if t not in known]
            if unknown:
                return [f"row {r + 2}: tag {unknown[0]!r} is not one of the labels"]
        return []
    values = pd.to_numeric(frame[col], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        return [f"row {r + 2}, column {col!r}: {frame[col].iloc[r]!r} is not a finite number ({int(bad.sum())} such rows)"]
    if comp.submission == "grade":
        allowed = {float(g) for g in grades} if grades else None
        wrong = (values != np.round(values)) | (~np.isin(values, list(allowed)) if allowed else False)
        if np.any(wrong):
            r = int(np.flatnonzero(wrong)[0])
            return [f"row {r + 2}, column {col!r}: {values[r]:g} is not one of the grades {sorted(allowed or [])}"]
    return []


def submission_warnings(comp: Competition, frame: pd.DataFrame) -> list[str]:
    """What Kaggle accepts but a user should know: probability rows off 1 by more than rounding (SUM_RULE)."""
    if comp.submission != "probs" or comp.task != "single":  # per-label probabilities need not sum to 1
        return []
    cols = [c for c in frame.columns if c != comp.id_column]
    sums = frame[cols].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64).sum(axis=1)
    off = np.flatnonzero((np.abs(sums - 1) > SUM_TOLERANCE) & (sums > 0))
    if not len(off):
        return []
    return [f"row {off[0] + 2}: probabilities sum to {sums[off[0]]:.6f} ({len(off)} such rows): {SUM_RULE}"]


def write_submission(frame: pd.DataFrame, path: Path, force: bool) -> None:
    """Write atomically; refuse to replace an existing file without ``force``."""
    path = Path(path)
    if path.exists() and not force:
        raise PipelineError(f"{path} already exists; pass --force to overwrite it or choose another name")
    atomic_write_csv(path, frame, float_format="%.10g")


def write_checked(comp: Competition, ids: list[str], probs: np.ndarray, classes: list[str], sample: pd.DataFrame,
                  expected: list[str], out_csv: Path, force: bool, task=None) -> pd.DataFrame:
    """Build the submission, check it against the sample and the work folder's classes ``expected``, and
    write it only when it passes (predict and blend both end here)."""
    frame = build_submission(comp, ids, probs, classes, sample, task)
    found = check_submission(comp, frame, sample, expected, task and list(task.grades))
    if found:
        raise PipelineError(f"refusing to write {out_csv}: {found[0]} ({len(found)} problems)")
    write_submission(frame, out_csv, force)
    return frame


def check_submission_file(comp: Competition, submission_csv: Path, sample: Path | None = None,
                          work_dir: Path | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Read a submission CSV and list every problem against the sample (and the work dir's classes)."""
    from pipeline.io import read_csv, read_json
    from pipeline.workdir import REORG_FILE, SAMPLE_FILE  # not pipeline.data.items: checking needs no torch

    if sample is None and work_dir is None:
        raise PipelineError("give --sample FILE (the competition's sample submission) or --work-dir DIR")
    sample_path = sample or Path(work_dir) / SAMPLE_FILE
    classes = grades = None
    if work_dir is not None:
        info = read_json(Path(work_dir) / REORG_FILE, "WORK_DIR is not a finished reorg; run `pipeline reorg` "
                         "first", "run `pipeline reorg --force` to rebuild it")
        classes, grades = info["classes"], info.get("grades")
    frame = read_csv(submission_csv, what="submission")
    return frame, check_submission(comp, frame, read_csv(sample_path, what="sample submission"), classes, grades)


def in_class_order(probs: np.ndarray, have: list[str], want: list[str]) -> np.ndarray:
    """Probability columns named ``have`` put in the order ``want`` names them: classes match by name, never by
    position (cv, report and the submission all reorder through this)."""
    index = {c: i for i, c in enumerate(have)}
    missing = [c for c in want if c not in index]
    if missing:
        raise PipelineError(f"the probabilities have no column for {', '.join(map(repr, missing[:5]))}; "
                            "predict with a run trained on this competition's data")
    return np.asarray(probs)[:, [index[c] for c in want]]
