"""The report and the run summary for every task kind: runs built through the CLI from tests/kinds.py's
generated downloads (2 folds, 1 epoch of fastnet_s at 16 px), the values the report shows checked against
scikit-learn and pandas on the run's oof.csv and cv.json."""
from __future__ import annotations

import math
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import cohen_kappa_score, fbeta_score, mean_absolute_error, mean_squared_error, roc_auc_score
from typer.testing import CliRunner

from pipeline.cli.app import app
from pipeline.data.items import load_reorg
from pipeline.report.facts import absent_labels, shown_facts, target_range
from pipeline.report.facts import fit_text
from pipeline.report.kinds import (KindInputs, decided, group_text, metadata_table, metadata_text,
                                   multilabel_figures, ordinal_figures, regression_figures)
from pipeline.runs import Run
from pipeline.models.task import LABEL_JOIN, Task
from pipeline.train.summary import task_line
from tests.kinds import WRITERS, spec_text

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


class Page(HTMLParser):
    """report.html's summary (heading -> text) and tables (section heading -> rows of cell texts)."""

    def __init__(self, text: str):
        super().__init__()
        self.summary, self.tables, self._heading, self._rows, self._cell = {}, {}, None, None, None
        self._in_h2 = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        if tag == "h2":
            self._in_h2, self._heading = True, ""
        elif tag == "table":
            self._rows = []
        elif tag == "tr" and self._rows is not None:
            self._rows.append([])
        elif tag in ("td", "th") and self._rows is not None:
            self._cell = ""

    def handle_endtag(self, tag):
        if tag == "h2":
            self._in_h2 = False
        elif tag in ("td", "th") and self._cell is not None:
            self._rows[-1].append(self._cell)
            self._cell = None
        elif tag == "table":
            if self._heading == "Summary":
                self.summary = {row[0]: row[1] for row in self._rows}
            self.tables[self._heading] = self._rows
            self._rows = None

    def handle_data(self, data):
        if self._in_h2:
            self._heading += data
        elif self._cell is not None:
            self._cell += data

    def frame(self, heading_start: str) -> pd.DataFrame:
        heading = next(h for h in self.tables if h.startswith(heading_start))
        rows = self.tables[heading]
        return pd.DataFrame(rows[1:], columns=rows[0])


def chain(root: Path, kind: str, folds: int = 2) -> SimpleNamespace:
    """A download of ``kind`` reorganised, trained and reported through the CLI."""
    raw, work, run, out = root / "raw", root / "work", root / "run", root / "report"
    raw.mkdir(parents=True)
    fields = WRITERS[kind](raw)
    spec = root / "spec.toml"
    spec.write_text(spec_text(fields))
    invoke("reorg", spec, raw, work, "--folds", folds)
    trained = invoke("train", spec, work, run, "--folds", folds, "--device", "cpu", "--epochs", 1)
    invoke("report", run, "--out", out)
    r = Run(run)
    page = Page((out / "report.html").read_text(encoding="utf-8"))
    oof = pd.read_csv(r.oof_path, dtype={"id": str, "label": str}, keep_default_na=False)
    folds_of = pd.read_csv(work / "folds.csv", dtype={"id": str}).set_index("id")["fold"]
    return SimpleNamespace(raw=raw, work=work, run=run, out=out, page=page, cv=r.read_cv(), oof=oof,
                           folds=folds_of.loc[oof["id"]].to_numpy(), info=load_reorg(work), fields=fields,
                           output=trained.output)


@pytest.fixture(scope="module")
def tags(tmp_path_factory):
    return chain(tmp_path_factory.mktemp("tags"), "tags")


@pytest.fixture(scope="module")
def regression(tmp_path_factory):
    return chain(tmp_path_factory.mktemp("regression"), "regression")


@pytest.fixture(scope="module")
def ordinal(tmp_path_factory):
    return chain(tmp_path_factory.mktemp("ordinal"), "ordinal")


@pytest.fixture(scope="module")
def patients(tmp_path_factory):
    return chain(tmp_path_factory.mktemp("patients"), "patients")


def _num(cell: str) -> float:
    return math.nan if cell == "" else float(cell)


# ---------------------------------------------------------------- multilabel


def test_multilabel_report_shows_each_labels_oof_auc_prevalence_and_the_cv_thresholds(tags):
    labels = tags.info["classes"]
    table = tags.page.frame("per-label ROC AUC").set_index("label")
    assert list(table.index) == labels
    truth = np.array([[name in cell.split(LABEL_JOIN) for name in labels] for cell in tags.oof["label"]])
    decision = tags.cv["decision"]  # F2 on label sets: thresholds fitted out of fold
    for k, name in enumerate(labels):
        scores = tags.oof[name].astype(float).to_numpy()
        assert _num(table.loc[name, "roc_auc"]) == pytest.approx(roc_auc_score(truth[:, k], scores), abs=5e-5)
        assert _num(table.loc[name, "prevalence"]) == pytest.approx(truth[:, k].mean(), abs=5e-5)
        assert int(table.loc[name, "positives"]) == truth[:, k].sum()
        assert _num(table.loc[name, "threshold"]) == pytest.approx(decision["thresholds"][k], abs=5e-5)
        # the label's F2 of the nested decisions: each fold's rows cut by the thresholds fitted without it
        cuts = np.array([decision["per_fold"][str(f)][k] for f in tags.folds])
        expected = fbeta_score(truth[:, k], scores >= cuts, beta=2.0, zero_division=0)
        assert _num(table.loc[name, "f2 (decisions scored)"]) == pytest.approx(expected, abs=5e-5)
    scores = tags.page.frame("the thresholds' scores").set_index("thresholds")["f_beta_samples"].map(_num)
    assert scores.to_dict() == pytest.approx({"nested": decision["nested"], "in-sample": decision["in_sample"],
                                              "default": decision["default"]}, abs=5e-5)
    assert (tags.out / "label_auc.png").is_file() and not (tags.out / "confusion_matrix.png").exists()
    assert tags.page.summary["task"].startswith("multilabel: 4 labels")


def test_the_run_summary_names_the_task_and_its_labels(tags):
    summary = Run(tags.run).summary_path.read_text(encoding="utf-8")
    line = next(s for s in summary.splitlines() if s.startswith("  task"))
    assert "multilabel: 4 labels (clear, haze, road, water)" in line


# ---------------------------------------------------------------- regression


def test_regression_report_scores_and_ranges_match_the_oof_rows_and_each_folds_training_rows(regression):
    true = regression.oof["label"].astype(float).to_numpy()
    predicted = regression.oof["Pawpularity"].astype(float).to_numpy()
    summary = regression.page.summary
    assert float(summary["out-of-fold rmse"].split()[0]) == pytest.approx(
        math.sqrt(mean_squared_error(true, predicted)), abs=5e-5)
    assert float(summary["out-of-fold mae"].split()[0]) == pytest.approx(mean_absolute_error(true, predicted), abs=5e-5)
    assert float(summary["out-of-fold rmse"].split()[0]) == pytest.approx(regression.cv["cv"], abs=5e-5)
    # each member's training range: the min and max of the targets of the other fold's rows
    train = pd.read_csv(regression.raw / "train.csv", dtype={"Id": str}).set_index("Id")["Pawpularity"]
    folds = pd.read_csv(regression.work / "folds.csv", dtype={"id": str}).set_index("id")["fold"]
    expected = ", ".join(f"fold{k} {train[folds.index[folds != k]].min():g} to {train[folds.index[folds != k]].max():g}"
                         for k in (0, 1))
    assert summary["training range (predictions clipped to it)"] == expected
    assert summary["metadata columns"] == "Eyes (standardised), Group (one-hot: a, b)"
    encoding = regression.page.frame("metadata encoding").set_index("member")
    eyes = pd.read_csv(regression.raw / "train.csv", dtype={"Id": str}).set_index("Id")["Eyes"]
    for k in (0, 1):  # each member standardised Eyes with the mean and std of its own training rows
        rows = eyes[folds.index[folds != k]]
        assert encoding.loc[f"fold{k}", "Eyes"] == f"mean {rows.mean():.4g}, std {rows.std(ddof=0):.4g}"
    assert (regression.out / "predicted_vs_true.png").is_file() and (regression.out / "residuals.png").is_file()
    largest = regression.page.frame("largest residuals")
    assert _num(largest["residual"].iloc[0]) == pytest.approx(np.abs(predicted - true).max() * np.sign(
        (predicted - true)[np.abs(predicted - true).argmax()]), abs=5e-5)


def test_the_regression_scatter_draws_exactly_the_oof_rows(regression):
    task = Task.of(regression.info)
    preds = regression.oof.copy()
    preds["Pawpularity"] = preds["Pawpularity"].astype(float)
    figures, _, _ = regression_figures(KindInputs(preds, task, "out-of-fold", "rmse"))
    points = figures["predicted_vs_true.png"].axes[0].collections[0].get_offsets()
    expected = np.c_[regression.oof["label"].astype(float), regression.oof["Pawpularity"].astype(float)]
    np.testing.assert_allclose(np.asarray(points), expected)
    residuals = figures["residuals.png"].axes[0].collections[0].get_offsets()
    np.testing.assert_allclose(np.asarray(residuals)[:, 1], expected[:, 1] - expected[:, 0])


def test_a_holdout_regression_run_is_reported_from_its_validation_rows(regression):
    """No oof.csv: the report predicts the holdout's validation images itself (targets as numbers)."""
    run, out = regression.run.parent / "holdout", regression.run.parent / "holdout_report"
    invoke("train", regression.run.parent / "spec.toml", regression.work, run, "--device", "cpu", "--epochs", 1)
    invoke("report", run, "--out", out)
    summary = Page((out / "report.html").read_text(encoding="utf-8")).summary
    kept = Run(run).member("holdout").done()["kept"]
    assert summary["validation rmse"] == f"{kept['metric']:.4f} ({kept['valid_images']} images)"
    assert (out / "predicted_vs_true.png").is_file()


# ---------------------------------------------------------------- ordinal


def test_ordinal_grade_confusion_is_the_crosstab_of_the_nested_decisions_and_scores_the_reported_qwk(ordinal):
    grades = ordinal.info["grades"]
    decision = ordinal.cv["decision"]
    true = ordinal.oof["label"].map({g: i for i, g in enumerate(grades)}).to_numpy()
    number = ordinal.oof["diagnosis"].astype(float).to_numpy()
    decided = np.array([np.searchsorted(np.sort(decision["per_fold"][str(f)]), x, side="right")
                        for f, x in zip(ordinal.folds, number)])
    expected = pd.crosstab(pd.Categorical(true, categories=range(len(grades))),
                           pd.Categorical(decided, categories=range(len(grades))), dropna=False)
    shown = ordinal.page.frame("grade confusion").set_index("true grade").astype(int)
    assert list(shown.index) == grades and list(shown.columns) == grades
    np.testing.assert_array_equal(shown.to_numpy(), expected.to_numpy())
    qwk = cohen_kappa_score(true, decided, weights="quadratic", labels=list(range(len(grades))))
    shown_qwk = float(ordinal.page.summary["out-of-fold qwk of the grades shown"].split()[0])
    assert shown_qwk == pytest.approx(qwk, abs=5e-5) and shown_qwk == pytest.approx(decision["nested"], abs=5e-5)
    cuts = ordinal.page.frame("cuts between grades")
    assert [_num(c) for c in cuts["fitted (test set)"]] == pytest.approx(decision["thresholds"], abs=5e-5)
    assert [_num(c) for c in cuts["default"]] == [0.5, 1.5, 2.5, 3.5]
    scores = ordinal.page.frame("the cuts' scores").set_index("thresholds")["qwk"].map(_num)
    assert scores["in-sample"] == pytest.approx(decision["in_sample"], abs=5e-5)
    assert (ordinal.out / "grade_confusion.png").is_file()


# ---------------------------------------------------------------- single-label with groups and metadata


def test_a_single_label_run_with_groups_reports_the_group_column_and_keeps_its_class_figures(patients):
    train = pd.read_csv(patients.raw / "train.csv")
    summary = patients.page.summary
    assert summary["group column"] == (f"patient_id: {train['patient_id'].nunique()} groups over {len(train)} images; "
                                       "no group in two folds")
    assert summary["metadata columns"] == "sex (one-hot: female, male), age_approx (standardised)"
    assert "task" not in summary  # single-label says nothing new
    assert (patients.out / "confusion_matrix.png").is_file() and (patients.out / "most_wrong.png").is_file()
    run_summary = Run(patients.run).summary_path.read_text(encoding="utf-8")
    assert "  task       single-label: 2 classes; metadata sex, age_approx; groups by patient_id" in run_summary


# ---------------------------------------------------------------- pure parts


def test_the_decisions_shown_are_each_folds_own_thresholds_not_the_in_sample_ones():
    task = Task("ordinal", ("y",), ("0", "1"))
    outputs = np.array([[0.4], [0.6], [1.4], [1.6]])
    folds = pd.Series({"a": 0, "b": 0, "c": 1, "d": 1})
    decision = {"thresholds": [1.0], "per_fold": {"0": [0.5], "1": [1.5]}}
    assert decided(task, outputs, ["a", "b", "c", "d"], decision, folds).ravel().tolist() == [0, 1, 0, 1]
    assert decided(task, outputs, ["a", "b", "c", "d"], None, folds).ravel().tolist() == [0, 1, 1, 1]  # 0.5 cut
    labels = Task("multilabel", ("p", "q"))
    probs = np.array([[0.3, 0.9], [0.3, 0.9]])
    two = {"per_fold": {"0": [0.2, 0.95], "1": [0.4, 0.5]}}
    assert decided(labels, probs, ["a", "c"], two, folds).tolist() == [[1, 0], [0, 1]]


def test_the_image_grids_show_the_most_wrong_rows_first():
    asked = []

    def read(ids):
        asked.append(list(ids))
        return [(i, np.zeros((4, 4, 3), dtype=np.uint8)) for i in ids]

    labels = Task("multilabel", ("p", "q"))
    preds = pd.DataFrame({"id": ["a", "b", "c"], "label": [LABEL_JOIN.join("pq"), "p", ""], "p": [0.9, 0.2, 0.9], "q": [0.1, 0.2, 0.8]})
    figures, _, _ = multilabel_figures(KindInputs(preds, labels, "validation", "mean_auc", read=read))
    assert asked[-1] == ["c", "a", "b"]  # c: both labels wrong; a: one (q 0.1, off by 0.9); b: one (p 0.2, off by 0.8)
    grades = Task("ordinal", ("y",), ("0", "1", "2"))
    preds = pd.DataFrame({"id": ["a", "b", "c"], "label": ["0", "2", "1"], "y": [1.7, 0.2, 1.2]})
    figures, _, _ = ordinal_figures(KindInputs(preds, grades, "validation", "qwk", read=read))
    assert asked[-1] == ["b", "a"]  # b: 2 grades off, a: 2 grades off by less, c right
    assert "most_wrong_grades.png" in figures


def test_fit_text_reads_ridge_and_per_label_records():
    ridge = {"head": "logreg", "alpha": 10.0, "inner_cv_loss": {"1.0": 0.5, "10.0": 0.25}}
    assert fit_text(ridge) == "logreg: alpha 10 (inner CV squared error by alpha: 1 0.5, 10 0.25)"
    labels = {"head": "logreg", "C": 1.0, "inner_cv_loss": {"0.1": 0.6, "1.0": 0.4}}
    assert fit_text(labels) == "logreg: C 1 (inner CV BCE by C: 0.1 0.6, 1 0.4)"


def test_group_text_counts_groups_that_straddle_folds():
    groups = pd.Series({"a": "p1", "b": "p1", "c": "p2", "d": "p3", "e": ""})
    folds = pd.Series({"a": 0, "b": 1, "c": 0, "d": 1, "e": 0})
    assert group_text("patient", groups, folds) == "patient: 3 groups over 4 images; 1 groups in more than one fold"
    assert group_text("", groups, folds).startswith("none")


def test_metadata_text_describes_a_recorded_encoding_else_the_work_folders_list():
    assert metadata_text(("Eyes", "Group")) == "Eyes, Group (not encoded by any member)"
    encoding = {"numeric": [["Eyes", 0.5, 0.25]], "categorical": [["Group", ["a", "b"]]], "columns": ["Group", "Eyes"]}
    assert metadata_text(("Eyes", "Group"), encoding) == "Group (one-hot: a, b), Eyes (standardised)"
    table = metadata_table({"fold0": encoding})
    assert table.to_dict("records") == [{"member": "fold0", "Eyes": "mean 0.5, std 0.25", "Group": "2 categories"}]


def test_absent_labels_and_training_range_facts():
    assert absent_labels(["a", "b", "c"], [(1.0, 0.0, 0.0), (1.0, 0.0, math.nan)]) == ["b", "c"]
    assert target_range({"kind": "regression", "low": 1.0, "high": 99.0}) == [1.0, 99.0]
    assert target_range({"kind": "multilabel", "low": None}) is None and target_range(None) is None
    assert shown_facts({"member": "fold0", "target_range": [1.0, 99.0]})["training range"] == "1 to 99"


def test_task_line_is_empty_for_plain_single_label_and_lists_ranges_for_numbers():
    single = Task("single", ("cat", "dog"))
    assert task_line(single, (), "", {"fold0": single}) == ""
    reg = Task("regression", ("y",)).fitted(__import__("torch").tensor([[1.0], [5.0]]))
    line = task_line(reg, ("age",), "", {"fold0": reg})
    assert line == "regression of y (mse loss); training range (predictions clipped to it) fold0 1 to 5; metadata age"
