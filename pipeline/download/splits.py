"""The split plan: which labelled rows are held out and which fold validates each; pure functions.

    split = plan_split(ids, strata, valid_ratio, folds, seed, given_valid=None, groups=None)
    split.valid_ids  # frozenset of ids held out (the download's own valid ids when given_valid is set)
    split.folds      # pd.Series id -> fold number (ids in the order given), or None when folds < 2

``ids`` are the labelled ids (strings, unique), ``strata`` one string per row: what the split keeps in
proportion, made by :func:`strata_for` from the task kind and the targets (for single-label, the class).
``groups`` is one string per row (the spec's group_column: patient, scene, source image) or None.

Without groups the result is exactly the one reorg has always made (a per-stratum holdout with
largest-remainder sizes, scikit-learn's StratifiedKFold folds written out), so existing trees do not
move. With groups no group is ever on both sides: the holdout is a stratified choice of whole groups
(:func:`group_holdout`) and the folds are scikit-learn's StratifiedGroupKFold(shuffle=True,
random_state=seed), imported only then (sklearn costs seconds to import). A row with no group value
(empty or NaN) is a group of its own. Everything is deterministic in ``seed``.
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.errors import PipelineError

log = logging.getLogger("pipeline")

MAX_BINS = 10  # quantile bins of a regression target


@dataclass(frozen=True)
class Split:
    """Which labelled id is held out, and the fold of each; computed without touching the disk."""

    valid_ids: frozenset[str]
    folds: pd.Series | None  # id -> fold number, in the order of the ids given; None without CV


def plan_split(ids: Sequence[str], strata: Sequence[str], valid_ratio: float, folds: int, seed: int,
               given_valid: frozenset[str] | None = None, groups: Sequence[str] | None = None) -> Split:
    """Stratified holdout and stratified K folds, group-aware when ``groups`` is given (see the module doc).

    ``given_valid`` (the download's own validation split) replaces the random holdout; the folds are
    planned over all labelled rows either way.
    """
    if not 0 <= valid_ratio < 1:
        raise PipelineError(f"--valid-ratio must be in [0, 1), got {valid_ratio}")
    ids, strata = np.asarray(ids, dtype=object), np.asarray(strata, dtype=object)
    if len(ids) != len(strata):
        raise PipelineError(f"the split needs one stratum per id: {len(ids)} ids, {len(strata)} strata")
    keys = None if groups is None else group_keys(groups, len(ids))
    if given_valid is not None:
        valid = given_valid
        if keys is not None:
            _warn_groups_across(keys, np.isin(ids, list(given_valid)), "the download's own valid split")
    elif keys is None:
        valid = stratified_holdout(ids, strata, valid_ratio, seed)
    else:
        valid = frozenset(ids[group_holdout(strata, keys, valid_ratio, seed)].tolist())
    fold = plan_folds(ids, strata, folds, seed) if keys is None else group_folds(ids, strata, keys, folds, seed)
    return Split(valid_ids=valid, folds=fold)


# ---------------------------------------------------------------- without groups (reorg's split since v2)


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


def stratified_holdout(ids: np.ndarray, strata: np.ndarray, valid_ratio: float, seed: int) -> frozenset[str]:
    """Per-stratum random holdout: sizes from :func:`valid_counts`, ids drawn in sorted order per stratum."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"id": ids, "stratum": strata})
    members = {s: np.sort(part.to_numpy()) for s, part in frame.groupby("stratum")["id"]}
    sizes = pd.Series({s: len(part) for s, part in members.items()}).sort_index()
    counts = valid_counts(sizes, valid_ratio, rng)
    valid: list[str] = []
    for stratum, n_valid in counts.items():
        valid.extend(rng.permutation(members[stratum])[:n_valid].tolist())
    return frozenset(valid)


def stratified_folds(labels: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """The fold of each sample, as scikit-learn's StratifiedKFold(shuffle=True) assigns it.

    Classes are numbered by first appearance; dealing the class-sorted samples
    round-robin over the folds fixes how many of each class every fold gets;
    each class's fold numbers, in blocks, are then shuffled by one
    RandomState(seed) drawn class after class. Written out here (rather than
    calling scikit-learn, same result) because importing sklearn costs seconds.
    """
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


def _check_folds(strata: np.ndarray, folds: int) -> pd.Series | None:
    """The size of each stratum, or None when ``folds`` asks for no CV; a clear error when K is impossible."""
    if folds < 2:
        if folds not in (0, 1):
            raise PipelineError(f"--folds must be 0 (no CV) or >= 2, got {folds}")
        return None
    counts = pd.Series(strata).value_counts()
    if folds > len(strata):
        raise PipelineError(f"--folds {folds} is more than the {len(strata)} labelled images; use fewer folds")
    if counts.max() < folds:
        raise PipelineError(
            f"--folds {folds}: no class has {folds} images (largest has {counts.max()}); use --folds {counts.max()} or fewer"
        )
    return counts


def _warn_small(counts: pd.Series, folds: int) -> None:
    small = int((counts < folds).sum())
    if small:
        log.warning("%d classes have fewer than %d images: some folds validate without them", small, folds)


def plan_folds(ids: np.ndarray, strata: np.ndarray, folds: int, seed: int) -> pd.Series | None:
    """Fold number per id (in the order given), or None when ``folds`` < 2."""
    counts = _check_folds(strata, folds)
    if counts is None:
        return None
    assignment = stratified_folds(strata, folds, seed)
    _warn_small(counts, folds)
    return pd.Series(assignment, index=ids, name="fold")


# ---------------------------------------------------------------- with groups


def group_keys(groups: Sequence[str], n: int) -> np.ndarray:
    """One string per row; a missing value (None, NaN, '') becomes a group of its own row."""
    values = pd.Series(list(groups), dtype=object)
    if len(values) != n:
        raise PipelineError(f"the split needs one group per id: {n} ids, {len(values)} group values")
    missing = values.isna() | (values.astype(str).str.strip() == "")
    keys = values.astype(str).to_numpy(dtype=object)
    keys[missing.to_numpy()] = [f"\0row {i}" for i in np.flatnonzero(missing.to_numpy())]
    return keys


def _counts_per_group(strata: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n_groups, n_strata) row counts, and each row's group number (groups in sorted order)."""
    _, stratum = np.unique(strata.astype(str), return_inverse=True)
    names, group = np.unique(keys.astype(str), return_inverse=True)
    table = np.zeros((len(names), stratum.max() + 1 if len(stratum) else 0), dtype=np.int64)
    np.add.at(table, (group, stratum), 1)
    return table, group


def group_holdout(strata: np.ndarray, keys: np.ndarray, valid_ratio: float, seed: int) -> np.ndarray:
    """A boolean mask of the held-out rows: whole groups, about ``valid_ratio`` of each stratum.

    Groups are visited in a random order (``seed``); each is taken when it brings the held-out
    counts closer to valid_ratio of every stratum (squared gap, each stratum weighted by one over
    its size, so a rare class counts as much as a common one) and leaves at least one row of every
    stratum of two or more rows in train (as the plan without groups does). One pass; the held-out
    share ends within about one group's size of the target.
    """
    if valid_ratio == 0:
        return np.zeros(len(keys), dtype=bool)
    table, group = _counts_per_group(strata, keys)
    totals = table.sum(axis=0)
    target, cap, weight = totals * valid_ratio, np.maximum(totals - 1, 0), 1.0 / totals
    taken, chosen = np.zeros(table.shape[1]), np.zeros(len(table), dtype=bool)
    for g in np.random.default_rng(seed).permutation(len(table)):
        added = table[g]
        after = taken + added
        if (after > cap).any():
            continue
        if (weight * ((after - target) ** 2 - (taken - target) ** 2)).sum() < 0:
            taken, chosen[g] = after, True
    if not chosen.any():
        sizes = table.sum(axis=1)
        raise PipelineError(
            f"--valid-ratio {valid_ratio} holds out no whole group: the {len(table)} groups have "
            f"{sizes.min()}-{sizes.max()} rows each, too many for {valid_ratio:.0%} of the {len(keys)} rows; "
            "use a larger --valid-ratio, --valid-ratio 0 (no holdout), or a finer group_column")
    return chosen[group]


def group_folds(ids: np.ndarray, strata: np.ndarray, keys: np.ndarray, folds: int, seed: int) -> pd.Series | None:
    """Fold number per id by StratifiedGroupKFold(shuffle=True, random_state=seed); None when ``folds`` < 2."""
    n_groups = len(np.unique(keys.astype(str)))
    if folds >= 2 and folds > n_groups:
        advice = f"use --folds {n_groups} or fewer" if n_groups >= 2 else "use --folds 0 (no CV) or a finer group_column"
        raise PipelineError(f"--folds {folds}: the {len(keys)} labelled rows belong to only {n_groups} groups "
                            f"(group_column) and a group never spans folds; {advice}")
    counts = _check_folds(strata, folds)
    if counts is None:
        return None
    from sklearn.model_selection import StratifiedGroupKFold  # lazily: sklearn takes seconds to import

    assignment = np.full(len(ids), -1, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # small classes: said once below, in our words
        for fold, (_, rows) in enumerate(splitter.split(np.zeros(len(ids)), strata.astype(str), keys.astype(str))):
            assignment[rows] = fold
    empty = sorted(set(range(folds)) - set(assignment.tolist()))
    if empty:
        raise PipelineError(f"--folds {folds}: the groups are too uneven to fill fold {empty[0]} "
                            f"({n_groups} groups); use fewer folds")
    _warn_small(counts, folds)
    return pd.Series(assignment, index=ids, name="fold")


def _warn_groups_across(keys: np.ndarray, held_out: np.ndarray, where: str) -> None:
    """A split we did not choose (the download's) may cut groups: say so, once."""
    frame = pd.DataFrame({"group": keys, "valid": held_out})
    both = frame.groupby("group")["valid"].nunique()
    both = both[both > 1]
    if len(both):
        log.warning("%d groups (e.g. %r) have images on both sides of %s: its valid score is optimistic",
                    len(both), both.index[0], where)


# ---------------------------------------------------------------- what to stratify on


def strata_for(task: str, targets: np.ndarray, folds: int = 5, label_names: Sequence[str] | None = None) -> np.ndarray:
    """One string per row that the split keeps in proportion, by task kind.

    - single, ordinal: the class / the grade (``targets`` 1-D strings).
    - multilabel (``targets`` (N, L) 0/1): the rarest label the row has (fewest rows in the whole set;
      ties to the first column), 'none' for a row without labels. A key of the whole label set would make
      one stratum per combination, most of them of one row; the rarest label keeps every rare label spread
      over the folds, which its per-label threshold and AUC need.
    - regression (``targets`` 1-D floats): equal-count quantile bins of the target's rank, at most
      MAX_BINS and fewer when rows are few, so that every bin has at least ``folds`` rows (rows of one
      value may straddle two bins; each bin is still a slice of the range).
    """
    targets = np.asarray(targets)
    if task in ("single", "ordinal"):
        return targets.astype(str).astype(object)
    if task == "multilabel":
        return _rarest_label(targets, label_names)
    if task == "regression":
        return _quantile_bins(targets, folds)
    raise PipelineError(f"task must be one of single, multilabel, regression, ordinal, got {task!r}")


def _rarest_label(targets: np.ndarray, label_names: Sequence[str] | None) -> np.ndarray:
    if targets.ndim != 2:
        raise PipelineError(f"multilabel targets must be an (N, labels) 0/1 table, got shape {targets.shape}")
    present = targets > 0
    names = np.asarray(list(label_names) if label_names is not None else [str(j) for j in range(targets.shape[1])],
                       dtype=object)
    rarity = np.where(present, present.sum(axis=0)[None, :], np.iinfo(np.int64).max)
    strata = names[np.argmin(rarity, axis=1)] if targets.shape[1] else np.empty(len(targets), dtype=object)
    return np.where(present.any(axis=1), strata, "none").astype(object)


def _quantile_bins(targets: np.ndarray, folds: int) -> np.ndarray:
    values = targets.astype(float).reshape(-1)
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        raise PipelineError(f"regression target of row {bad[0]} is {values[bad[0]]}; every target must be a number")
    n_bins = int(np.clip(len(values) // max(folds, 2), 1, MAX_BINS))
    rank = np.empty(len(values), dtype=np.int64)
    rank[np.argsort(values, kind="stable")] = np.arange(len(values))
    return np.array([f"bin{b}" for b in rank * n_bins // max(len(values), 1)], dtype=object)
