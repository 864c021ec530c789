"""`pipeline blend` (issue 15, point 5): simplex weights fitted on OOF rows, a nested CV, kept test probabilities."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import minimize_scalar
from sklearn.metrics import log_loss
from typer.testing import CliRunner

from conftest import make_competition, write_raw
from pipeline.predict.blend import blend, blend_probs, blend_scores, fit_weights, load_oofs
from pipeline.cli.app import app
from pipeline.competition import _REGISTRY
from pipeline.metrics import score
from pipeline.download.reorg import reorg
from pipeline.runs import Run
from pipeline.predict.submission import check_submission_file

CLASSES = ["cat", "dog", "frog"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def synthetic(n: int = 240, informative: float = 2.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(probs of one run (N, 3), targets): softmax of noise plus ``informative`` on the true class."""
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, 3, n)
    logits = rng.normal(0, 1, (n, 3))
    logits[np.arange(n), targets] += informative
    probs = np.exp(logits)
    return probs / probs.sum(axis=1, keepdims=True), targets


# ---------------------------------------------------------------- the pure core


def test_weights_lie_on_the_simplex_and_favour_the_informative_run():
    good, targets = synthetic(informative=2.5)
    noise = np.random.default_rng(1).dirichlet(np.ones(3), len(targets))
    for probs in (np.stack([good, noise]), np.stack([noise, good, noise])):
        weights = fit_weights(probs, targets)
        assert (weights >= 0).all() and weights.sum() == pytest.approx(1, abs=1e-9)
        assert weights[np.argmax([score(p, targets, 3)["accuracy"] for p in probs])] > 0.8
    # the fitted weights beat every corner and the middle on the fitted objective
    probs = np.stack([good, noise])
    fitted = log_loss(targets, blend_probs(probs, fit_weights(probs, targets)), labels=[0, 1, 2])
    for w in ([1, 0], [0, 1], [0.5, 0.5]):
        assert fitted <= log_loss(targets, blend_probs(probs, np.array(w)), labels=[0, 1, 2]) + 1e-9


def hand_nested(a: np.ndarray, b: np.ndarray, targets: np.ndarray, folds: np.ndarray) -> tuple[np.ndarray, list]:
    """The nested blend of two runs recomputed with a bounded 1-D search over w (a * w + b * (1 - w))."""
    out, found = np.empty_like(a), []
    for k in np.unique(folds):
        rest = folds != k

        def loss(w):
            return log_loss(targets[rest], w * a[rest] + (1 - w) * b[rest], labels=[0, 1, 2])

        w = minimize_scalar(loss, bounds=(0, 1), method="bounded", options={"xatol": 1e-8}).x
        out[~rest] = w * a[~rest] + (1 - w) * b[~rest]
        found.append(w)
    return out, found


def test_the_nested_cv_fits_each_fold_on_the_others_and_is_not_the_in_sample_score():
    comp = make_competition("toy-probs", submission="probs")
    a, targets = synthetic(n=90, informative=1.5, seed=3)
    b, _ = synthetic(n=90, informative=0.0, seed=4)
    b[np.arange(90), targets] += 0.3  # weakly informative, so the best weight is inside (0, 1)
    b /= b.sum(axis=1, keepdims=True)
    folds = np.arange(90) % 3
    result = blend_scores(np.stack([a, b]), targets, folds, comp)
    out, ws = hand_nested(a, b, targets, folds)
    assert [w[0] for w in result["fold_weights"].values()] == pytest.approx(ws, abs=1e-4)
    assert 0.05 < ws[0] < 0.95  # an interior optimum: the check is not trivially at a corner
    assert result["blended_cv"] == pytest.approx(score(out, targets, 3, ("log_loss",), clip=1e-6)["log_loss"],
                                                 rel=1e-5)
    assert abs(result["blended_cv"] - result["in_sample"]) > 1e-5
    lo, hi = result["interval"]
    assert lo <= result["blended_cv"] <= hi


def test_two_identical_runs_blend_to_the_runs_own_score():
    comp = make_competition("toy")
    probs, targets = synthetic(n=60, informative=1.0)
    result = blend_scores(np.stack([probs, probs]), targets, np.arange(60) % 3, comp)
    own = score(probs, targets, 3, ("accuracy", "log_loss"))
    assert result["blended"] == pytest.approx(own) and result["runs"][0] == pytest.approx(own)


# ---------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A label competition's work folder (3 folds) and two finished 3-fold runs of different seeds."""
    root = tmp_path_factory.mktemp("blend")
    comp = make_competition("toy")
    reorg(comp, write_raw(root / "raw", comp), root / "work", folds=3)
    for seed in (0, 1):
        result = invoke("train", comp.slug, root / "work", root / f"run{seed}", "--epochs", "3", "--batch-size", "8",
                        "--folds", "3", "--device", "cpu", "--seed", seed)
        assert result.exit_code == 0, result.output
    yield comp, root
    _REGISTRY.pop(comp.slug, None)  # module-scoped: the per-test registry restore saw it registered


def copy_run(root, name, tmp_path, keep_probs: bool = True):
    """A copy of a fixture run in tmp_path (file times kept: its kept test probabilities still hold)."""
    dest = tmp_path / name
    shutil.copytree(root / name, dest)
    if not keep_probs:
        for path in (Run(dest).test_probs_path, Run(dest).test_probs_meta_path):
            path.unlink(missing_ok=True)
    return dest


def test_blend_through_the_cli_writes_a_checked_submission_its_record_and_keeps_test_probs(runs, tmp_path):
    comp, root = runs
    a, b = (copy_run(root, f"run{s}", tmp_path, keep_probs=False) for s in (0, 1))
    out = tmp_path / "sub" / "blend.csv"
    out.parent.mkdir()
    result = invoke("blend", a, b, out)
    assert result.exit_code == 0, result.output
    assert "blended CV accuracy" in result.stdout and "optimistic" in result.stdout and "not accuracy" in result.stdout
    _, problems = check_submission_file(comp, out, work_dir=root / "work")
    assert problems == []
    record = json.loads((tmp_path / "sub" / "blend.blend.json").read_text())
    assert sum(record["weights"]) == pytest.approx(1) and min(record["weights"]) >= 0
    for run_dir, entry in zip((a, b), record["runs"]):
        assert entry["accuracy"] == pytest.approx(Run(run_dir).read_cv()["cv"])
    kept = [Run(d).read_test_probs() for d in (a, b)]
    for frame, meta in kept:
        assert (meta["members"], meta["tta"], meta["test_ids"]) == (["fold0", "fold1", "fold2"], "none", 10)
        assert np.allclose(frame[CLASSES].sum(axis=1), 1)
    # the submitted labels are the argmax of the weighted kept probabilities, column by name
    mixed = sum(w * f.set_index("id")[CLASSES] for w, (f, _) in zip(record["weights"], kept))
    sub = pd.read_csv(out, dtype=str).set_index("id")
    assert (sub.loc[mixed.index, "label"] == mixed.idxmax(axis=1)).all()
    again = invoke("blend", a, b, out, "--force", "--json")
    assert again.exit_code == 0 and "kept test probabilities" in again.stderr
    assert json.loads(again.stdout)["weights"] == pytest.approx(record["weights"])


def test_a_retrained_member_makes_the_kept_probabilities_stale(runs, tmp_path):
    _, root = runs
    a, b = (copy_run(root, f"run{s}", tmp_path) for s in (0, 1))
    assert invoke("blend", a, b, tmp_path / "one.csv").exit_code == 0  # keeps both runs' probabilities
    best = Run(b).member("fold1").best_path
    os.utime(best, ns=(best.stat().st_atime_ns, best.stat().st_mtime_ns + 10**9))
    result = invoke("blend", a, b, tmp_path / "two.csv")
    assert result.exit_code == 0
    assert f"{a}: kept test probabilities" in result.stderr and f"{b}: predicting the test set" in result.stderr
    (tmp_path / "submissions").mkdir()  # a blend written into submissions/ is indexed as predict's are
    assert invoke("blend", a, b, tmp_path / "submissions" / "b.csv").exit_code == 0
    index = pd.read_csv(tmp_path / "submissions" / "index.csv")
    record = json.loads((tmp_path / "submissions" / "b.blend.json").read_text())
    assert list(index["file"]) == ["b.csv"] and index["cv_score"].iloc[0] == pytest.approx(record["blended_cv"])
    assert index["model"].iloc[0].startswith("blend (")


def test_a_run_blended_with_its_copy_gets_its_own_cv(runs, tmp_path):
    comp, root = runs
    a, b = copy_run(root, "run1", tmp_path), copy_run(root, "run1", tmp_path / "copy")
    result = blend(comp, [a, b], tmp_path / "same.csv")
    cv = Run(a).read_cv()
    assert result.record["blended_cv"] == pytest.approx(cv["cv"])
    assert result.record["blended"]["log_loss"] == pytest.approx(cv["overall"]["log_loss"], rel=1e-6)


def test_class_columns_are_matched_by_name(runs, tmp_path):
    comp, root = runs
    a, b = copy_run(root, "run0", tmp_path), copy_run(root, "run1", tmp_path)
    assert invoke("blend", a, b, tmp_path / "plain.csv").exit_code == 0
    permuted = copy_run(tmp_path, "run1", tmp_path / "p")  # with the probabilities the blend kept
    for path in (Run(permuted).oof_path, Run(permuted).test_probs_path):
        frame = pd.read_csv(path, dtype=str)
        assert [c for c in frame.columns if c in CLASSES] == CLASSES
        frame[[c for c in frame.columns if c not in CLASSES] + ["frog", "cat", "dog"]].to_csv(path, index=False)
    work = root / "work"
    assert np.array_equal(load_oofs([Run(a), Run(b)], work, CLASSES)[0],
                          load_oofs([Run(a), Run(permuted)], work, CLASSES)[0])
    result = invoke("blend", a, permuted, tmp_path / "permuted.csv")
    assert result.exit_code == 0 and f"{permuted}: kept test probabilities" in result.stderr
    assert (tmp_path / "plain.csv").read_text() == (tmp_path / "permuted.csv").read_text()
    plain, perm = (json.loads((tmp_path / f"{n}.blend.json").read_text()) for n in ("plain", "permuted"))
    assert plain["weights"] == pytest.approx(perm["weights"]) and plain["blended_cv"] == perm["blended_cv"]


def _edit_oof(run_dir, edit):
    path = Run(run_dir).oof_path
    edit(pd.read_csv(path, dtype=str)).to_csv(path, index=False)


def _other_folds(root, run_dir, tmp_path):
    """Point the run at a copy of the work folder whose folds.csv assigns other folds."""
    work = tmp_path / "work-other"
    shutil.copytree(root / "work", work, symlinks=True)
    folds = pd.read_csv(work / "folds.csv", dtype=str)
    folds["fold"] = folds["fold"].astype(int).map(lambda k: (k + 1) % 3).astype(str)
    folds.to_csv(work / "folds.csv", index=False)
    doc = json.loads(Run(run_dir).config_path.read_text())
    doc["config"]["work_dir"] = str(work)
    Run(run_dir).config_path.write_text(json.dumps(doc))


REFUSALS = {
    "other classes": (lambda root, d, t: _edit_oof(d, lambda f: f.rename(columns={"frog": "toad"})),
                      "does not have the columns"),
    "other ids": (lambda root, d, t: _edit_oof(d, lambda f: f.iloc[1:]), "predict other images"),
    "other labels": (lambda root, d, t: _edit_oof(d, lambda f: f.assign(label=f["label"].iloc[::-1].to_numpy())),
                     "otherwise than"),
    "other folds": (_other_folds, "cross-validated on the same folds"),
    "no oof": (lambda root, d, t: Run(d).oof_path.unlink(), "train it with --folds K"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_runs_that_cannot_be_blended_are_refused_naming_the_run(runs, tmp_path, case):
    _, root = runs
    a, b = copy_run(root, "run0", tmp_path), copy_run(root, "run1", tmp_path)
    spoil, message = REFUSALS[case]
    spoil(root, b, tmp_path)
    out = tmp_path / "out.csv"
    result = invoke("blend", a, b, out)
    assert result.exit_code == 1 and message in result.output and str(b) in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not out.exists() and not (tmp_path / "out.blend.json").exists()


def test_a_run_named_twice_and_an_existing_out_are_refused_before_any_work(runs, tmp_path):
    _, root = runs
    a, b = copy_run(root, "run0", tmp_path, keep_probs=False), copy_run(root, "run1", tmp_path, keep_probs=False)
    twice = invoke("blend", a, tmp_path / "." / "run0", tmp_path / "x.csv")
    assert twice.exit_code == 1 and "given twice" in twice.output
    out = tmp_path / "taken.csv"
    out.write_text("mine\n")
    result = invoke("blend", a, b, out)
    assert result.exit_code == 1 and "--force" in result.output
    assert out.read_text() == "mine\n" and not (tmp_path / "taken.blend.json").exists()
    assert Run(a).read_test_probs() is None and Run(b).read_test_probs() is None  # nothing was predicted


def test_predict_keeps_the_test_probabilities_of_a_label_competition(runs, tmp_path):
    comp, root = runs
    run = copy_run(root, "run0", tmp_path, keep_probs=False)
    result = invoke("predict", comp.slug, root / "work", run, tmp_path / "labels.csv")
    assert result.exit_code == 0, result.output
    frame, meta = Run(run).read_test_probs()
    assert list(frame.columns) == ["id", *CLASSES] and len(frame) == meta["test_ids"] == 10
    assert meta["fingerprint"] == json.loads(Run(run).config_path.read_text())["data"]["fingerprint"]
    assert np.allclose(frame[CLASSES].sum(axis=1), 1)
    labels = pd.read_csv(tmp_path / "labels.csv", dtype=str).set_index("id")["label"]
    assert (frame.set_index("id")[CLASSES].idxmax(axis=1) == labels.loc[frame["id"]].to_numpy()).all()
