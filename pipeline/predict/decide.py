"""Decisions fitted out of fold: per-label thresholds (multi-label F-beta) and grade cuts (ordinal QWK).

A metric that scores decisions rather than probabilities (F-beta on label
sets, quadratic weighted kappa on grades) gains from thresholds fitted to the
model's outputs. They are fitted on the out-of-fold predictions, so the score
of the fitted decision is computed nested: fold k's rows decided with
thresholds fitted on the other folds only. The thresholds fitted on every row
(what predict applies to the test set) are scored too, labelled in-sample:
that figure saw the rows it scores and is optimistic.

The search is coordinate ascent over a grid, the metric itself as objective:
each threshold in turn moves to the grid value that scores best with the
others held, for a few passes (the "optimised rounder" of ordinal Kaggle
solutions; for labels, a per-label search under the joint metric).
"""
from __future__ import annotations

import numpy as np

from pipeline.metrics import check_metric, compute, task_metric
from pipeline.models.task import Task

PASSES = 2
LABEL_GRID = np.round(np.arange(0.05, 0.951, 0.05), 2)  # a label's probability threshold
CUT_STEPS = np.linspace(-0.5, 0.5, 21)  # a grade cut moves within half a grade of its default


def needs_decision(task: Task, metric: str) -> bool:
    """Whether ``metric`` scores decisions that thresholds fitted on the outputs can improve."""
    return task.kind in ("multilabel", "ordinal") and check_metric(metric, task.kind).uses == "labels"


def fit_thresholds(task: Task, outputs: np.ndarray, targets: np.ndarray, metric: str, beta: float = 1.0,
                   passes: int = PASSES) -> tuple[float, ...]:
    """Thresholds that score ``metric`` best on these rows (coordinate ascent from the defaults)."""
    outputs, targets = np.asarray(outputs, dtype=np.float64), np.asarray(targets, dtype=np.float64)
    cuts = np.array(task.default_thresholds(), dtype=np.float64)
    if not len(cuts) or not len(targets):
        return tuple(cuts)
    sign = 1.0 if check_metric(metric, task.kind).greater_is_better else -1.0

    def value(candidate: np.ndarray) -> float:
        s = compute(metric, outputs, targets, 0, task=task.with_thresholds(candidate), beta=beta)
        return -np.inf if np.isnan(s) else sign * s

    best = value(cuts)
    for _ in range(passes):
        improved = False
        for k in range(len(cuts)):
            grid = LABEL_GRID if task.kind == "multilabel" else task.default_thresholds()[k] + CUT_STEPS
            for g in grid:
                if task.kind == "ordinal" and not _ordered(cuts, k, g):
                    continue
                trial = cuts.copy()
                trial[k] = g
                v = value(trial)
                if v > best + 1e-12:
                    best, cuts, improved = v, trial, True
        if not improved:
            break
    return tuple(float(c) for c in cuts)


def _ordered(cuts: np.ndarray, k: int, g: float) -> bool:
    return (k == 0 or g > cuts[k - 1]) and (k == len(cuts) - 1 or g < cuts[k + 1])


def nested_decision(task: Task, outputs: np.ndarray, targets: np.ndarray, folds: np.ndarray, metric: str,
                    beta: float = 1.0) -> tuple[dict, np.ndarray]:
    """The fitted decision's record and the nested decisions of the rows.

    The record holds the thresholds fitted on every row (for the test set) and the scores: nested (each
    fold decided by thresholds fitted on the others), in-sample (fitted on every row: optimistic) and with
    the default thresholds."""
    outputs, targets, folds = np.asarray(outputs, np.float64), np.asarray(targets, np.float64), np.asarray(folds)
    decided = np.zeros((len(targets), targets.shape[1] if targets.ndim > 1 else 1))
    per_fold = {}
    for k in np.unique(folds):
        held = folds == k
        cuts = fit_thresholds(task, outputs[~held], targets[~held], metric, beta)
        per_fold[int(k)] = list(cuts)
        decided[held] = task.with_thresholds(cuts).decide(outputs[held]).reshape(held.sum(), -1)
    everything = fit_thresholds(task, outputs, targets, metric, beta)
    nested = task_metric(task, metric, targets, decided, beta)
    return _record(task, outputs, targets, metric, beta, everything, nested, per_fold), decided


def decision_interval(task: Task, targets: np.ndarray, decided: np.ndarray, metric: str, beta: float = 1.0,
                      n: int = 200, seed: int = 0) -> tuple[float, float]:
    """A 95% percentile-bootstrap interval of ``metric`` over rows of fixed (nested) decisions."""
    rng = np.random.default_rng(seed)
    targets, values = np.asarray(targets), []
    for _ in range(n):
        rows = rng.integers(0, len(targets), len(targets))
        values.append(task_metric(task, metric, targets[rows], decided[rows], beta))
    values = np.asarray(values)[np.isfinite(values)]
    if not len(values):
        return np.nan, np.nan
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def _record(task, outputs, targets, metric, beta, everything, nested, per_fold) -> dict:
    return {"thresholds": list(everything), "nested": nested,
            "in_sample": compute(metric, outputs, targets, 0, task=task.with_thresholds(everything), beta=beta),
            "default": compute(metric, outputs, targets, 0, task=task.with_thresholds(task.default_thresholds()),
                               beta=beta),
            "per_fold": per_fold,
            "note": "nested: each fold's rows decided with thresholds fitted on the other folds; in_sample: "
                    "thresholds fitted on every out-of-fold row (optimistic); the test set gets those"}
