"""The metrics registry: hand-computed values on tiny examples, directions, clipping."""
from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, log_loss, roc_auc_score

from pipeline.errors import PipelineError
from pipeline.metrics import METRICS, better, check_metric, clip_probs, compute, score


def probs_for(labels: list[int], num_classes: int) -> np.ndarray:
    """Probabilities whose argmax is ``labels`` (half one-hot, half uniform)."""
    return 0.5 * np.eye(num_classes)[labels] + 0.5 / num_classes


def test_accuracy_by_hand():
    # argmax [0, 2, 2, 1] against [0, 1, 2, 1]: 3 of 4 right
    assert compute("accuracy", probs_for([0, 2, 2, 1], 3), np.array([0, 1, 2, 1]), 3) == pytest.approx(0.75)


def test_log_loss_by_hand_counts_absent_classes():
    # class 2 never a target, still a column: -(ln 0.7 + ln 0.6) / 2
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    expected = -(math.log(0.7) + math.log(0.6)) / 2
    assert compute("log_loss", probs, np.array([0, 1]), 3) == pytest.approx(expected)


def test_roc_auc_binary_uses_the_positive_column():
    targets = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.65, 0.35], [0.2, 0.8]])
    # positives score 0.35, 0.8; negatives 0.1, 0.4: pairs won 1 + 0 + 1 + 1 = 3 of 4
    assert compute("roc_auc", probs, targets, 2) == pytest.approx(0.75)
    # class 0 as positive, scores 0.9, 0.6 against 0.65, 0.2: 2 + 1 = 3 of 4
    assert compute("roc_auc", probs, targets, 2, positive=0) == pytest.approx(0.75)
    # a single-class target has no AUC
    assert math.isnan(compute("roc_auc", probs, np.array([1, 1, 1, 1]), 2))


MULTI_PROBS = np.array([[0.6, 0.25, 0.15], [0.2, 0.5, 0.3], [0.1, 0.2, 0.7],
                        [0.3, 0.4, 0.3], [0.5, 0.3, 0.2], [0.2, 0.2, 0.6]])
MULTI_TARGETS = np.array([0, 1, 2, 0, 1, 2])
# class 0: positives 0.6, 0.3 vs 0.2, 0.1, 0.5, 0.2 -> 4 + 3 = 7/8
# class 1: positives 0.5, 0.3 vs 0.25, 0.2, 0.4, 0.2 -> 4 + 3 = 7/8
# class 2: positives 0.7, 0.6 vs 0.15, 0.3, 0.3, 0.2 -> 8/8
MULTI_AUC = (7 / 8 + 7 / 8 + 1) / 3


def test_roc_auc_multiclass_is_macro_one_vs_rest():
    assert compute("roc_auc", MULTI_PROBS, MULTI_TARGETS, 3) == pytest.approx(MULTI_AUC)
    assert MULTI_AUC == pytest.approx(roc_auc_score(MULTI_TARGETS, MULTI_PROBS, multi_class="ovr"))
    assert compute("roc_auc", MULTI_PROBS, MULTI_TARGETS, 3, positive=1) == pytest.approx(7 / 8)


def test_roc_auc_leaves_out_a_class_absent_from_the_targets():
    four = np.hstack([MULTI_PROBS, np.zeros((6, 1))])  # class 3: no positives, so no AUC
    assert compute("roc_auc", four, MULTI_TARGETS, 4) == pytest.approx(MULTI_AUC)
    assert math.isnan(compute("roc_auc", four, np.zeros(6, dtype=int), 4))


def test_qwk_by_hand_keeps_grade_distances():
    # O: (0,0), (1,2), (2,2), (2,1); W = (i-j)^2, so sum W*O = 2.
    # marginals true [1,1,2], pred [1,1,2]: sum W*E = (1+1+8+8+2+2)/4 = 5.5; kappa = 1 - 2/5.5
    assert compute("qwk", probs_for([0, 2, 2, 1], 3), np.array([0, 1, 2, 2]), 3) == pytest.approx(7 / 11)
    # grade 2 absent: 1 and 3 are two grades apart. sum W*O = 4 + 4 = 8;
    # sum W*E = (1+1+18+18+8+8)/4 = 13.5; kappa = 1 - 8/13.5 (it would be 7/11 if 3 sat next to 1)
    assert compute("qwk", probs_for([0, 3, 3, 1], 4), np.array([0, 1, 3, 3]), 4) == pytest.approx(11 / 27)


def test_macro_f1_by_hand_counts_every_class():
    targets, preds = np.array([0, 0, 1, 2]), [0, 1, 1, 1]
    # class 0: P 1, R 1/2, F 2/3; class 1: P 1/3, R 1, F 1/2; class 2: F 0
    assert compute("macro_f1", probs_for(preds, 3), targets, 3) == pytest.approx((2 / 3 + 1 / 2) / 3)
    # a fourth class seen nowhere counts as F 0
    assert compute("macro_f1", probs_for(preds, 4), targets, 4) == pytest.approx((2 / 3 + 1 / 2) / 4)


def test_directions():
    lower = {"log_loss", "bce", "rmse", "mae"}
    assert {n for n, m in METRICS.items() if not m.greater_is_better} == lower
    decided = {"accuracy", "qwk", "macro_f1", "f_beta_samples", "f_beta_micro", "f_beta_macro", "grade_qwk",
               "grade_accuracy"}
    assert {n for n, m in METRICS.items() if m.uses == "labels"} == decided
    assert better("log_loss", 0.1, 0.2) and not better("log_loss", 0.3, 0.2)
    assert better("roc_auc", 0.9, 0.8) and not better("accuracy", 0.5, 0.5)
    assert not better("accuracy", math.nan, 0.1) and not better("accuracy", math.nan, None)
    assert better("log_loss", 5.0, None) and better("log_loss", 5.0, math.nan)
    assert better("log_loss", 0.1, 0.2)
    assert not better("accuracy", 0.1, 0.2)


def test_unknown_metric_lists_the_names():
    assert check_metric("qwk").name == "qwk"
    with pytest.raises(PipelineError, match="'auc' is not one of: accuracy, log_loss, roc_auc, qwk, macro_f1"):
        check_metric("auc")
    with pytest.raises(PipelineError, match="auc"):
        score(np.ones((2, 2)) / 2, np.array([0, 1]), 2, metrics=("auc",))


def test_clip_probs_floors_and_renormalises():
    probs = np.array([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    clipped = clip_probs(probs, eps=1e-3)
    np.testing.assert_allclose(clipped.sum(axis=1), 1.0)
    # row 0: [1, 1e-3, 1e-3] / 1.002; row 1 has nothing under the floor, so it is unchanged
    np.testing.assert_allclose(clipped[0], np.array([1.0, 1e-3, 1e-3]) / 1.002)
    np.testing.assert_allclose(clipped[1], probs[1])
    assert np.isfinite(compute("log_loss", probs, np.array([1, 2]), 3, clip=1e-3))
    expected = -(math.log(1e-3 / 1.002) + math.log(0.5)) / 2
    assert compute("log_loss", probs, np.array([1, 2]), 3, clip=1e-3) == pytest.approx(expected)


def test_empty_targets_give_nan_for_each():
    out = score(np.zeros((0, 3)), np.array([], dtype=int), 3, metrics=("accuracy", "qwk", "roc_auc"))
    assert list(out) == ["accuracy", "qwk", "roc_auc"] and all(math.isnan(v) for v in out.values())


def test_default_score_unchanged():
    """``score(p, t, C)``: the same keys and bit-identical numbers as the accuracy/log-loss original."""
    rng = np.random.default_rng(3)
    raw = rng.random((50, 4)).astype(np.float32)  # unnormalised, float32, as a model might give
    targets = rng.integers(0, 4, 50)
    out = score(raw, targets, 4)
    p = np.asarray(raw, dtype=np.float64)
    p = p / p.sum(axis=1, keepdims=True)
    assert out == {"accuracy": float(accuracy_score(targets, p.argmax(axis=1))),
                   "log_loss": float(log_loss(targets, p, labels=[0, 1, 2, 3]))}


def test_log_loss_in_numpy_equals_scikit_learns():
    """The bootstrap's log loss is computed in numpy (issue 26: scikit-learn's took 5 % of a dog run)."""
    import warnings

    from sklearn.metrics import log_loss

    from pipeline.metrics import METRICS

    fn = METRICS["log_loss"].fn
    rng = np.random.default_rng(0)
    for n, c in ((300, 120), (50, 2), (7, 3)):
        probs = rng.dirichlet(np.full(c, 0.3), size=n)
        probs[0] = np.eye(c)[(1 + 0) % c]  # a true class at probability 0: clipped to eps, as scikit-learn does
        targets = rng.integers(0, c, n)
        targets[0] = 0
        assert abs(fn(targets, probs, c, None) - log_loss(targets, probs, labels=list(range(c)))) < 1e-9
    with warnings.catch_warnings(record=True) as seen:  # rows not summing to 1: scikit-learn's own warning
        warnings.simplefilter("always")
        fn(np.array([0, 1]), np.array([[0.5, 0.2], [0.3, 0.3]]), 2, None)
    assert any("do not sum to one" in str(w.message) for w in seen)
    with pytest.raises(ValueError):  # a probability above 1: scikit-learn's error
        fn(np.array([0, 1]), np.array([[1.5, -0.5], [0.5, 0.5]]), 2, None)
