"""Tabular columns beside the images (the spec's ``metadata``): read per item, encoded on the training fold.

Reorg keeps the raw values (items.csv and test_items.csv, ``m:<column>``).
A member fits a :class:`MetaEncoder` on its own training rows only: a column
whose every value is a number is standardised (mean and std of those rows; a
missing value becomes the mean, 0), any other column is one-hot encoded over
the categories those rows hold (an unseen category is all zeros). The
encoder travels in the checkpoint, so predict encodes the test rows exactly
as training did, and refuses a work folder that lacks a column.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.errors import PipelineError
from pipeline.workdir import ITEMS_FILE, META_PREFIX, TEST_ITEMS_FILE


@dataclass(frozen=True)
class MetaEncoder:
    """How each metadata column becomes numbers: (column, mean, std) or (column, categories)."""

    numeric: tuple[tuple[str, float, float], ...] = ()
    categorical: tuple[tuple[str, tuple[str, ...]], ...] = ()
    columns: tuple[str, ...] = field(default=())  # in the spec's order

    @property
    def width(self) -> int:
        return len(self.numeric) + sum(len(c) for _, c in self.categorical)

    @classmethod
    def fit(cls, frame: pd.DataFrame, columns: list[str]) -> MetaEncoder:
        """Fit on the training rows' raw values (strings; '' is missing)."""
        numeric, categorical = [], []
        for col in columns:
            raw = frame[col].astype(str).str.strip()
            values = pd.to_numeric(raw.replace("", np.nan), errors="coerce")
            given = raw != ""
            if given.any() and values[given].notna().all():
                mean = float(values.mean())
                std = float(values.std(ddof=0)) if values.notna().sum() > 1 else 1.0
                numeric.append((col, mean, std if std > 0 else 1.0))
            else:
                categorical.append((col, tuple(sorted(set(raw[given])))))
        return cls(tuple(numeric), tuple(categorical), tuple(columns))

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        """(N, width) float32 of the raw rows."""
        parts = []
        for col, mean, std in self.numeric:
            values = pd.to_numeric(frame[col].astype(str).str.strip().replace("", np.nan), errors="coerce")
            parts.append(((values.to_numpy(dtype=np.float64) - mean) / std)[:, None])
        for col, cats in self.categorical:
            raw = frame[col].astype(str).str.strip().to_numpy()
            parts.append((raw[:, None] == np.asarray(cats, dtype=object)[None, :]).astype(np.float64))
        out = np.concatenate(parts, axis=1) if parts else np.zeros((len(frame), 0))
        return np.nan_to_num(out, nan=0.0).astype(np.float32)

    def to_json(self) -> dict:
        return {"numeric": [list(n) for n in self.numeric],
                "categorical": [[c, list(v)] for c, v in self.categorical], "columns": list(self.columns)}

    @classmethod
    def from_json(cls, data: dict | None) -> MetaEncoder | None:
        if not data:
            return None
        return cls(tuple((c, float(m), float(s)) for c, m, s in data["numeric"]),
                   tuple((c, tuple(v)) for c, v in data["categorical"]), tuple(data["columns"]))


def item_metadata(work_dir: Path, columns: list[str], items) -> pd.DataFrame:
    """The raw metadata of ``items`` (labelled or test), in their order, one column per spec column."""
    work_dir = Path(work_dir)
    tables = {}
    for role, name in (("train", ITEMS_FILE), ("test", TEST_ITEMS_FILE)):
        path = work_dir / name
        if path.is_file():
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
            missing = [c for c in columns if META_PREFIX + c not in frame.columns]
            if missing:
                raise PipelineError(f"{path} has no metadata column {missing[0]!r} that the run was trained with; "
                                    "reorganise with the spec that names it (`pipeline reorg --force`)")
            tables[role] = frame.set_index("id")[[META_PREFIX + c for c in columns]]
    rows = []
    for it in items:
        role = "test" if it.test else "train"  # not by folder: a class may be called "unknown" too
        table = tables.get(role)
        if table is None or it.id not in table.index:
            raise PipelineError(f"{work_dir}: no metadata row for image {it.id!r} "
                                f"({TEST_ITEMS_FILE if role == 'test' else ITEMS_FILE}); run `pipeline reorg "
                                "--force` with the spec's metadata and test_file")
        rows.append(table.loc[it.id].to_numpy())
    return pd.DataFrame(rows, columns=list(columns))


def meta_tensor(encoder: MetaEncoder | None, work_dir: Path, items) -> torch.Tensor | None:
    """The encoded metadata (N, width) of ``items``, or None without metadata."""
    if encoder is None:
        return None
    return torch.from_numpy(encoder.transform(item_metadata(work_dir, list(encoder.columns), items)))
