"""Targets wherever a download keeps them, turned into one form per task kind.

The labels CSV (or the file names) give each training image its target in one
of several shapes: a class column, one 0/1 column per class or label (one-hot,
multi-hot), a column of tags joined by a separator, a number, a grade, or a
label inside the file name (``cat.12.jpg``). :func:`targets_of` reads them
into the frame reorg plans with: ``id``, ``label`` (a class name for single,
the text :meth:`pipeline.models.task.Task.target_text` writes for the others), and
``target``: the tuple of floats a non-single item trains on. Every error names
the file, the row and what to change.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.competition import Competition
from pipeline.errors import PipelineError
from pipeline.workdir import LABEL_JOIN

if TYPE_CHECKING:  # numpy and pandas load where labels are read: a no-op reorg starts fast
    import numpy as np
    import pandas as pd


@dataclass(frozen=True)
class TaskInfo:
    """What reorg.json records of the task: its kind, the output names, the grades of an ordinal task."""

    kind: str
    names: list[str]
    grades: list[str]

    def to_json(self) -> dict:
        if self.kind == "single":
            return {}  # a single-label work folder keeps the reorg.json it always had
        return {"task": self.kind, "grades": self.grades} if self.kind == "ordinal" else {"task": self.kind}


def _row(frame: pd.DataFrame, mask, path: Path) -> tuple[int, str]:
    import numpy as np
    i = int(np.flatnonzero(np.asarray(mask))[0])
    return i + 2, frame["id"].iloc[i]


def one_hot_labels(comp: Competition, frame: pd.DataFrame, path: Path) -> pd.Series:
    """The class of each row of one-hot columns (exactly one 1 per row)."""
    import numpy as np
    import pandas as pd
    values = _zero_one(comp, frame, path)
    ones = values.sum(axis=1)
    if (ones != 1).any():
        row, image_id = _row(frame, ones != 1, path)
        raise PipelineError(f"{path} row {row}: id {image_id!r} has {int(ones[row - 2])} of the one-hot columns "
                            f"set, not one; fix the row, or set task = \"multilabel\" if images may have several")
    names = np.asarray(comp.label_columns)
    return pd.Series(names[values.argmax(axis=1)], index=frame.index)


def _zero_one(comp: Competition, frame: pd.DataFrame, path: Path) -> np.ndarray:
    import numpy as np
    import pandas as pd
    cols = list(comp.label_columns)
    values = frame[cols].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isin(values, (0.0, 1.0))
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise PipelineError(f"{path} row {r + 2}, column {cols[c]!r}: {frame[cols[c]].iloc[r]!r} is not 0 or 1; "
                            "label_columns must hold 0/1 values")
    return values


def _numbers(frame: pd.DataFrame, column: str, path: Path) -> np.ndarray:
    import numpy as np
    import pandas as pd
    values = pd.to_numeric(frame["label"], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        row, image_id = _row(frame, bad, path)
        raise PipelineError(f"{path} row {row}: id {image_id!r} has target {frame['label'].iloc[row - 2]!r} in "
                            f"{column!r}, not a finite number; fix or drop the row")
    return values


def targets_of(comp: Competition, frame: pd.DataFrame, path: Path, sample_columns: list[str]) -> tuple[pd.DataFrame, TaskInfo]:
    """``frame`` (id, label or the label_columns, ...) with ``label`` in canonical form and, for the kinds
    other than single, ``target``; and the task's output names."""
    import numpy as np
    frame = frame.copy()
    kind = comp.task
    if kind == "single":
        if comp.label_columns:
            frame["label"] = one_hot_labels(comp, frame, path)
        return frame, TaskInfo(kind, [], [])
    if kind == "multilabel":
        if comp.label_columns:
            names = _label_names(comp, list(comp.label_columns), sample_columns, path)
            values = _zero_one(comp, frame, path)[:, [list(comp.label_columns).index(n) for n in names]]
        else:
            sets = [_split_tags(cell, comp.label_separator) for cell in frame["label"]]
            found = sorted({t for tags in sets for t in tags})
            names = _label_names(comp, found, sample_columns, path)
            unknown = sorted(set(found) - set(names))
            if unknown:
                raise PipelineError(f"{path}: label {unknown[0]!r} is not a column of the sample submission "
                                    f"({len(unknown)} such labels); check the labels file against it")
            index = {n: i for i, n in enumerate(names)}
            values = np.zeros((len(frame), len(names)))
            for r, tags in enumerate(sets):
                values[r, [index[t] for t in tags]] = 1.0
        frame["target"] = [tuple(row) for row in values.tolist()]
        frame["label"] = [LABEL_JOIN.join(n for n, v in zip(names, row) if v) for row in values]
        return frame, TaskInfo(kind, names, [])
    numbers = _numbers(frame, comp.label_column, path)
    if kind == "regression":
        frame["target"] = [(v,) for v in numbers.tolist()]
        frame["label"] = [repr(v) for v in numbers.tolist()]
        return frame, TaskInfo(kind, [comp.label_column], [])
    whole = numbers == np.round(numbers)
    if not whole.all():
        row, image_id = _row(frame, ~whole, path)
        raise PipelineError(f"{path} row {row}: id {image_id!r} has grade {frame['label'].iloc[row - 2]!r}, not a "
                            "whole number; task 'ordinal' needs integer grades (or set task = \"regression\")")
    low, high = int(numbers.min()), int(numbers.max())
    if high - low > 1000:
        raise PipelineError(f"{path}: grades run from {low} to {high}; task 'ordinal' is for a few grades: "
                            "set task = \"regression\"")
    grades = [str(g) for g in range(low, high + 1)]
    frame["target"] = [(float(v - low),) for v in numbers.astype(int).tolist()]
    frame["label"] = [str(int(v)) for v in numbers.tolist()]
    return frame, TaskInfo(kind, [comp.label_column], grades)


def _split_tags(cell: str, separator: str) -> list[str]:
    parts = cell.split(separator) if separator.strip() else cell.split()
    return sorted({p.strip() for p in parts if p.strip()})


def _label_names(comp: Competition, found: list[str], sample_columns: list[str], path: Path) -> list[str]:
    """Output names of a multilabel task: the sample's probability columns (by name) when it has them."""
    columns = [c for c in sample_columns if c != comp.id_column]
    if comp.submission != "probs":
        return found
    missing = [n for n in found if n not in columns]
    if missing:
        raise PipelineError(f"{path}: label {missing[0]!r} is not a column of the sample submission "
                            f"({len(missing)} such labels); check label_columns against the sample submission")
    return columns


def names_labels(comp: Competition, stems: dict[str, str], where: Path) -> pd.DataFrame:
    """id, label of layout 'names': ``label_pattern`` matched on each file name without its extension."""
    import pandas as pd
    pattern = re.compile(comp.label_pattern)
    rows, unmatched = [], []
    for image_id in stems:
        m = pattern.fullmatch(image_id)
        if m is None or not m.group("label"):
            unmatched.append(image_id)
        else:
            rows.append((image_id, m.group("label")))
    if unmatched:
        raise PipelineError(f"{where / stems[unmatched[0]]}: its name does not match label_pattern "
                            f"{comp.label_pattern!r} ({len(unmatched)} such files); fix label_pattern in the spec "
                            "or move the files out")
    return pd.DataFrame(rows, columns=["id", "label"])
