"""``--head logreg``: a linear head fitted by multinomial logistic regression on cached features.

With a frozen backbone the head problem is convex, so instead of epochs of SGD
the head is fitted once by scikit-learn on the training fold's cached
features, its regularisation C chosen by an inner K-fold CV on that fold only
(no validation image is seen), and the coefficients are written into the
model's own linear classifier: the member is an ordinary checkpoint that
predict and the out-of-fold scores use unchanged.
"""
from __future__ import annotations

import logging
import warnings

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold
from torch import nn

from pipeline.models.task import bad_mask
from pipeline.errors import PipelineError

log = logging.getLogger("pipeline")

CS = (0.1, 1.0, 10.0)  # inverse regularisation strengths tried on standardised features (few: it is slow)
INNER_FOLDS = 3
ABSENT_MARGIN = 2.0  # classes absent from the training fold: logit this far below the least likely present one
MAX_ITER = 500


def fit_logreg(x: np.ndarray, y: np.ndarray, n_classes: int, groups: np.ndarray | None = None, seed: int = 0,
               cs: tuple[float, ...] = CS, folds: int = INNER_FOLDS) -> tuple[np.ndarray, np.ndarray, dict]:
    """(weight (K, F), bias (K,), info) of a logistic regression on raw features ``x`` (N, F).

    The features are standardised inside; the returned weights act on the raw
    features. C is the one of ``cs`` with the lowest inner-CV log loss; rows of
    one image (``groups``: several augmented views) stay in one inner fold.
    """
    mu, sigma = x.mean(0), x.std(0) + 1e-6
    z = (x - mu) / sigma
    groups = np.arange(len(y)) if groups is None else groups
    scores = {c: _inner_cv_loss(z, y, groups, n_classes, c, seed, folds) for c in cs} if len(cs) > 1 else {cs[0]: 0}
    best = min(scores, key=scores.get)
    w, b = _fit(z, y, n_classes, best, seed)
    weight = w / sigma  # w . (x - mu) / sigma + b == (w / sigma) . x + (b - w . mu / sigma)
    bias = b - weight @ mu
    return weight, bias, {"C": best, "inner_cv_log_loss": {str(c): round(float(s), 5) for c, s in scores.items()}}


def _fit(z: np.ndarray, y: np.ndarray, n_classes: int, c: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Weights and biases over all ``n_classes`` (absent classes: zero weight, a low bias)."""
    present = np.unique(y)
    weight, bias = np.zeros((n_classes, z.shape[1])), np.zeros(n_classes)
    if len(present) == 1:  # one class: it always wins
        bias[:] = -ABSENT_MARGIN
        bias[present[0]] = 0.0
        return weight, bias
    with warnings.catch_warnings():  # few images per class is the normal case here, not "a regression problem"
        warnings.filterwarnings("ignore", message="The number of unique classes", category=UserWarning)
        clf = LogisticRegression(C=c, max_iter=MAX_ITER, random_state=seed).fit(z, y)
    coef, icpt = clf.coef_, clf.intercept_
    if len(present) == 2:  # binary: one row for classes_[1]; softmax over (-r/2, r/2) is the same model
        coef, icpt = np.vstack([-coef / 2, coef / 2]), np.concatenate([-icpt / 2, icpt / 2])
    bias[:] = icpt.min() - ABSENT_MARGIN
    weight[clf.classes_], bias[clf.classes_] = coef, icpt
    return weight, bias


def _inner_cv_loss(z: np.ndarray, y: np.ndarray, groups: np.ndarray, n_classes: int, c: float, seed: int,
                   folds: int) -> float:
    """Mean log loss of C over inner folds of the training rows (split by image)."""
    images = np.unique(groups)
    losses = []
    for tr, va in KFold(min(folds, len(images)), shuffle=True, random_state=seed).split(images):
        inner = np.isin(groups, images[tr])
        w, b = _fit(z[inner], y[inner], n_classes, c, seed)
        losses.append(_log_loss(z[~inner] @ w.T + b, y[~inner]))
    return float(np.mean(losses))


def _log_loss(logits: np.ndarray, y: np.ndarray) -> float:
    logp = torch.log_softmax(torch.from_numpy(logits), dim=1).numpy()
    return float(-logp[np.arange(len(y)), y].mean())


def fit_feature_head(model: nn.Module, loader, task, seed: int = 0, prior=None) -> tuple[float, dict]:
    """Fit the classifier of ``model`` on a feature loader's views and targets; the training log loss and
    the fit's record (C, the inner-CV log loss by C, rows and views fitted on: the run keeps it).

    ``loader`` is the data plan's FeatureLoader ((V, N, F) views, (N,) targets);
    unreadable images (pipeline/models/task.py's bad_mask) are left out. ``task`` (pipeline/models/task.py) says what is
    fitted: a softmax over its classes (single), or the fit of pipeline/train/linear_fits.py (the others).
    ``prior`` (pipeline/models/class_prior.py): the pretrained classifier's rows for classes it knows by
    name; the head is then fitted around them (pipeline/train/prior_fit.py).
    """
    views, targets = loader.views.float().cpu(), loader.targets.cpu()
    n_views, n = views.shape[:2]
    x = views.reshape(n_views * n, -1).numpy()
    meta = getattr(loader, "meta", None)  # metadata: fitted on the concatenation [features, metadata]
    if meta is not None:
        x = np.concatenate([x, np.tile(meta.float().numpy(), (n_views, 1))], axis=1)
    y = targets.repeat(n_views).numpy() if targets.ndim == 1 else targets.repeat(n_views, 1).numpy()
    groups = np.tile(np.arange(n), n_views)
    keep = ~bad_mask(y)
    if not keep.any():
        raise PipelineError("--head logreg: no readable training image to fit on")
    if task.kind != "single":
        return _fit_other(model, task, x[keep], y[keep], groups[keep], seed, n_views)
    n_classes = task.n_outputs
    if prior is not None:
        from pipeline.train.prior_fit import fit_logreg_prior

        weight, bias, info = fit_logreg_prior(x[keep], y[keep], prior.weight.numpy(), prior.bias.numpy(),
                                              groups[keep], seed)
        info["prior"] = prior.describe()
    else:
        weight, bias, info = fit_logreg(x[keep], y[keep], n_classes, groups[keep], seed)
    load_linear_head(model, weight, bias)
    log.info("logistic regression head%s: C %g chosen by inner CV on the training images (log loss by C: %s)",
             f" around the class prior (alpha {info['prior_alpha']:g})" if prior is not None else "",
             info["C"], info["inner_cv_log_loss"])
    record = {"head": "logreg", **info, "inner_folds": INNER_FOLDS, "rows": int(keep.sum()), "views": int(n_views)}
    return _log_loss(x[keep] @ weight.T + bias, y[keep]), record


def _fit_other(model: nn.Module, task, x: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int,
               n_views: int) -> tuple[float, dict]:
    from pipeline.train.linear_fits import fit_task_head

    if task.numeric:  # the head predicts the standardised target, as the SGD head is trained to
        y = (y - task.center) / task.scale
    weight, bias, info = fit_task_head(x, y, task.kind, groups, seed)
    load_linear_head(model, weight, bias)
    log.info("%s head fitted on the training images: %s", "logistic" if task.kind == "multilabel" else "ridge",
             {k: v for k, v in info.items() if k != "train_loss"})
    record = {"head": "logreg", **info, "rows": int(len(y)), "views": int(n_views)}
    return info["train_loss"], record


def load_linear_head(model: nn.Module, weight: np.ndarray, bias: np.ndarray) -> None:
    """Write ``weight``/``bias`` into the model's Linear classifier, undoing any logit scale it applies; with
    metadata (pipeline/models/fusion.py) the columns past the features go to its ``meta_head``."""
    if hasattr(model, "meta_head"):
        width = model.meta_head.in_features
        with torch.no_grad():
            model.meta_head.weight.copy_(torch.as_tensor(weight[:, -width:], dtype=model.meta_head.weight.dtype))
            model.meta_head.bias.zero_()
        model, weight = model.model, weight[:, :-width]
    layer = model.get_classifier()
    if not isinstance(layer, nn.Linear):
        raise PipelineError(f"--head logreg needs a Linear classifier, the model has a {type(layer).__name__}; "
                            "use --head linear")
    scale = float(getattr(model, "logit_scale", 1.0))  # e.g. fastnet multiplies its logits by 1/9
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(weight / scale, dtype=layer.weight.dtype))
        layer.bias.copy_(torch.as_tensor(bias / scale, dtype=layer.bias.dtype))
