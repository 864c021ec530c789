"""Blending runs of the task kinds other than single (multilabel, regression, ordinal).

The weights (w >= 0, sum 1) minimise the kind's smooth loss of the weighted
average of the runs' out-of-fold outputs: the mean binary cross-entropy of the
label probabilities (multilabel), the mean squared error of the numbers
(regression, ordinal). Nesting is exact: fold k's rows are blended with
weights fitted on the other folds and, where the metric scores decisions,
decided with thresholds fitted on the other folds' blend made with those same
weights; the blended CV scores those rows once. The test set gets the weights
and the thresholds fitted on every row (their in-sample score is optimistic).
"""
from __future__ import annotations

import numpy as np

from pipeline.errors import PipelineError
from pipeline.metrics import bootstrap_interval, reported_metrics, score, task_metric
from pipeline.models.task import Task
from pipeline.predict.decide import decision_interval, fit_thresholds, needs_decision

FITTED_ON = {"multilabel": "bce", "regression": "rmse", "ordinal": "rmse"}  # (minimising MSE minimises RMSE)
NOTE = ("blended CV: each fold blended with weights (and thresholds) fitted on the other folds, scored once; "
        "in-sample: fitted on every out-of-fold row, optimistic")


def _loss_and_grad(outputs: np.ndarray, targets: np.ndarray, kind: str):
    """The kind's loss of the blend (weights -> loss) and its gradient; ``outputs`` (R, N, K)."""
    if kind == "multilabel":
        def loss(w):
            p = np.clip(np.tensordot(w, outputs, axes=1), 1e-7, 1 - 1e-7)
            return float(-np.mean(targets * np.log(p) + (1 - targets) * np.log(1 - p)))

        def grad(w):
            p = np.clip(np.tensordot(w, outputs, axes=1), 1e-7, 1 - 1e-7)
            d = -(targets / p - (1 - targets) / (1 - p)) / targets.size
            return np.tensordot(outputs, d, axes=([1, 2], [0, 1]))
        return loss, grad

    def mse(w):
        return float(np.mean((np.tensordot(w, outputs, axes=1) - targets) ** 2))

    def mse_grad(w):
        d = 2 * (np.tensordot(w, outputs, axes=1) - targets) / targets.size
        return np.tensordot(outputs, d, axes=([1, 2], [0, 1]))
    return mse, mse_grad


def fit_weights(outputs: np.ndarray, targets: np.ndarray, kind: str) -> np.ndarray:
    """Simplex weights (R,) minimising the kind's loss of the blend of ``outputs`` (R, N, K)."""
    from scipy.optimize import minimize  # lazily: scipy takes a second to import

    loss, grad = _loss_and_grad(outputs, targets, kind)
    n = outputs.shape[0]
    result = minimize(loss, np.full(n, 1.0 / n), jac=grad, method="SLSQP", bounds=[(0.0, 1.0)] * n,
                      options={"ftol": 1e-12, "maxiter": 1000},
                      constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones_like(w)}])
    if not result.success:
        raise PipelineError(f"fitting the blend weights failed ({result.message}); blend fewer or other runs")
    weights = np.clip(result.x, 0.0, None)
    return weights / weights.sum()


def blend_scores_task(task: Task, outputs: np.ndarray, targets: np.ndarray, folds: np.ndarray, metric: str,
                      beta: float = 1.0) -> dict:
    """Each run's CV, the weights (and thresholds) fitted on every row, the nested blended CV, in-sample."""
    names = reported_metrics(metric, task.kind)
    decide = needs_decision(task, metric)
    weights = fit_weights(outputs, targets, task.kind)
    blended_all = np.tensordot(weights, outputs, axes=1)
    cuts = fit_thresholds(task, blended_all, targets, metric, beta) if decide else ()
    nested = np.empty(blended_all.shape)
    decided = np.empty((len(targets), targets.shape[1]))
    fold_weights, fold_cuts = {}, {}
    for k in np.unique(folds):
        held = folds == k
        w = fit_weights(outputs[:, ~held], targets[~held], task.kind)
        nested[held] = np.tensordot(w, outputs[:, held], axes=1)
        fold_weights[int(k)] = w.tolist()
        if decide:
            c = fit_thresholds(task, np.tensordot(w, outputs[:, ~held], axes=1), targets[~held], metric, beta)
            fold_cuts[int(k)] = list(c)
            decided[held] = task.with_thresholds(c).decide(nested[held]).reshape(held.sum(), -1)
    kw = {"task": task, "beta": beta}
    blended = score(nested, targets, 0, names, **kw)
    if decide:  # the decision metric on the nested decisions (each fold's own thresholds)
        blended[metric] = task_metric(task, metric, targets, decided, beta)
        interval = decision_interval(task, targets, decided, metric, beta)
    else:
        interval = bootstrap_interval(nested, targets, 0, metric, n=200, task=task, beta=beta)
    final = task.with_thresholds(cuts) if decide else task
    in_sample = score(blended_all, targets, 0, names, task=final, beta=beta)
    runs = [score(o, targets, 0, names, **kw) for o in outputs]  # with default thresholds
    return {"metric": metric, "fitted_on": FITTED_ON[task.kind], "weights": weights.tolist(),
            "fold_weights": fold_weights, "thresholds": list(cuts), "fold_thresholds": fold_cuts,
            "runs": runs, "blended_cv": blended[metric], "blended": blended, "interval": list(interval),
            "in_sample": in_sample[metric], "in_sample_scores": in_sample, "note": NOTE}
