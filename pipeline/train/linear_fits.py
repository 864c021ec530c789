"""``--head logreg`` for the task kinds other than single: a convex fit on cached features per kind.

Multilabel: one binary logistic regression per label (C by inner-CV mean
binary cross-entropy); regression and ordinal: ridge regression on the
standardised target (alpha by inner-CV squared error). As for the softmax
head (pipeline/train/logreg.py), the regularisation is chosen on the training
rows only, split by image, and the coefficients act on the raw features.
"""
from __future__ import annotations

import warnings

import numpy as np
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.model_selection import KFold

CS = (0.1, 1.0, 10.0)  # logistic: inverse regularisation strengths on standardised features
ALPHAS = (1.0, 10.0, 100.0, 1000.0)  # ridge: penalties on standardised features
ABSENT_LOGIT = 8.0  # a label always (never) present in the training rows: a constant logit of this size


def _label_fit(z: np.ndarray, y: np.ndarray, c: float, seed: int) -> tuple[np.ndarray, float]:
    if y.min() == y.max():  # one side only: a constant prediction
        return np.zeros(z.shape[1]), ABSENT_LOGIT if y[0] > 0.5 else -ABSENT_LOGIT
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf = LogisticRegression(C=c, max_iter=500, random_state=seed).fit(z, y.astype(int))
    return clf.coef_[0], float(clf.intercept_[0])


def _fit(z: np.ndarray, y: np.ndarray, kind: str, value: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if kind == "multilabel":
        parts = [_label_fit(z, y[:, k], value, seed) for k in range(y.shape[1])]
        return np.stack([w for w, _ in parts]), np.array([b for _, b in parts])
    model = Ridge(alpha=value).fit(z, y[:, 0])
    return model.coef_[None, :], np.array([model.intercept_])


def _loss(z: np.ndarray, y: np.ndarray, w: np.ndarray, b: np.ndarray, kind: str) -> float:
    out = z @ w.T + b
    if kind == "multilabel":
        p = np.clip(1 / (1 + np.exp(-out)), 1e-7, 1 - 1e-7)
        return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    return float(np.mean((out - y) ** 2))


def fit_task_head(x: np.ndarray, y: np.ndarray, kind: str, groups: np.ndarray, seed: int = 0,
                  folds: int = 3) -> tuple[np.ndarray, np.ndarray, dict]:
    """(weight (K, F), bias (K,), record) on raw features ``x``; ``y`` is (N, L) 0/1 (multilabel) or the
    standardised target (N, 1) (regression, ordinal)."""
    mu, sigma = x.mean(0), x.std(0) + 1e-6
    z = (x - mu) / sigma
    values = CS if kind == "multilabel" else ALPHAS
    images = np.unique(groups)
    scores = {}
    for value in values:
        losses = []
        for tr, va in KFold(min(folds, len(images)), shuffle=True, random_state=seed).split(images):
            inner = np.isin(groups, images[tr])
            w, b = _fit(z[inner], y[inner], kind, value, seed)
            losses.append(_loss(z[~inner], y[~inner], w, b, kind))
        scores[value] = float(np.mean(losses))
    best = min(scores, key=scores.get)
    w, b = _fit(z, y, kind, best, seed)
    weight = w / sigma
    bias = b - weight @ mu
    name = "C" if kind == "multilabel" else "alpha"
    return weight, bias, {name: best, "inner_cv_loss": {str(v): round(s, 5) for v, s in scores.items()},
                          "train_loss": _loss(z, y, w, b, kind)}
