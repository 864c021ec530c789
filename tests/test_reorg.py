"""reorg: the split plan (pure), the tree on disk, idempotence and input errors."""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.competition import get_competition
from pipeline.errors import PipelineError
from pipeline.download.reorg import class_dir_name, plan_split, reorg, stratified_folds, valid_counts
from tests.conftest import SHARED, tree_hash

DATA = SHARED / "data" if (SHARED / "data").is_dir() else Path("/work/shared/data")


def labels_frame(sizes: dict[str, int]) -> pd.DataFrame:
    rows = [(f"{c}{i}", c) for c, n in sizes.items() for i in range(n)]
    return pd.DataFrame(rows, columns=["id", "label"])


def test_plan_is_stratified_and_keeps_one_in_train():
    labels = labels_frame({"a": 50, "b": 20, "c": 2, "d": 1})
    plan = plan_split(labels, valid_ratio=0.2, folds=0, seed=0)
    per_class = labels[labels["id"].isin(plan.valid_ids)]["label"].value_counts()
    assert len(plan.valid_ids) == round(73 * 0.2)
    assert per_class["a"] == 10 and per_class["b"] == 4
    assert per_class.get("c", 0) <= 1  # a class of two keeps one in train
    assert "d0" not in plan.valid_ids  # a class of one stays in train


def test_plan_is_deterministic_in_the_seed():
    labels = labels_frame({"a": 30, "b": 30})
    first = plan_split(labels, 0.1, folds=3, seed=7)
    again = plan_split(labels, 0.1, folds=3, seed=7)
    other = plan_split(labels, 0.1, folds=3, seed=8)
    assert first.valid_ids == again.valid_ids
    assert first.folds.equals(again.folds)
    assert first.valid_ids != other.valid_ids


def test_valid_counts_hit_the_total_with_small_classes():
    import numpy as np

    sizes = pd.Series({f"c{i}": 3 for i in range(40)})  # 120 images, 3 per class
    counts = valid_counts(sizes, 0.1, np.random.default_rng(0))
    assert counts.sum() == 12  # per-class rounding alone would give 0
    assert counts.max() == 1


def test_folds_are_stratified_and_cover_every_id():
    labels = labels_frame({"a": 30, "b": 15})
    folds = plan_split(labels, 0.1, folds=3, seed=0).folds
    assert sorted(folds.index) == sorted(labels["id"])
    table = pd.crosstab(labels.set_index("id").loc[folds.index, "label"], folds.to_numpy())
    assert (table.loc["a"] == 10).all() and (table.loc["b"] == 5).all()


def test_too_many_folds_is_a_clear_error():
    with pytest.raises(PipelineError, match="no class has 5 images"):
        plan_split(labels_frame({"a": 3, "b": 4}), 0.1, folds=5, seed=0)


def test_reorg_writes_the_trees_and_leaves_the_download_alone(toy, tmp_path):
    comp, raw = toy
    before = tree_hash(raw)
    result = reorg(comp, raw, tmp_path / "work", valid_ratio=0.25, folds=3, seed=0)
    work = tmp_path / "work"
    assert tree_hash(raw) == before
    info = json.loads((work / "reorg.json").read_text())
    assert info["classes"] == ["cat", "dog", "frog"]
    assert info["counts"] == {"train": 27, "valid": 9, "train_valid": 36, "test": 10}
    for split, n in (("train", 27), ("valid", 9), ("train_valid", 36)):
        assert sum(len(os.listdir(work / split / c)) for c in info["class_dirs"]) == n
    assert len(os.listdir(work / "test" / "unknown")) == 10
    linked = work / "train_valid" / "cat" / "1.png"
    assert linked.stat().st_ino == (raw / "train" / "1.png").stat().st_ino  # a hard link, not a copy
    folds = pd.read_csv(work / "folds.csv", dtype=str)
    assert list(folds.columns) == ["id", "label", "fold"] and len(folds) == 36
    assert not result.skipped


def test_second_run_is_a_fast_no_op_and_input_changes_rebuild(toy, tmp_path):
    comp, raw = toy
    reorg(comp, raw, tmp_path / "work", folds=3)
    again = reorg(comp, raw, tmp_path / "work", folds=3)
    assert again.skipped and again.seconds < 2
    changed = reorg(comp, raw, tmp_path / "work", folds=3, seed=1)
    assert not changed.skipped
    (raw / "test" / "t000.png").rename(raw / "test" / "t999.png")
    with pytest.raises(PipelineError, match="disagrees"):  # sample submission no longer matches
        reorg(comp, raw, tmp_path / "work", folds=3)


def test_classes_follow_the_sample_submission_columns(toy_probs, tmp_path):
    comp, raw = toy_probs
    sample = pd.read_csv(raw / comp.sample_submission)
    sample.insert(1, "zebra", 0.0)  # a class with no training image still gets a column
    sample.to_csv(raw / comp.sample_submission, index=False)
    info = reorg(comp, raw, tmp_path / "work", folds=0).info
    assert info["classes"] == ["zebra", "cat", "dog", "frog"]
    assert not (tmp_path / "work" / "folds.csv").exists()


@pytest.mark.parametrize("label, folder", [("a/b", "a%2Fb"), (".hidden", "%2Ehidden"), ("..", "%2E."),
                                           ("with space", "with space"), ("émigré", "%C3%A9migr%C3%A9")])
def test_class_folders_stay_inside(label, folder):
    assert class_dir_name(label) == folder
    assert "/" not in class_dir_name(label)


def _edit_labels(raw, comp, edit):
    frame = pd.read_csv(raw / comp.labels_file, dtype=str)
    edit(frame).to_csv(raw / comp.labels_file, index=False)


@pytest.mark.parametrize("breakage, message", [
    (lambda raw, comp: (raw / comp.labels_file).unlink(), r"labels file .*labels.csv not found"),
    (lambda raw, comp: (raw / "train" / "5.png").unlink(), r"id '5' has no image train/5.png"),
    (lambda raw, comp: (raw / "train" / "extra.png").write_bytes((raw / "train" / "1.png").read_bytes()),
     r"extra.png has no row in labels.csv"),
    (lambda raw, comp: _edit_labels(raw, comp, lambda f: pd.concat([f, f.iloc[[2]]])), r"id '3' appears on rows 4, 38"),
    (lambda raw, comp: _edit_labels(raw, comp, lambda f: f.rename(columns={"label": "breed"})),
     r"no column 'label'; columns found: 'id', 'breed'"),
])
def test_bad_input_names_the_culprit_and_changes_nothing(toy, tmp_path, breakage, message):
    comp, raw = toy
    breakage(raw, comp)
    before = tree_hash(raw)
    with pytest.raises(PipelineError, match=message):
        reorg(comp, raw, tmp_path / "work")
    assert tree_hash(raw) == before
    assert not (tmp_path / "work" / "reorg.json").exists()


def test_work_dir_inside_the_download_is_refused(toy):
    comp, raw = toy
    with pytest.raises(PipelineError, match="overlaps RAW_DIR"):
        reorg(comp, raw, raw / "work")


# ---------------------------------------------------------------- the same trees as before


@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize("sizes", [{"a": 40, "b": 13, "c": 5}, {f"k{i}": 1 + i % 4 for i in range(30)}])
def test_stratified_folds_are_scikit_learns(sizes, seed):
    from sklearn.model_selection import StratifiedKFold

    rng = np.random.default_rng(seed)
    labels = rng.permutation([c for c, n in sizes.items() for _ in range(n)])
    expected = np.empty(len(labels), dtype=int)
    splitter = StratifiedKFold(n_splits=3, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for fold, (_, idx) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
            expected[idx] = fold
    assert stratified_folds(labels, 3, seed).tolist() == expected.tolist()


def manifest(work: Path) -> str:
    """A digest of every file name per split and class, folds.csv and the reorg.json keys data reads."""
    digest = hashlib.sha256()
    for split in ("train", "valid", "train_valid", "test"):
        for dirpath, dirs, files in os.walk(work / split):
            dirs.sort()
            for name in sorted(files):
                digest.update(f"{Path(dirpath).relative_to(work)}/{name}\n".encode())
    digest.update((work / "folds.csv").read_bytes() if (work / "folds.csv").exists() else b"-")
    info = json.loads((work / "reorg.json").read_text())
    digest.update(json.dumps([info[k] for k in ("competition", "classes", "class_dirs", "image_ext", "counts")]).encode())
    return digest.hexdigest()[:16]


# Recorded with the reorg of commit 8914f4d (scikit-learn folds, pathlib links), per (valid_ratio, folds, seed)
BEFORE = {
    "digits": ["6297c08113f88010", "b840f6a27def88ae", "1dd87cbca3e12b4e"],
    "cifar-10-tiny": ["ff3a52618ec1e0e5", "818478763e3430da", "d06c9fcf2fe0193c"],
    "cifar-10-kaggle-sample": ["fec007f66a29123a", "b88087aaf46425d0", "7b8655fc224acb20"],
    "dog-breed-identification": ["0f522787905a8feb", "4e24addee90bd046", "86d38963bfd297e8"],
}
PARAMS = [(0.1, 5, 0), (0.25, 3, 7), (0.1, 0, 1)]


def check_same_as_before(slug: str, raw: Path, key: str, tmp_path: Path) -> None:
    for (valid_ratio, folds, seed), expected in zip(PARAMS, BEFORE[key]):
        work = tmp_path / f"work-{seed}"
        reorg(get_competition(slug), raw, work, valid_ratio=valid_ratio, folds=folds, seed=seed)
        assert manifest(work) == expected, (key, valid_ratio, folds, seed)


def test_the_digits_demo_splits_exactly_as_before(tmp_path):
    get_competition("digits").make_raw(tmp_path / "raw")
    check_same_as_before("digits", tmp_path / "raw", "digits", tmp_path)


@pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} is absent")
@pytest.mark.parametrize("slug, folder", [("cifar-10", "cifar-10-tiny"), ("cifar-10", "cifar-10-kaggle-sample"),
                                          ("dog-breed-identification", "dog-breed-identification")])
def test_registered_competitions_split_exactly_as_before(tmp_path, slug, folder):
    check_same_as_before(slug, DATA / folder, folder, tmp_path)


# ---------------------------------------------------------------- the no-op


@pytest.mark.parametrize("change", ["rewrite-other-size", "touch-same-size"])
def test_an_image_changed_in_place_is_not_a_no_op(toy, tmp_path, change):
    comp, raw = toy
    work = tmp_path / "work"
    reorg(comp, raw, work, folds=0)
    assert reorg(comp, raw, work, folds=0).skipped
    image = raw / "train" / "4.png"
    if change == "rewrite-other-size":
        image.write_bytes(image.read_bytes() + b"\0" * 7)
    else:
        stat = image.stat()
        os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    again = reorg(comp, raw, work, folds=0)
    assert not again.skipped
    assert reorg(comp, raw, work, folds=0).skipped
