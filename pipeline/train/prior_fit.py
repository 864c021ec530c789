"""The logistic-regression head fitted around a class prior: the pretrained classifier's rows.

For the classes the pretrained classifier knows by name (pipeline/models/class_prior.py)
its logits ``p(x) = P x + q`` are a strong start. The head fitted here is

    logits = alpha * p(x) + W z + b,    z the standardised features,

with ``alpha`` (one number: how far to trust the prior) free and ``W, b``
shrunk to zero by an L2 penalty of strength 1/C: with few images the head
stays the prior, with many it learns the difference. Unmatched classes have
a zero prior row and are fitted like the plain head; a class absent from the
training rows keeps its prior logit (less a learnt shift) instead of being
ruled out. The logits are linear in (alpha, W, b), so the problem is convex:
L-BFGS in float64 finds its one optimum, the same on every run. C is chosen
by an inner CV over the training images only, as for the plain head
(pipeline/train/logreg.py), and the result is again one Linear layer on the
raw features, an ordinary checkpoint.
"""
from __future__ import annotations

import numpy as np
import torch
from sklearn.model_selection import KFold

CS = (0.001, 0.01, 0.1)  # penalty strengths tried (the correction around a good prior wants a small C)
MAX_ITER = 300


def _fit(z: torch.Tensor, offset: torch.Tensor, y: torch.Tensor, c: float) -> tuple[torch.Tensor, ...]:
    """(alpha, W, b) minimising the summed cross-entropy + (|W|^2 + |b|^2) / (2C)."""
    k = offset.shape[1]
    alpha = torch.ones(1, dtype=torch.float64, requires_grad=True)
    w = torch.zeros(k, z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([alpha, w, b], max_iter=MAX_ITER, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-7, tolerance_change=1e-10, history_size=20)

    def closure() -> torch.Tensor:  # the objective over the number of rows: the same optimum, tolerances per row
        opt.zero_grad()
        logits = alpha * offset + z @ w.T + b
        loss = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
        loss = (loss + (w.pow(2).sum() + b.pow(2).sum()) / (2 * c)) / len(y)
        loss.backward()
        return loss

    opt.step(closure)
    return alpha.detach(), w.detach(), b.detach()


def _loss(alpha, w, b, z, offset, y) -> float:
    logits = alpha * offset + z @ w.T + b
    return float(torch.nn.functional.cross_entropy(logits, y))


def fit_logreg_prior(x: np.ndarray, y: np.ndarray, prior_weight: np.ndarray, prior_bias: np.ndarray,
                     groups: np.ndarray | None = None, seed: int = 0, cs: tuple[float, ...] = CS,
                     folds: int = 3) -> tuple[np.ndarray, np.ndarray, dict]:
    """(weight (K, F'), bias (K,), info) of the head on raw features ``x`` (N, F'), around the prior rows
    ``prior_weight`` (K, F) acting on the first F columns (further columns: metadata, no prior)."""
    x64 = torch.from_numpy(np.asarray(x, dtype=np.float64))
    mu, sigma = x64.mean(0), x64.std(0, unbiased=False) + 1e-6
    z = (x64 - mu) / sigma
    pw = torch.zeros(prior_weight.shape[0], x64.shape[1], dtype=torch.float64)
    pw[:, :prior_weight.shape[1]] = torch.from_numpy(np.asarray(prior_weight, dtype=np.float64))
    pb = torch.from_numpy(np.asarray(prior_bias, dtype=np.float64))
    offset = x64 @ pw.T + pb
    yt = torch.from_numpy(np.asarray(y)).long()
    groups = np.arange(len(y)) if groups is None else groups
    images = np.unique(groups)
    scores = {}
    for c in cs if len(cs) > 1 else ():
        losses = []
        for tr, va in KFold(min(folds, len(images)), shuffle=True, random_state=seed).split(images):
            inner = torch.from_numpy(np.isin(groups, images[tr]))
            params = _fit(z[inner], offset[inner], yt[inner], c)
            losses.append(_loss(*params, z[~inner], offset[~inner], yt[~inner]))
        scores[c] = float(np.mean(losses))
    best = min(scores, key=scores.get) if scores else cs[0]
    alpha, w, b = _fit(z, offset, yt, best)
    weight = alpha * pw + w / sigma  # alpha (P x + q) + w (x - mu) / sigma + b, as one Linear on x
    bias = alpha * pb + b - (w / sigma) @ mu
    info = {"C": best, "inner_cv_log_loss": {str(c): round(s, 5) for c, s in scores.items()},
            "prior_alpha": round(float(alpha), 5)}
    return weight.numpy(), bias.numpy(), info
