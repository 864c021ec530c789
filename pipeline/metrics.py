"""Scores from probabilities, with scikit-learn's metrics (Kaggle's definitions).

Every metric lives in :data:`METRICS` with its direction and whether it reads
the (N, C) probabilities or their argmax labels. Probabilities are renormalised
per row before scoring; ``clip`` floors them first with :func:`clip_probs`, the
same function the submission writer uses, so a CV log loss equals what the
clipped submission would score.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal, Sequence

from pipeline.errors import check_choice

if TYPE_CHECKING:
    import numpy as np
else:
    class _Numpy:
        """numpy, imported on first use: building a competition checks its metric's name (reorg, check) and
        needs none of it. The first attribute read replaces this stand-in by numpy itself."""

        def __getattr__(self, name: str):
            import numpy

            globals()["np"] = numpy
            return getattr(numpy, name)

    np = _Numpy()

# fn(targets, outputs or decisions, num_classes, positive class or None) -> score. By task (pipeline/models/task.py):
# single: targets (N,) class indices, outputs (N, C) probabilities, decisions (N,) argmax labels;
# multilabel: targets (N, L) 0/1, outputs (N, L) probabilities, decisions (N, L) 0/1 (thresholded);
# regression: targets (N, 1) numbers, outputs (N, 1) numbers, decisions the outputs;
# ordinal: targets (N, 1) grade indices, outputs (N, 1) numbers, decisions (N, 1) grade indices (thresholds).
MetricFn = Callable[["np.ndarray", "np.ndarray", int, "int | None"], float]


@dataclass(frozen=True)
class Metric:
    """One scoring rule: its name, direction, input kind, function and the tasks it scores."""

    name: str
    greater_is_better: bool
    uses: Literal["probs", "labels"]  # the model's outputs, or the decisions made from them
    fn: MetricFn
    tasks: tuple[str, ...] = ("single",)


def _accuracy(targets: np.ndarray, labels: np.ndarray, num_classes: int, positive: int | None) -> float:
    from sklearn.metrics import accuracy_score  # lazily: sklearn takes seconds to import

    return float(accuracy_score(targets, labels))


def _log_loss(targets: np.ndarray, probs: np.ndarray, num_classes: int, positive: int | None) -> float:
    """scikit-learn's log_loss(labels=range(C)) (probabilities clipped to [eps, 1 - eps] of float64), in numpy:
    each member's bootstrap interval calls it a thousand times, and scikit-learn's checks took 4 ms a call (5 % of
    the dog recipe's 3-fold run, issue 26). Anything unusual (a bad shape, values outside [0, 1], rows not summing
    to 1, a target outside the classes) goes to scikit-learn, for its error or warning."""
    targets, probs = np.asarray(targets), np.asarray(probs, dtype=np.float64)
    eps = np.finfo(np.float64).eps
    plain = (probs.ndim == 2 and probs.shape[1] == num_classes and len(targets) == len(probs) > 0
             and targets.ndim == 1 and np.issubdtype(targets.dtype, np.integer)
             and 0 <= targets.min() and targets.max() < num_classes and 0 <= probs.min() and probs.max() <= 1
             and np.allclose(probs.sum(axis=1), 1.0, rtol=np.sqrt(eps), atol=0))
    if not plain:
        from sklearn.metrics import log_loss  # lazily: sklearn takes seconds to import

        return float(log_loss(targets, probs, labels=list(range(num_classes))))
    return float(-np.log(np.clip(probs[np.arange(len(targets)), targets], eps, 1 - eps)).mean())


def _auc_one(is_pos: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of one class against the rest; NaN when the targets hold only one side.

    The Mann-Whitney form of scikit-learn's roc_auc_score (tied scores share their average rank, counting
    half), in numpy: the bootstrap intervals call it a thousand times per class.
    """
    is_pos = np.asarray(is_pos, dtype=bool)
    n_pos = int(is_pos.sum())
    n_neg = len(is_pos) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    values, inverse, counts = np.unique(np.asarray(scores, dtype=np.float64), return_inverse=True,
                                        return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based rank of each distinct score, ties averaged
    ranks = average_rank[inverse.reshape(-1)]
    return float((ranks[is_pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _roc_auc(targets: np.ndarray, probs: np.ndarray, num_classes: int, positive: int | None) -> float:
    """Binary: AUC of the positive class's probability (class 1 unless ``positive``).

    More classes: the macro mean of one-vs-rest AUCs over the classes that have
    both positives and negatives among the targets (a class absent from the
    targets has no defined AUC, so it is left out rather than counted as 0 or
    0.5); NaN when no class qualifies. ``positive`` picks one class's
    one-vs-rest AUC instead.
    """
    if positive is not None or num_classes == 2:
        k = 1 if positive is None else positive
        return _auc_one(targets == k, probs[:, k])
    aucs = [_auc_one(targets == k, probs[:, k]) for k in range(num_classes)]
    aucs = [a for a in aucs if not math.isnan(a)]
    return float(np.mean(aucs)) if aucs else math.nan


def _qwk(targets: np.ndarray, labels: np.ndarray, num_classes: int, positive: int | None) -> float:
    """Quadratic weighted kappa over the grades 0..C-1 (a grade absent from both sides keeps its distance), as
    scikit-learn's cohen_kappa_score(weights="quadratic", labels=range(C)) computes it, in numpy: the bootstrap
    intervals call it a thousand times."""
    targets, labels = np.asarray(targets, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    n = max(num_classes, int(max(targets.max(initial=0), labels.max(initial=0))) + 1)
    observed = np.bincount(targets * n + labels, minlength=n * n).reshape(n, n).astype(np.float64)
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0)) / max(observed.sum(), 1)
    grades = np.arange(n)
    weights = (grades[:, None] - grades[None, :]) ** 2
    denominator = float((weights * expected).sum())
    return 1.0 - float((weights * observed).sum()) / denominator if denominator else math.nan


def _macro_f1(targets: np.ndarray, labels: np.ndarray, num_classes: int, positive: int | None) -> float:
    from sklearn.metrics import f1_score  # lazily: sklearn takes seconds to import

    # a class absent from both targets and predictions scores 0 (zero_division), as in sklearn
    return float(f1_score(targets, labels, average="macro", labels=list(range(num_classes)), zero_division=0))


def _f_beta(average: str) -> MetricFn:
    def fn(targets: np.ndarray, decided: np.ndarray, num_classes: int, positive: int | None, beta: float = 1.0) -> float:
        return _f_beta_counts(np.asarray(targets) > 0.5, np.asarray(decided) > 0.5, beta, average)
    return fn


def _f_beta_counts(truth: np.ndarray, decided: np.ndarray, beta: float, average: str) -> float:
    """F-beta of (N, L) label sets from true/false positive counts, as scikit-learn's fbeta_score(average=...,
    zero_division=0) on a multilabel indicator, in numpy (the bootstrap calls it a thousand times): samples
    averages each image's F-beta, micro pools the counts, macro averages each label's; an image or label with
    nothing true and nothing predicted scores 0. One column is one label (scikit-learn would read it as a
    binary pair of classes)."""
    b2 = beta * beta
    axis = {"samples": 1, "macro": 0, "micro": None}[average]
    tp = (truth & decided).sum(axis=axis)
    fp = (~truth & decided).sum(axis=axis)
    fn = (truth & ~decided).sum(axis=axis)
    numerator = (1 + b2) * np.asarray(tp, dtype=np.float64)
    denominator = numerator + b2 * fn + fp
    scores = np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)
    return float(np.mean(scores))


def _mean_auc(targets: np.ndarray, probs: np.ndarray, num_classes: int, positive: int | None) -> float:
    """The mean of the per-column ROC AUCs over the columns with both 0s and 1s among the targets."""
    aucs = [_auc_one(targets[:, k] > 0.5, probs[:, k]) for k in range(targets.shape[1])]
    aucs = [a for a in aucs if not math.isnan(a)]
    return float(np.mean(aucs)) if aucs else math.nan


def _rmse(targets: np.ndarray, values: np.ndarray, num_classes: int, positive: int | None) -> float:
    from sklearn.metrics import mean_squared_error  # lazily: sklearn takes seconds to import

    return float(math.sqrt(mean_squared_error(targets.reshape(-1), values.reshape(-1))))


def _mae(targets: np.ndarray, values: np.ndarray, num_classes: int, positive: int | None) -> float:
    from sklearn.metrics import mean_absolute_error  # lazily: sklearn takes seconds to import

    return float(mean_absolute_error(targets.reshape(-1), values.reshape(-1)))


def _grade_qwk(targets: np.ndarray, grades: np.ndarray, num_classes: int, positive: int | None) -> float:
    return _qwk(targets.reshape(-1).astype(int), grades.reshape(-1).astype(int), num_classes, positive)


def _grade_accuracy(targets: np.ndarray, grades: np.ndarray, num_classes: int, positive: int | None) -> float:
    return _accuracy(targets.reshape(-1).astype(int), grades.reshape(-1).astype(int), num_classes, positive)


def _bce(targets: np.ndarray, probs: np.ndarray, num_classes: int, positive: int | None) -> float:
    """Mean binary cross-entropy over every (image, label) pair: multi-label's log loss."""
    p = np.clip(probs, 1e-15, 1 - 1e-15)
    return float(-np.mean(targets * np.log(p) + (1 - targets) * np.log(1 - p)))


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("accuracy", True, "labels", _accuracy),
    Metric("log_loss", False, "probs", _log_loss),
    Metric("roc_auc", True, "probs", _roc_auc),
    Metric("qwk", True, "labels", _qwk),  # quadratic weighted kappa; class order is the grade order
    Metric("macro_f1", True, "labels", _macro_f1),
    Metric("f_beta_samples", True, "labels", _f_beta("samples"), ("multilabel",)),
    Metric("f_beta_micro", True, "labels", _f_beta("micro"), ("multilabel",)),
    Metric("f_beta_macro", True, "labels", _f_beta("macro"), ("multilabel",)),
    Metric("mean_auc", True, "probs", _mean_auc, ("multilabel",)),
    Metric("bce", False, "probs", _bce, ("multilabel",)),
    Metric("rmse", False, "probs", _rmse, ("regression", "ordinal")),
    Metric("mae", False, "probs", _mae, ("regression", "ordinal")),
    Metric("grade_qwk", True, "labels", _grade_qwk, ("ordinal",)),
    Metric("grade_accuracy", True, "labels", _grade_accuracy, ("ordinal",)),
)}
# the name a spec gives -> the metric that scores it for a task (ordinal's qwk is on grades, not class argmax)
_FOR_TASK = {("ordinal", "qwk"): "grade_qwk", ("ordinal", "accuracy"): "grade_accuracy"}


def metric_for(name: str, task: str = "single") -> str:
    """The METRICS name that scores ``name`` (a spec's metric) for ``task``."""
    return _FOR_TASK.get((task, name), name)


def check_metric(name: str, task: str | None = None) -> Metric:
    """The metric called ``name``, or an error listing the valid names (for ``task`` when given)."""
    if task is None:
        check_choice("metric", name, tuple(METRICS))
        return METRICS[name]
    valid = tuple(dict.fromkeys(n for n, m in METRICS.items() if task in m.tasks) |
                  {k[1]: None for k in _FOR_TASK if k[0] == task})
    valid = tuple(n for n in valid if not n.startswith("grade_"))
    check_choice(f"metric of task {task!r}", name, valid)
    return METRICS[metric_for(name, task)]


def clip_probs(probs: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """(N, C) probabilities floored at ``eps``, each row renormalised to sum 1."""
    floored = np.maximum(np.asarray(probs, dtype=np.float64), eps)
    return floored / floored.sum(axis=1, keepdims=True)


def score(probs: np.ndarray, targets: np.ndarray, num_classes: int,
          metrics: Sequence[str] = ("accuracy", "log_loss"), *,
          positive: int | None = None, clip: float | None = None, task=None, beta: float = 1.0) -> dict[str, float]:
    """Each named metric of (N, C) probabilities against (N,) targets; NaN for each when empty.

    ``positive``: the positive class index for roc_auc (see :func:`_roc_auc`).
    ``clip``: floor probabilities at this value first (:func:`clip_probs`).
    ``task`` (pipeline/models/task.py), for the kinds other than single: the outputs and targets are as its kind has
    them, and the task makes the decisions (thresholds) the decision metrics score; ``beta`` for f_beta_*.
    """
    if task is not None and task.kind != "single":
        return _score_task(task, probs, targets, metrics, beta)
    chosen = [check_metric(name) for name in metrics]
    if len(targets) == 0:
        return {m.name: math.nan for m in chosen}
    probs = np.asarray(probs, dtype=np.float64)
    probs = probs / probs.sum(axis=1, keepdims=True)
    if clip is not None:
        probs = clip_probs(probs, clip)
    targets = np.asarray(targets)
    labels = probs.argmax(axis=1)
    return {m.name: m.fn(targets, probs if m.uses == "probs" else labels, num_classes, positive) for m in chosen}


def _score_task(task, outputs: np.ndarray, targets: np.ndarray, metrics: Sequence[str], beta: float) -> dict:
    names = list(metrics)
    if len(targets) == 0:
        return {name: math.nan for name in names}
    outputs, targets = np.asarray(outputs, dtype=np.float64), np.asarray(targets, dtype=np.float64)
    decided = task.decide(outputs)
    return {name: task_metric(task, name, targets, outputs if check_metric(name, task.kind).uses == "probs"
                              else decided, beta) for name in names}


def task_metric(task, name: str, targets: np.ndarray, values: np.ndarray, beta: float = 1.0) -> float:
    """Metric ``name`` of a task other than single on ``values``: its outputs, or decisions already made (fixed
    thresholds: a nested CV's, a bootstrap's resampled rows)."""
    m = check_metric(name, task.kind)
    extra = {"beta": beta} if m.name.startswith("f_beta") else {}
    n = len(task.grades) if task.kind == "ordinal" else np.asarray(targets).reshape(len(targets), -1).shape[1]
    return float(m.fn(np.asarray(targets, dtype=np.float64), values, n, None, **extra))


def compute(name: str, probs: np.ndarray, targets: np.ndarray, num_classes: int, *,
            positive: int | None = None, clip: float | None = None, task=None, beta: float = 1.0) -> float:
    """One metric of (N, C) probabilities against (N,) targets (see :func:`score`)."""
    return score(probs, targets, num_classes, (name,), positive=positive, clip=clip, task=task, beta=beta)[name]


def better(metric_name: str, new: float, old: float | None) -> bool:
    """Whether ``new`` beats ``old`` under the metric; NaN never wins, a missing/NaN ``old`` always loses."""
    direction = check_metric(metric_name).greater_is_better
    if math.isnan(new):
        return False
    if old is None or math.isnan(old):
        return True
    return new > old if direction else new < old


def bootstrap_interval(probs: np.ndarray, targets: np.ndarray, num_classes: int, metric: str, *,
                       clip: float | None = None, n: int = 1000, seed: int = 0, task=None,
                       beta: float = 1.0) -> tuple[float, float]:
    """A 95% percentile-bootstrap interval of ``metric`` over the rows (resampled with replacement)."""
    rng = np.random.default_rng(seed)
    probs, targets = np.asarray(probs, dtype=np.float64), np.asarray(targets)
    if len(targets) < 2:
        return math.nan, math.nan
    values = []
    for _ in range(n):
        rows = rng.integers(0, len(targets), len(targets))
        values.append(compute(metric, probs[rows], targets[rows], num_classes, clip=clip, task=task, beta=beta))
    values = np.asarray(values)
    values = values[np.isfinite(values)]
    if not len(values):
        return math.nan, math.nan
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def small_split_warning(n_images: int, n_classes: int) -> str | None:
    """Why a validation split is too small to rank runs by (None when it is not)."""
    per_class = n_images / max(n_classes, 1)
    if n_images >= 200 and per_class >= 5:
        return None
    return (f"the validation split has {n_images} images ({per_class:.1f} per class): too few to rank runs by "
            "(fewer than 200, or 5 per class); its score is noisy, see the interval; use --folds K for a CV score")


LOSS_METRICS = {"single": "log_loss", "multilabel": "bce", "regression": "rmse", "ordinal": "rmse"}
_ALSO_REPORTED = {"single": ("accuracy", "log_loss"), "multilabel": ("bce", "mean_auc"),
                  "regression": ("rmse", "mae"), "ordinal": ("rmse", "qwk")}


def reported_metrics(metric: str, task: str = "single") -> tuple[str, ...]:
    """The metrics every validation and CV reports: the task's usual two (single: accuracy and log loss) and
    the competition's own."""
    return tuple(dict.fromkeys((*_ALSO_REPORTED[task], metric)))


def valid_key(metric: str, variant: str = "live") -> str:
    """The metrics.csv column of a validation score: ``valid_<metric>``, ``_ema`` / ``_average`` for the EMA /
    --average-last weights."""
    return f"valid_{metric}" + ("" if variant == "live" else f"_{variant}")
