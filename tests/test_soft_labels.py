"""Self-distillation (--soft-labels) and pseudo-labels (--pseudo-label): targets, refusals, records."""
from __future__ import annotations

import shutil
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from conftest import make_competition, write_raw
from typer.testing import CliRunner

from pipeline.cli.app import app
from pipeline.config import resolve_config
from pipeline.data.items import list_split, load_reorg
from pipeline.download.reorg import reorg
from pipeline.errors import PipelineError
from pipeline.predict.cv import format_cv_table
from pipeline.predict.stage import predict, predict_items
from pipeline.runs import Run
from pipeline.train.plan import plan_run
from pipeline.train.setup import setup_member
from pipeline.train.stage import train

CLASSES = ["cat", "dog", "frog"]
BASE = {"device": "cpu", "epochs": 1, "batch_size": 8}  # 3 steps a fold: enough to move the weights


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """(competition, work, teacher run): a 3-fold run of the toy log-loss competition, its test predicted."""
    root = tmp_path_factory.mktemp("teacher")
    comp = make_competition("toy-soft", submission="probs")
    raw = write_raw(root / "raw", comp)
    work, run = root / "work", root / "teacher"
    reorg(comp, raw, work, valid_ratio=0.25, folds=3, seed=0)
    train(resolve_config(comp, work, run, None, {**BASE, "folds": 3, "epochs": 2}))  # 1 epoch: near uniform
    predict(comp, work, run, root / "teacher.csv", device="cpu")
    from pipeline.competition import _REGISTRY

    _REGISTRY.pop(comp.slug, None)  # set up before each test's registry snapshot: unregistered here, not leaked
    return comp, work, run


def registered(teacher):
    """The module's competition, registered again (each test's registry is restored afterwards)."""
    from pipeline.competition import _REGISTRY

    comp = teacher[0]
    _REGISTRY[comp.slug] = comp
    return teacher


def config(teacher, run_dir, **flags):
    comp, work, _ = registered(teacher)
    return resolve_config(comp, work, run_dir, None, {**BASE, **flags})


def oof_table(run):
    return pd.read_csv(Run(run).oof_path, dtype={"id": str}).set_index("id")


# ---------------------------------------------------------------- (a) by name


def test_the_teachers_oof_columns_are_read_by_name(teacher, tmp_path):
    _, work, run = registered(teacher)
    copy = tmp_path / "shuffled"
    shutil.copytree(run, copy)
    frame = pd.read_csv(Run(run).oof_path, dtype={"id": str})
    frame[["frog", "id", "cat", "label", "dog"]].iloc[::-1].to_csv(Run(copy).oof_path, index=False)

    def targets(teacher_dir):
        _, plans = plan_run(config(teacher, tmp_path / "s", folds=3, soft_labels=teacher_dir, soft_weight=0.5,
                                   teacher_source="all"), load_reorg(work))
        return {it.id: it.target for p in plans for it in p.training_rows}

    ours, shuffled = targets(run), targets(copy)
    assert ours == shuffled
    oof = oof_table(run)
    first = next(iter(ours))
    label = np.eye(3)[CLASSES.index(oof.loc[first, "label"])]
    assert np.allclose(ours[first], 0.5 * label + 0.5 * oof.loc[first, CLASSES].to_numpy(float))
    assert not np.allclose(ours[first], label)  # the teacher moved it


def test_the_fold_source_takes_the_teachers_model_of_the_same_fold(teacher, tmp_path):
    """Fold k's training rows get the predictions of the teacher's fold-k model, which never trained on fold k's
    validation rows (the oof source's rows come from models that did)."""
    _, work, run = registered(teacher)
    _, plans = plan_run(config(teacher, tmp_path / "s", folds=3, soft_labels=run, soft_weight=0.25),
                        load_reorg(work))
    oof = oof_table(run)
    for plan in plans:
        ids, probs, classes = predict_items([Run(run).member(f"fold{plan.member.fold}")], plan.train_items,
                                            device="cpu")
        assert classes == CLASSES and ids == [it.id for it in plan.train_items]
        labels = np.eye(3)[[it.target for it in plan.train_items]]
        got = np.array([it.target for it in plan.training_rows])
        assert np.allclose(got, 0.75 * labels + 0.25 * probs, atol=1e-6)
        assert not np.allclose(got, 0.75 * labels + 0.25 * oof.loc[ids, CLASSES].to_numpy(float), atol=1e-3)
    assert plans[0].teacher["teacher_source"] == "fold" and "same fold's model" in plans[0].teacher["line"]


# ---------------------------------------------------------------- (b) refusals


def test_a_teacher_with_other_folds_is_refused_naming_the_id(teacher, tmp_path):
    _, work, run = registered(teacher)
    moved = tmp_path / "work"
    shutil.copytree(work, moved, symlinks=True)
    folds = pd.read_csv(moved / "folds.csv", dtype={"id": str})
    folds.loc[0, "fold"] = (folds.loc[0, "fold"] + 1) % 3  # one id in another fold: counts alike, folds not
    folds.to_csv(moved / "folds.csv", index=False)
    comp = teacher[0]
    cfg = resolve_config(comp, moved, tmp_path / "s", None, {**BASE, "folds": 3, "soft_labels": run})
    with pytest.raises(PipelineError, match=f"id '{folds.loc[0, 'id']}' is in fold .* but is in fold"):
        plan_run(cfg, load_reorg(moved))


def test_a_holdout_teacher_and_a_teacher_taught_by_another_are_refused(teacher, tmp_path):
    comp, work, run = registered(teacher)
    holdout = tmp_path / "holdout"
    train(resolve_config(comp, work, holdout, None, {**BASE, "epochs": 1}))
    with pytest.raises(PipelineError, match="is a holdout run: its model trained on rows of every fold"):
        plan_run(config(teacher, tmp_path / "s", folds=3, soft_labels=holdout), load_reorg(work))
    taught = tmp_path / "taught"
    shutil.copytree(run, taught)
    saved = Run(taught).config_path.read_text().replace('"soft_labels": null', f'"soft_labels": "{run}"')
    Run(taught).config_path.write_text(saved)
    with pytest.raises(PipelineError, match="the teacher itself learnt from the predictions"):
        plan_run(config(teacher, tmp_path / "s", folds=3, soft_labels=taught), load_reorg(work))
    with pytest.raises(PipelineError, match="needs fold members"):  # the holdout's valid rows are teacher rows
        plan_run(config(teacher, tmp_path / "s", soft_labels=run), load_reorg(work))


def test_a_teacher_missing_a_class_or_an_id_is_named(teacher, tmp_path):
    _, work, run = registered(teacher)
    copy = tmp_path / "partial"
    shutil.copytree(run, copy)
    frame = pd.read_csv(Run(run).oof_path, dtype={"id": str})
    frame.drop(columns="frog").to_csv(Run(copy).oof_path, index=False)
    with pytest.raises(PipelineError, match="has no column 'frog'"):
        plan_run(config(teacher, tmp_path / "s", folds=3, soft_labels=copy), load_reorg(work))
    frame.iloc[1:].to_csv(Run(copy).oof_path, index=False)
    with pytest.raises(PipelineError, match=f"has no prediction for id '{frame['id'][0]}'"):
        plan_run(config(teacher, tmp_path / "s", folds=3, soft_labels=copy, teacher_source="all"), load_reorg(work))


# ---------------------------------------------------------------- (c) weight 0 is the plain run


def test_soft_weight_zero_trains_bit_identical_weights_and_a_positive_weight_changes_them(teacher, tmp_path):
    _, _, run = registered(teacher)

    def weights(name, **flags):
        train(config(teacher, tmp_path / name, fold=0, **flags))
        return torch.load(tmp_path / name / "fold0" / "best.pt", weights_only=False)["model"]

    plain, zero, half = weights("plain"), weights("zero", soft_labels=run, soft_weight=0.0), \
        weights("half", soft_labels=run, soft_weight=0.5)
    assert plain.keys() == zero.keys()
    assert all(torch.equal(plain[k], zero[k]) for k in plain)
    assert any(not torch.equal(plain[k], half[k]) for k in plain if plain[k].is_floating_point())


# ---------------------------------------------------------------- (d) the logreg head on soft targets


def test_the_logreg_soft_fit_equals_the_weighted_fit_of_each_row_copied_per_class():
    from sklearn.linear_model import LogisticRegression

    from pipeline.train.logreg import fit_logreg

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 6)) * 3 + 1
    p = rng.dirichlet(np.ones(4) * 0.7, size=60)
    p[:, 3] = 0.0  # a class no row gives any probability: absent
    p /= p.sum(axis=1, keepdims=True)
    weight, bias, _ = fit_logreg(x, p, 4, cs=(1.0,))
    # by hand: each row copied once per class, labelled with it and weighted by its probability
    mu, sigma = x.mean(0), x.std(0) + 1e-6
    z = (x - mu) / sigma
    rows, cols = np.nonzero(p > 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf = LogisticRegression(C=1.0, tol=1e-10, max_iter=20000).fit(z[rows], cols, sample_weight=p[rows, cols])
    ours = torch.softmax(torch.from_numpy(x @ weight.T + bias), 1).numpy()
    theirs = clf.predict_proba(z)
    assert np.abs(weight[:3] * sigma - clf.coef_).max() < 1e-3  # the same coefficients, on standardised features
    present = ours[:, :3] / ours[:, :3].sum(axis=1, keepdims=True)  # the absent class takes a little mass
    assert np.abs(present - theirs).max() < 1e-4
    # the absent class as the hard fit treats one: no weights, never a row's most likely class
    assert not weight[3].any() and (ours[:, 3] < ours[:, :3].max(axis=1)).all()
    hard = fit_logreg(x, p.argmax(1), 4, cs=(1.0,))[0]
    assert np.abs(hard - weight).max() > 0.05  # soft targets fit another head than their argmax


# ---------------------------------------------------------------- (e) pseudo rows: training only


@pytest.mark.parametrize("cache", ["auto", "off"])  # the image cache and the file loader
def test_pseudo_rows_are_in_every_folds_training_set_and_in_no_validation_split(teacher, tmp_path, cache):
    comp, work, run = registered(teacher)
    info = load_reorg(work)
    test_ids = {it.id for it in list_split(work, info, "test")}
    _, plans = plan_run(config(teacher, tmp_path / "s", folds=3, pseudo_label=run, cache=cache,
                               teacher_source="all"), info)
    kept, _ = Run(run).read_test_probs()
    kept = kept.set_index("id")
    for plan in plans:
        rows = plan.training_rows
        assert {it.id for it in rows} >= test_ids and not test_ids & {it.id for it in plan.valid_items}
        assert len(rows) == len(plan.train_items) + len(test_ids)
        for it in rows[len(plan.train_items):]:  # soft: the teacher's probabilities as they are
            assert np.allclose(it.target, kept.loc[it.id, CLASSES].to_numpy(float))
        st = setup_member(plan, comp.metric)
        assert len(st.data.train.dataset if cache == "off" else st.data.train.targets) == len(rows)
        valid = st.data.valid.dataset.items if cache == "off" else None
        n_valid = len(valid) if valid is not None else len(st.data.valid.targets)
        assert n_valid == len(plan.valid_items)
        if valid is not None:
            assert not test_ids & {it.id for it in valid}
        assert st.data.valid is not None and (st.data.valid.targets.ndim if cache == "auto" else 1) == 1


def test_the_threshold_drops_rows_under_it_and_hard_labels_the_rest(teacher, tmp_path):
    _, work, run = registered(teacher)
    kept, _ = Run(run).read_test_probs()
    top = kept.set_index("id")[CLASSES].max(axis=1)
    cut = float(top.median())
    _, plans = plan_run(config(teacher, tmp_path / "s", folds=3, pseudo_label=run, pseudo_threshold=cut,
                               teacher_source="all"), load_reorg(work))
    pseudo = plans[0].training_rows[len(plans[0].train_items):]
    assert {it.id for it in pseudo} == set(top.index[top >= cut]) and 0 < len(pseudo) < len(top)
    probs = kept.set_index("id")[CLASSES]
    assert all(it.target == int(np.argmax(probs.loc[it.id].to_numpy())) for it in pseudo)


def test_the_fold_source_labels_fold_ks_test_rows_with_the_teachers_fold_k_model(teacher, tmp_path):
    """No kept test predictions needed: each fold's pseudo rows come from the teacher's model of that fold,
    which never saw the fold's validation rows; they still join training only."""
    _, work, run = registered(teacher)
    copy = tmp_path / "unpredicted"
    shutil.copytree(run, copy)
    Run(copy).test_probs_meta_path.unlink()
    info = load_reorg(work)
    test = list_split(work, info, "test")
    _, plans = plan_run(config(teacher, tmp_path / "s", folds=3, pseudo_label=copy), info)
    seen = []
    for plan in plans:
        ids, probs, _ = predict_items([Run(copy).member(f"fold{plan.member.fold}")], test, device="cpu")
        pseudo = plan.training_rows[len(plan.train_items):]
        assert [it.id for it in pseudo] == ids and not set(ids) & {it.id for it in plan.valid_items}
        assert np.allclose([it.target for it in pseudo], probs, atol=1e-6)
        assert plan.teacher["pseudo_members"] == [f"fold{plan.member.fold}"]
        assert "model of the same fold" in plan.teacher["line"]
        seen.append(probs)
    assert not np.allclose(seen[0], seen[1], atol=1e-4)  # three models, three labellings


def test_pseudo_rows_are_the_test_images_even_where_test_ids_repeat_training_ids(tmp_path):
    """Kaggle's cifar-10 numbers its training and its test images from 1 alike: a pseudo-labelled test image
    is found as a test image (its key), never taken for the training image of the same id (image cache and
    files alike)."""
    comp = make_competition("toy-clash", submission="probs")
    raw = write_raw(tmp_path / "raw", comp)
    for k, old in enumerate(sorted((raw / comp.test_dir).iterdir()), start=1):  # ids 1..10, plain white
        Image.fromarray(np.full((16, 16, 3), 255, np.uint8)).save(raw / comp.test_dir / f"{k}{comp.image_ext}")
        old.unlink()
    sample = pd.read_csv(raw / comp.sample_submission)
    sample.assign(**{comp.id_column: [str(k) for k in range(1, len(sample) + 1)]}).to_csv(
        raw / comp.sample_submission, index=False)
    work, run = tmp_path / "work", tmp_path / "teacher"
    reorg(comp, raw, work, valid_ratio=0.25, folds=3, seed=0)
    train(resolve_config(comp, work, run, None, {**BASE, "folds": 3}))
    info = load_reorg(work)
    test = {it.path for it in list_split(work, info, "test")}
    assert {it.id for it in list_split(work, info, "test")} <= {it.id for it in list_split(work, info, "train_valid")}
    for cache in ("auto", "off"):
        cfg = resolve_config(comp, work, tmp_path / f"s-{cache}", None,
                             {**BASE, "folds": 3, "pseudo_label": run, "cache": cache})
        plan = plan_run(cfg, info)[1][0]
        own, pseudo = plan.training_rows[:len(plan.train_items)], plan.training_rows[len(plan.train_items):]
        assert {it.path for it in pseudo} == test and not test & {it.path for it in [*own, *plan.valid_items]}
        data = setup_member(plan, comp.metric).data
        if cache == "auto":  # the cached rows the member trains on: its own images, then the white test ones
            assert (data.train.images[len(own):] == 255).all() and len(data.train.images) == len(own) + 10
            assert not (data.train.images[:len(own)] == 255).all(dim=(1, 2, 3)).any()
        else:
            assert [it.path for it in data.train.dataset.items] == [it.path for it in plan.training_rows]


def test_a_teacher_without_test_predictions_is_refused(teacher, tmp_path):
    _, work, run = registered(teacher)
    copy = tmp_path / "unpredicted"
    shutil.copytree(run, copy)
    Run(copy).test_probs_meta_path.unlink()
    with pytest.raises(PipelineError, match="run `pipeline predict` on it first"):
        plan_run(config(teacher, tmp_path / "s", folds=3, pseudo_label=copy, teacher_source="all"), load_reorg(work))


# ---------------------------------------------------------------- (f) what the run records


def test_cv_json_and_the_summary_record_the_teacher_and_the_pseudo_note(teacher, tmp_path):
    _, _, run = registered(teacher)
    student = tmp_path / "student"
    train(config(teacher, student, folds=3, soft_labels=run, soft_weight=0.3, pseudo_label=run,
                 teacher_source="all"))
    cv = Run(student).read_cv()
    record = cv["teacher"]
    assert record["soft_labels"] == str(run) and record["soft_weight"] == 0.3
    assert record["teacher_cv"] == pytest.approx(Run(run).read_cv()["cv"])
    assert record["pseudo_rows"] == 10 and record["pseudo_threshold"] is None
    table = format_cv_table(cv)
    assert f"pseudo-labels from test predictions of {run}: the test set is not in the CV" in table
    summary = Run(student).summary_path.read_text()
    assert "teacher    soft labels: (1 - 0.3) x label + 0.3 x the out-of-fold predictions" in summary
    assert "optimistic CV: each fold's soft targets came from teacher models that trained on that fold's" in table
    assert "10 of 10 test images added" in summary


# ---------------------------------------------------------------- (g) the CLI


def test_cli_errors_are_one_line_and_exit_1(teacher, tmp_path):
    comp, work, run = registered(teacher)
    runner = CliRunner()
    common = ["train", comp.slug, str(work), str(tmp_path / "s"), "--device", "cpu", "--epochs", "1"]
    cases = [(["--folds", "3", "--soft-labels", str(tmp_path / "nothing")], "not a training run"),
             (["--folds", "3", "--soft-weight", "1.5"], "give a value in [0, 1]"),
             (["--soft-labels", str(run)], "needs fold members")]
    for extra, message in cases:
        result = runner.invoke(app, common + extra)
        assert result.exit_code == 1, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.output, result.output


# ---------------------------------------------------------------- the other kinds, the loss


def test_mixing_works_alike_for_multilabel_rows_and_regression_values():
    from pathlib import Path

    from pipeline.data.items import Item
    from pipeline.models.task import Task
    from pipeline.train.teacher import mixed

    labels = [Item("a", Path("a.png"), (1.0, 0.0)), Item("b", Path("b.png"), (0.0, 1.0))]
    got = mixed(labels, np.array([[0.2, 0.4], [0.6, 0.8]]), 0.25, Task("multilabel", ("x", "y")))
    assert np.allclose([it.target for it in got], [[0.8, 0.1], [0.15, 0.95]])
    values = [Item("a", Path("a.png"), (3.0,))]
    assert mixed(values, np.array([[5.0]]), 0.25, Task("regression", ("v",)))[0].target == pytest.approx((3.5,))
    classes = [Item("a", Path("a.png"), 2)]
    assert np.allclose(mixed(classes, np.array([[0.2, 0.2, 0.6]]), 0.5, Task("single", ("p", "q", "r")))[0].target,
                       [0.1, 0.1, 0.8])


def test_the_class_loss_takes_probability_rows_and_leaves_unreadable_rows_out():
    from pipeline.models.task import Task

    loss = Task("single", ("p", "q", "r")).criterion()
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.1, -1.0, 2.0], [3.0, 0.0, 0.0]])
    rows = torch.tensor([[0.2, 0.7, 0.1], [0.0, 0.0, 1.0], [float("nan")] * 3])  # the last: unreadable
    expected = -(rows[:2] * torch.log_softmax(logits[:2], dim=1)).sum(dim=1).mean()
    assert float(loss(logits, rows)) == pytest.approx(float(expected))
    assert float(loss(logits[1:2], rows[1:2])) == pytest.approx(float(loss(logits[1:2], torch.tensor([2]))))


def test_the_multilabel_logreg_head_refuses_soft_targets():
    from pipeline.models.task import Task
    from pipeline.train.logreg import _fit_other

    with pytest.raises(PipelineError, match="need --head linear"):
        _fit_other(None, Task("multilabel", ("x", "y")), np.zeros((4, 3)), np.full((4, 2), 0.3), np.arange(4), 0, 1)


def test_the_class_prior_head_fits_probability_rows_as_it_fits_their_labels():
    from pipeline.train.prior_fit import fit_logreg_prior

    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(30, 5)), np.arange(30) % 3
    prior_w, prior_b = rng.normal(size=(3, 5)), np.zeros(3)
    hard = fit_logreg_prior(x, y, prior_w, prior_b, cs=(0.1,))
    one_hot = fit_logreg_prior(x, np.eye(3)[y], prior_w, prior_b, cs=(0.1,))
    assert np.allclose(hard[0], one_hot[0], atol=1e-6) and np.allclose(hard[1], one_hot[1], atol=1e-6)
    soft = fit_logreg_prior(x, 0.5 * np.eye(3)[y] + 0.5 / 3, prior_w, prior_b, cs=(0.1,))
    assert np.abs(soft[0] - hard[0]).max() > 1e-3  # softer targets: another head
