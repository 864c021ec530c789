"""Scores from probabilities, with scikit-learn's metrics (Kaggle's definitions)."""
from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import accuracy_score, log_loss

from pipeline.competition import Competition


def score(probs: np.ndarray, targets: np.ndarray, num_classes: int) -> dict[str, float]:
    """Accuracy and multi-class log loss of (N, C) probabilities against (N,) targets."""
    if len(targets) == 0:
        return {"accuracy": math.nan, "log_loss": math.nan}
    probs = np.asarray(probs, dtype=np.float64)
    probs = probs / probs.sum(axis=1, keepdims=True)
    return {
        "accuracy": float(accuracy_score(targets, probs.argmax(axis=1))),
        "log_loss": float(log_loss(targets, probs, labels=list(range(num_classes)))),
    }


def is_better(comp: Competition, new: float, old: float | None) -> bool:
    """Whether ``new`` beats ``old`` under the competition's metric (NaN never does)."""
    if math.isnan(new):
        return False
    if old is None or math.isnan(old):
        return True
    return new > old if comp.higher_is_better else new < old


def better(metric: str, new: float, old: float | None) -> bool:
    """Whether ``new`` beats ``old`` under ``metric`` (NaN never does; a missing old always loses)."""
    if math.isnan(new):
        return False
    if old is None or math.isnan(old):
        return True
    return new > old if metric == "accuracy" else new < old
