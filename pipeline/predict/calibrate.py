"""Calibration of a run's probabilities for log-loss scoring: a temperature and a mix with the class prior.

    calibrated = (1 - w) * softmax(log(p) / T) + w * prior

``T`` softens (> 1) or sharpens (< 1) the ensemble; ``w`` in [0, 1] mixes in
the add-one class frequencies of the training labels, so a class the model
never saw gets a floor (on the dog data some breeds are absent from a fold's
training rows, and the model gives their images ~5e-4). Both are fitted on the
out-of-fold predictions by minimising the log loss. Scored honestly, the
nested way (as pipeline/predict/blend.py's weights): fold k's rows are
calibrated with values fitted on the other folds, whose priors never count
fold k's labels; the values fitted on every row (an optimistic in-sample
score) are stored in cv.json and applied to the test predictions by predict
and blend. The core is pure; :func:`calibrate_oof` and :func:`apply_stored`
are the hooks of pipeline/predict/cv.py and the predict/blend stages.
"""
from __future__ import annotations

import numpy as np

LOG_FLOOR = 1e-15  # probabilities are floored before the log: a 0 would make log(p) / T undefined
T_BOUNDS = (0.05, 20.0)


def is_on(setting: str, metric: str) -> bool:
    """Whether a run with --calibrate ``setting`` calibrates for a competition scored by ``metric``."""
    return setting == "on" or (setting == "auto" and metric == "log_loss")


def class_prior(targets: np.ndarray, n_classes: int) -> np.ndarray:
    """Add-one class frequencies (C,) of ``targets``: every class, seen or not, gets a share."""
    counts = np.bincount(np.asarray(targets, dtype=np.int64), minlength=n_classes).astype(np.float64)
    return (counts + 1.0) / (counts.sum() + n_classes)


def row_priors(targets: np.ndarray, folds: np.ndarray, n_classes: int, held_out=None) -> np.ndarray:
    """Each row's prior (N, C): the labels of the folds its model trained on, never fold ``held_out``'s."""
    out = np.empty((len(targets), n_classes))
    for k in np.unique(folds):
        seen = (folds != k) if held_out is None else (folds != k) & (folds != held_out)
        out[folds == k] = class_prior(targets[seen], n_classes)
    return out


def apply_calibration(probs: np.ndarray, temperature: float, weight: float, prior: np.ndarray) -> np.ndarray:
    """``probs`` (N, C) tempered by ``temperature`` and mixed with ``prior`` ((C,) or (N, C)) at ``weight``."""
    logits = np.log(np.maximum(probs, LOG_FLOOR)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    tempered = np.exp(logits)
    tempered /= tempered.sum(axis=1, keepdims=True)
    return (1.0 - weight) * tempered + weight * prior


def _log_loss(probs: np.ndarray, targets: np.ndarray) -> float:
    return float(-np.mean(np.log(np.maximum(probs[np.arange(len(targets)), targets], LOG_FLOOR))))


def fit_calibration(probs: np.ndarray, targets: np.ndarray, prior: np.ndarray) -> tuple[float, float]:
    """(temperature, weight) minimising the log loss of the calibrated ``probs`` against ``targets``.

    The fit starts from the identity (1, 0) and from a few mixes, and keeps
    the best: never worse on these rows than the uncalibrated probabilities
    (T 1, w 0) or the prior alone (w 1).
    """
    from scipy.optimize import minimize  # lazily: scipy takes a second to import

    def loss(x: np.ndarray) -> float:
        return _log_loss(apply_calibration(probs, x[0], x[1], prior), targets)

    candidates = [np.array([1.0, 0.0]), np.array([1.0, 1.0])]
    for start in ([1.0, 0.0], [1.5, 0.1], [0.7, 0.02]):
        result = minimize(loss, np.array(start), method="L-BFGS-B", bounds=[T_BOUNDS, (0.0, 1.0)])
        candidates.append(np.clip(result.x, [T_BOUNDS[0], 0.0], [T_BOUNDS[1], 1.0]))
    best = min(candidates, key=loss)
    return float(best[0]), float(best[1])


def nested_calibration(probs: np.ndarray, targets: np.ndarray, folds: np.ndarray,
                       n_classes: int) -> tuple[np.ndarray, dict[int, list[float]]]:
    """Out-of-fold calibrated probabilities (N, C): fold k's rows with (T, w) fitted on the other folds' rows.

    The fit for fold k sees neither fold k's rows nor its labels (its rows'
    priors leave fold k out); fold k's own rows are then mixed with the prior
    of the folds their model trained on.
    """
    out = np.empty_like(probs, dtype=np.float64)
    fitted = {}
    for k in np.unique(folds):
        inside = folds == k
        priors = row_priors(targets, folds, n_classes, held_out=k)[~inside]
        t, w = fit_calibration(probs[~inside], targets[~inside], priors)
        out[inside] = apply_calibration(probs[inside], t, w, class_prior(targets[~inside], n_classes))
        fitted[int(k)] = [t, w]
    return out, fitted


def calibrate_oof(probs: np.ndarray, targets: np.ndarray, folds: np.ndarray,
                  classes: list[str]) -> tuple[np.ndarray, np.ndarray, dict]:
    """The nested calibrated OOF (what the CV scores), the in-sample calibrated OOF, and what is stored.

    The stored record holds the values fitted on every row and the prior of
    every training label, by class name: what the test predictions get.
    """
    n_classes = len(classes)
    nested, per_fold = nested_calibration(probs, targets, folds, n_classes)
    t, w = fit_calibration(probs, targets, row_priors(targets, folds, n_classes))
    in_sample = apply_calibration(probs, t, w, row_priors(targets, folds, n_classes))
    prior = class_prior(targets, n_classes)
    record = {"temperature": t, "weight": w, "prior": dict(zip(classes, prior.tolist())),
              "folds": {str(k): {"temperature": v[0], "weight": v[1]} for k, v in per_fold.items()}}
    return nested, in_sample, record


def paired_change_interval(before: np.ndarray, after: np.ndarray, targets: np.ndarray, n: int = 1000,
                           seed: int = 0) -> list[float]:
    """95% bootstrap interval of the mean change of per-row log loss, ``after`` minus ``before`` (same rows).

    Paired: each resample takes the same rows of both, so the row-to-row
    spread that dominates each score's own interval cancels; an interval
    wholly below 0 means calibration wins beyond the noise of these rows.
    """
    rows = np.arange(len(targets))
    change = (np.log(np.maximum(before[rows, targets], LOG_FLOOR))
              - np.log(np.maximum(after[rows, targets], LOG_FLOOR)))
    picks = np.random.default_rng(seed).integers(0, len(change), (n, len(change)))
    means = change[picks].mean(axis=1)
    return [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]


def stored(run) -> dict | None:
    """The calibration a run's cv.json holds (None: the run is not calibrated)."""
    return (run.read_cv() or {}).get("calibration")


def apply_stored(record: dict | None, probs: np.ndarray, classes: list[str]) -> np.ndarray:
    """``probs`` (N, C, columns ``classes``) calibrated with a run's stored record (None: unchanged)."""
    if not record:
        return probs
    prior = np.array([record["prior"][c] for c in classes])  # by name
    return apply_calibration(np.asarray(probs, dtype=np.float64), record["temperature"], record["weight"], prior)
