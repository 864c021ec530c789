"""The work folder's table of items: what reorg decided for every labelled image, in one CSV.

items.csv has one row per labelled image: ``id``, ``file`` (relative to
WORK_DIR), ``split`` (train or valid: the holdout), ``fold`` (-1 without CV),
``group`` (the spec's group_column, or empty), ``label`` (the target as text),
one ``y:<name>`` column per model output (tasks other than single: 0/1 per
label, the number, the grade index) and one ``m:<column>`` per metadata column.
test_items.csv lists the test images with their metadata when the spec has
metadata. Single-label work folders also keep the class-folder trees, built
from the same plan.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.download.layout import Download
from pipeline.download.naming import class_dir_name, link_name
from pipeline.download.splits import strata_for
from pipeline.workdir import IMAGES_DIR, ITEMS_FILE, META_PREFIX, TARGET_PREFIX, TEST_CLASS_DIR, TEST_ITEMS_FILE


def split_frame(download: Download, folds: int) -> pd.DataFrame:
    """id, label: what the holdout and the folds are stratified on (pipeline/download/splits.py's strata_for:
    the class, the grade, the rarest label of the row, a bin of the target)."""
    labels, kind = download.labels, download.task.kind
    if kind in ("single", "ordinal"):
        return labels[["id", "label"]]
    targets = np.asarray(labels["target"].tolist(), dtype=np.float64)
    targets = targets if kind == "multilabel" else targets[:, 0]
    return pd.DataFrame({"id": labels["id"], "label": strata_for(kind, targets, max(folds, 2), download.classes)})


def write_items(plan, download: Download, image_ext: str, staging: Path) -> list[str]:
    """items.csv (and test_items.csv with metadata) into ``staging``; the names written."""
    labels = download.labels.set_index("id").loc[plan.labels["id"]].reset_index()
    single = download.task.kind == "single"
    ids, paths, valid = labels["id"].tolist(), download.train_paths, plan.valid_ids  # lists: 5x faster to walk
    folders = {c: f"train_valid/{class_dir_name(c)}/" for c in download.classes} if single else {}
    files = [folders[label] for label in labels["label"].tolist()] if single else [f"{IMAGES_DIR}/"] * len(ids)
    frame = pd.DataFrame({
        "id": labels["id"],
        "file": [d + link_name(i, paths[i], image_ext) for d, i in zip(files, ids)],
        "split": ["valid" if i in valid else "train" for i in ids],
        "fold": plan.folds.to_numpy() if plan.folds is not None else -1,
        "group": labels["group"] if "group" in labels.columns else "",
        "label": labels["label"],
    })
    if not single:
        targets = np.asarray(labels["target"].tolist(), dtype=np.float64)
        for k, name in enumerate(download.classes):
            frame[TARGET_PREFIX + name] = targets[:, k]
    meta = [c for c in labels.columns if c.startswith(META_PREFIX)]
    for column in meta:
        frame[column] = labels[column]
    frame.to_csv(staging / ITEMS_FILE, index=False)
    names = [ITEMS_FILE]
    if download.test_meta is not None:
        test = download.test_meta.set_index("id").loc[list(download.test_paths)].reset_index()
        test.insert(1, "file", [f"test/{TEST_CLASS_DIR}/" + link_name(i, p, image_ext)
                                for i, p in download.test_paths.items()])
        test.to_csv(staging / TEST_ITEMS_FILE, index=False)
        names.append(TEST_ITEMS_FILE)
    return names
