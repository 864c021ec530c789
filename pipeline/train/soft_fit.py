"""Multinomial logistic regression on probability rows: the ``--head logreg`` fit of soft targets.

A row with target probabilities ``p`` costs ``-sum_k p_k log softmax_k``, which
is exactly the cost of K copies of the row, copy k labelled k and weighted
``p_k``: scikit-learn's weighted fit of that expansion minimises the same
objective, ``C * sum of costs + |W|^2 / 2`` (intercepts free), but over N x K
rows. This fits it directly on the N rows with L-BFGS (tests/test_soft_labels.py
checks the two agree).
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp


def fit_soft(z: np.ndarray, p: np.ndarray, c: float, absent_margin: float,
             max_iter: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """(weight (K, F), bias (K,)) fitted on standardised features ``z`` (N, F) and probability rows ``p`` (N, K).

    Classes no row gives any probability get zero weights and a bias ``absent_margin`` below the lowest fitted
    one, as the hard fit gives absent classes.
    """
    z, p = np.asarray(z, dtype=np.float64), np.asarray(p, dtype=np.float64)
    present = p.sum(axis=0) > 0
    q = p[:, present]
    k, f = q.shape[1], z.shape[1]
    mass = q.sum(axis=1, keepdims=True)

    def cost(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:k * f].reshape(k, f), theta[k * f:]
        logits = z @ w.T + b
        logp = logits - logsumexp(logits, axis=1, keepdims=True)
        g = np.exp(logp) * mass - q  # d cost / d logits
        value = -c * float((q * logp).sum()) + 0.5 * float((w * w).sum())
        return value, np.concatenate([(c * g.T @ z + w).ravel(), c * g.sum(axis=0)])

    fit = minimize(cost, np.zeros(k * f + k), jac=True, method="L-BFGS-B",
                   options={"maxiter": max_iter, "gtol": 1e-6})
    weight, bias = np.zeros((p.shape[1], f)), np.zeros(p.shape[1])
    weight[present], bias[present] = fit.x[:k * f].reshape(k, f), fit.x[k * f:]
    bias[~present] = bias[present].min() - absent_margin
    return weight, bias
