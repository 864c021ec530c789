"""Multinomial logistic regression on probability rows: the ``--head logreg`` fit of soft targets.

A row with target probabilities ``p`` costs ``-sum_k p_k log softmax_k``, which
is exactly the cost of K copies of the row, copy k labelled k and weighted
``p_k``: scikit-learn's weighted fit of that expansion minimises the same
objective, ``C * sum of costs + |W|^2 / 2`` (intercepts free), but over N x K
rows. This fits it directly on the N rows with torch's L-BFGS in float64
(tests/test_soft_labels.py checks the two agree).
"""
from __future__ import annotations

import numpy as np
import torch


def fit_soft(z: np.ndarray, p: np.ndarray, c: float, absent_margin: float, max_iter: int = 500,
             tol: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    """(weight (K, F), bias (K,)) fitted on standardised features ``z`` (N, F) and probability rows ``p`` (N, K).

    Classes no row gives any probability get zero weights and a bias ``absent_margin`` below the lowest fitted
    one, as the hard fit gives absent classes. ``tol``: the largest gradient component at the end, on the cost
    scaled as scikit-learn scales it (by 1 / (C N); its default tol is 1e-4).
    """
    present = np.asarray(p).sum(axis=0) > 0
    x = torch.as_tensor(np.asarray(z), dtype=torch.float64)
    q = torch.as_tensor(np.asarray(p)[:, present], dtype=torch.float64)
    n, k, f = len(x), int(present.sum()), x.shape[1]
    w = torch.zeros(k, f, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-12,
                            history_size=10, line_search_fn="strong_wolfe")

    def cost() -> torch.Tensor:
        opt.zero_grad()
        value = -(q * torch.log_softmax(x @ w.T + b, dim=1)).sum() / n + (w * w).sum() / (2 * c * n)
        value.backward()
        return value

    opt.step(cost)
    weight, bias = np.zeros((p.shape[1], f)), np.zeros(p.shape[1])
    weight[present], bias[present] = w.detach().numpy(), b.detach().numpy()
    bias[~present] = bias[present].min() - absent_margin
    return weight, bias
