"""The report's tables, figures and report.html, on hand-made predictions frames (no training)."""
from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import confusion_matrix, recall_score

from conftest import config_from_recipe
from pipeline.config import TrainConfig
from pipeline.data.items import list_split, load_reorg
from pipeline.io import atomic_write_csv, atomic_write_json
from pipeline.download.reorg import reorg
from pipeline.runs import Run
from pipeline.report.build import mistakes_figure, run_facts, write_report
from pipeline.report.facts import absent_classes, member_facts, split_facts, weights_of
from pipeline.report.figures import (accuracy_of, confused_pairs_figure, mistake_titles, most_wrong,
                                     per_class_accuracy, per_class_figure, prediction_figure, predictions_figure,
                                     shorten_left, top_confused_pairs, validation_figures)
from pipeline.report.html import cv_frame, report_html, report_summary, table_html
from pipeline.report.training_figures import learning_curves_figure
from tests.conftest import make_competition, write_raw

CLASSES = ["ant", "bee", "cow"]


def known_mistakes() -> pd.DataFrame:
    """Nine rows, four right; mistakes ant→bee twice, bee→ant, cow→ant, cow→bee once each."""
    rows = [("r1", "ant", 0.8, 0.1, 0.1), ("r2", "ant", 0.3, 0.6, 0.1), ("r3", "ant", 0.1, 0.7, 0.2),
            ("r4", "ant", 0.7, 0.2, 0.1), ("r5", "bee", 0.5, 0.4, 0.1), ("r6", "bee", 0.1, 0.8, 0.1),
            ("r7", "cow", 0.6, 0.15, 0.25), ("r8", "cow", 0.1, 0.1, 0.8), ("r9", "cow", 0.1, 0.6, 0.3)]
    return pd.DataFrame(rows, columns=["id", "label", *CLASSES])


def random_predictions(n_classes: int, n: int, seed: int = 0) -> tuple[pd.DataFrame, list[str]]:
    rng = np.random.default_rng(seed)
    classes = [f"breed_{i}" for i in range(n_classes)]
    targets = rng.integers(0, n_classes, n)
    logits = rng.normal(size=(n, n_classes))
    logits[np.arange(n), targets] += 2.0  # mostly right, with plenty of mistakes
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    frame = pd.DataFrame(probs, columns=classes)
    frame.insert(0, "label", [classes[t] for t in targets])
    frame.insert(0, "id", [f"i{k}" for k in range(n)])
    return frame, classes


# ---------------------------------------------------------------- tables


def test_top_confused_pairs_counts_and_orders_the_mistakes():
    pairs = top_confused_pairs(known_mistakes(), CLASSES)
    assert list(zip(pairs["true"], pairs["predicted"])) == [("ant", "bee"), ("bee", "ant"), ("cow", "ant"),
                                                            ("cow", "bee")]
    assert pairs["count"].tolist() == [2, 1, 1, 1]
    assert pairs["share"].tolist() == pytest.approx([2 / 4, 1 / 2, 1 / 3, 1 / 3])
    assert len(top_confused_pairs(known_mistakes(), CLASSES, k=2)) == 2


def test_top_confused_pairs_agree_with_sklearn_at_120_classes():
    preds, classes = random_predictions(120, 3000)
    pairs = top_confused_pairs(preds, classes, k=20)
    matrix = confusion_matrix(preds["label"], np.asarray(classes)[preds[classes].to_numpy().argmax(axis=1)],
                              labels=classes)
    index = {c: i for i, c in enumerate(classes)}
    for row in pairs.itertuples(index=False):
        i, j = index[row.true], index[row.predicted]
        assert i != j and row.count == matrix[i, j] and row.share == pytest.approx(matrix[i, j] / matrix[i].sum())
    np.fill_diagonal(matrix, 0)
    assert sorted(pairs["count"], reverse=True) == sorted(matrix.ravel(), reverse=True)[:20]


def test_per_class_accuracy_sorts_worst_first_with_the_true_class_probability():
    table = per_class_accuracy(known_mistakes(), CLASSES)
    assert table["class"].tolist() == ["cow", "ant", "bee"]  # ant and bee tie at 0.5: lower p(true) first
    assert table["n"].tolist() == [3, 4, 2]
    assert table["accuracy"].tolist() == pytest.approx([1 / 3, 0.5, 0.5])
    assert table["mean_p_true"].tolist() == pytest.approx([(0.25 + 0.8 + 0.3) / 3, 1.9 / 4, 1.2 / 2])


def test_per_class_accuracy_matches_sklearn_recall_and_lists_empty_classes_last():
    preds, classes = random_predictions(12, 400, seed=1)
    preds = preds[preds["label"] != "breed_5"]  # a class without validation images
    table = per_class_accuracy(preds, classes).set_index("class")
    predicted = np.asarray(classes)[preds[classes].to_numpy().argmax(axis=1)]
    recall = recall_score(preds["label"], predicted, labels=classes, average=None, zero_division=np.nan)
    assert table.loc[classes, "accuracy"].to_numpy() == pytest.approx(recall, nan_ok=True)
    assert table.index[-1] == "breed_5" and table.loc["breed_5", "n"] == 0
    assert accuracy_of(preds, classes) == pytest.approx((predicted == preds["label"]).mean())


def test_most_wrong_ranks_by_the_true_class_probability():
    wrong = most_wrong(known_mistakes(), CLASSES, k=9)
    assert wrong["id"].tolist() == ["r3", "r7", "r2", "r9", "r5"]  # r2 and r9 tie at 0.3: frame order
    assert wrong["predicted"].tolist() == ["bee", "ant", "bee", "bee", "ant"]
    assert wrong["p_true"].tolist() == [0.1, 0.25, 0.3, 0.3, 0.4]
    assert wrong["p_predicted"].tolist() == [0.7, 0.6, 0.6, 0.6, 0.5]
    assert most_wrong(known_mistakes(), CLASSES, k=2)["id"].tolist() == ["r3", "r7"]
    assert mistake_titles(wrong.head(2)) == ["r3\nant → bee (0.100)", "r7\ncow → ant (0.250)"]


def test_shorten_left_keeps_the_file_name():
    path = "/data/" + "deep/" * 30 + "golden_retriever_0042.jpg"
    short = shorten_left(path, 40)
    assert len(short) == 40 and short.startswith("…") and short.endswith("/golden_retriever_0042.jpg")
    assert shorten_left("a/b.png", 40) == "a/b.png"


# ---------------------------------------------------------------- figures


def bar_labels(ax) -> list[str]:
    return [t.get_text() for t in ax.get_yticklabels()]


def test_confused_pairs_figure_draws_one_bar_per_pair_most_frequent_on_top():
    pairs = top_confused_pairs(known_mistakes(), CLASSES)
    ax = confused_pairs_figure(pairs).axes[0]
    assert len(ax.patches) == 4
    assert [p.get_width() for p in ax.patches] == [2, 1, 1, 1]
    assert bar_labels(ax)[0] == "ant → bee" and ax.yaxis_inverted()
    assert confused_pairs_figure(pairs.iloc[:0]).axes == []


def test_per_class_figure_shows_the_worst_30_and_best_10_of_120_classes():
    preds, classes = random_predictions(120, 2400)
    table = per_class_accuracy(preds, classes)
    ax = per_class_figure(table).axes[0]
    assert len(ax.patches) == 40
    labels = bar_labels(ax)
    assert labels[0] == f"{table['class'].iloc[0]} ({table['n'].iloc[0]})"
    assert labels[-1] == f"{table['class'].iloc[-1]} ({table['n'].iloc[-1]})"
    assert [p.get_width() for p in ax.patches] == pytest.approx(
        np.r_[table["accuracy"].to_numpy()[:30], table["accuracy"].to_numpy()[-10:]])
    small = per_class_figure(per_class_accuracy(known_mistakes(), CLASSES)).axes[0]
    assert len(small.patches) == 3 and bar_labels(small) == ["cow (3)", "ant (4)", "bee (2)"]


@pytest.mark.parametrize("n_classes, names", [
    (3, {"confusion_matrix.png"}),
    (120, {"confused_pairs.png", "per_class_accuracy.png"}),
])
def test_validation_figures_drop_the_confusion_matrix_above_25_classes(n_classes, names):
    preds, classes = random_predictions(n_classes, 600)
    assert set(validation_figures(preds, classes, "out-of-fold")) == names


def test_learning_curves_add_a_learning_rate_panel():
    member = pd.DataFrame({"epoch": [1, 2, 3], "train_loss": [1.0, 0.6, 0.4], "valid_loss": [1.1, 0.8, 0.7],
                           "valid_accuracy": [0.4, 0.6, 0.7], "lr": [0.1, 0.05, 0.001]})
    fig = learning_curves_figure({"fold0": member, "fold1": member})
    loss, accuracy, lr = fig.axes
    assert len(loss.lines) == 4 and len(accuracy.lines) == 2 and len(lr.lines) == 2
    assert lr.lines[0].get_ydata().tolist() == [0.1, 0.05, 0.001]
    full = learning_curves_figure({"full": member[["epoch", "train_loss", "lr"]]})
    assert len(full.axes) == 2 and "learning rate" in full.axes[1].get_title()


def test_prediction_figure_puts_the_top_k_beside_the_image():
    top = [("beagle", 0.7), ("basset", 0.2), ("pug", 0.05)]
    path = "/very/long/folder/" * 8 + "dog 1.jpg"
    fig = prediction_figure(np.zeros((40, 30, 3), np.uint8), path, top)
    image_ax, bars_ax = fig.axes
    assert len(image_ax.images) == 1
    assert bar_labels(bars_ax) == ["beagle", "basset", "pug"]
    assert [p.get_width() for p in bars_ax.patches] == pytest.approx([0.7, 0.2, 0.05])
    (title,) = [t.get_text() for sub in fig.subfigs for t in sub.texts]
    assert title == shorten_left(path) and title.endswith("/dog 1.jpg") and title.startswith("…")
    two = predictions_figure([(np.zeros((8, 8, 3), np.uint8), "a.png", top[:1])] * 2)
    assert len(two.axes) == 4 and len(two.subfigs) == 2


def test_mistakes_figure_titles_show_true_predicted_and_p_true(tmp_path):
    paths = {}
    for k in range(1, 10):
        paths[f"r{k}"] = tmp_path / f"r{k}.png"
        Image.fromarray(np.full((8, 8, 3), 25 * k, np.uint8)).save(paths[f"r{k}"])
    fig = mistakes_figure(known_mistakes(), CLASSES, paths)
    titles = [ax.get_title() for ax in fig.axes if ax.images]
    assert titles == mistake_titles(most_wrong(known_mistakes(), CLASSES))
    assert titles[0] == "r3\nant → bee (0.100)"


# ---------------------------------------------------------------- report.html


class Tags(HTMLParser):
    def __init__(self, text: str):
        super().__init__()
        self.tags, self.srcs = [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.srcs += [value for name, value in attrs if tag == "img" and name == "src"]


def test_report_html_escapes_user_strings_and_links_every_image():
    classes = ["<b>&", "bee", "cow"]
    preds = known_mistakes().rename(columns={"ant": "<b>&"}).replace({"label": {"ant": "<b>&"}})
    tables = {"per-class <accuracy>": per_class_accuracy(preds, classes), "pairs": top_confused_pairs(preds, classes)}
    images = [("curves & lr", "learning_curves.png"), ("pairs", "confused pairs.png")]
    page = report_html("run <x>", {"model": "<script>", "CV accuracy": "0.9"}, None, images, tables)
    parsed = Tags(page)
    assert "b" not in parsed.tags and "script" not in parsed.tags and "x" not in parsed.tags
    assert "<b>&" not in page and "&lt;b&gt;&amp;" in page and "per-class &lt;accuracy&gt;" in page
    assert parsed.srcs == ["learning_curves.png", "confused%20pairs.png"]
    assert 'href="#cv"' not in page  # no CV section without a CV table
    assert page.count("<tr>") == 2 + (1 + 3) + (1 + 4)  # summary rows, then header + rows of each table


def test_report_summary_and_cv_table():
    config = {"competition": "dogs", "model": "resnet18", "lr": 0.1, "folds": 2, "fold": None, "full": False,
              "mean": [0.5, 0.5, 0.5]}
    cv = {"metric": "log_loss", "cv": 0.41234, "overall": {"log_loss": 0.41234, "accuracy": 0.88},
          "folds": [{"fold": 0, "log_loss": 0.4, "accuracy": 0.9, "best_epoch": 7},
                    {"fold": 1, "log_loss": 0.42, "accuracy": 0.86, "best_epoch": 9}]}
    done = {"fold0": {"epochs": 10, "best": {"epoch": 7, "metric": 0.4, "variant": "ema"}}, "fold1": None}
    summary = report_summary(config, cv, done)
    assert summary["mode"] == "folds" and summary["model"] == "resnet18" and summary["members"] == "2"
    assert summary["CV log_loss"] == "0.4123" and "mean" not in summary
    assert summary["best epoch, fold0"] == "7 of 10 (score 0.4, ema)"
    assert summary["best epoch, fold1"] == "not finished"
    table = cv_frame(cv)
    assert table["fold"].tolist() == [0, 1, "all"] and table["accuracy"].tolist() == [0.9, 0.86, 0.88]
    assert cv_frame(None) is None and cv_frame({"cv": 1.0}) is None
    assert 'href="#cv"' in report_html("r", summary, table, [], {})


# ---------------------------------------------------------------- write_report


def fake_fold_run(root: Path, classes: list[str]) -> tuple[Path, Path]:
    """A reorganised download and a 2-fold run folder with oof.csv, cv.json and metrics (no training)."""
    comp = make_competition("toy")
    work = root / "work"
    reorg(comp, write_raw(root / "raw", comp, classes=classes, per_class=2, n_test=1, size=8), work,
          valid_ratio=0.5, folds=2)
    info = load_reorg(work)
    run = root / "run"
    atomic_write_json(run / "config.json", config_from_recipe(comp, work, run, folds=2).to_json())
    items = list_split(work, info, "train_valid")
    probs = np.random.default_rng(0).dirichlet(np.ones(len(classes)), len(items))
    oof = pd.DataFrame(probs, columns=info["classes"])
    oof.insert(0, "label", [info["classes"][it.target] for it in items])
    oof.insert(0, "id", [it.id for it in items])
    atomic_write_csv(run / "oof.csv", oof)
    atomic_write_json(run / "cv.json", {"metric": "accuracy", "cv": 0.5, "overall": {"accuracy": 0.5},
                                        "folds": [{"fold": 0, "accuracy": 0.5}, {"fold": 1, "accuracy": 0.5}]})
    metrics = pd.DataFrame({"epoch": [1, 2], "train_loss": [2.0, 1.5], "lr": [0.1, 0.01],
                            "valid_loss": [2.1, 1.9], "valid_accuracy": [0.3, 0.5]})
    for fold in ("fold0", "fold1"):
        atomic_write_csv(run / fold / "metrics.csv", metrics)
    atomic_write_json(run / "fold0" / "done.json", {"epochs": 2, "best": {"epoch": 2, "metric": 0.5}})
    return run, work


@pytest.mark.parametrize("n_classes, by_class", [
    (3, {"confusion_matrix.png"}),
    (120, {"confused_pairs.png", "per_class_accuracy.png"}),
])
def test_write_report_writes_the_pngs_and_an_index_page(tmp_path, n_classes, by_class):
    classes = ["<b>&", *(f"breed_{i}" for i in range(n_classes - 1))]
    run, work = fake_fold_run(tmp_path, classes)
    written = write_report(run, work, tmp_path / "report", device="cpu")
    names = {"learning_curves.png", "train_images.png", "most_wrong.png", "report.html"} | by_class
    assert {p.name for p in written} == names and all(p.is_file() for p in written)
    assert written[-1].name == "report.html"
    page = written[-1].read_text(encoding="utf-8")
    assert Tags(page).srcs == [p.name for p in written if p.suffix == ".png"]
    assert "&lt;b&gt;&amp;" in page and "<b>&" not in page
    assert "not finished" in page  # fold1 has no done.json
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == sorted(names)  # no temporary files left


# ---------------------------------------------------------------- classes absent from a member's training rows


def test_absent_rows_come_after_the_models_mistakes_and_say_so():
    absent = np.array([False, False, True, False, False, False, False, False, False])  # r3: ant, never trained on
    wrong = most_wrong(known_mistakes(), CLASSES, k=9, absent=absent)
    assert wrong["id"].tolist() == ["r7", "r2", "r9", "r5", "r3"] and wrong["absent"].tolist() == [False] * 4 + [True]
    assert mistake_titles(wrong.tail(1)) == ["r3\nant → bee (0.100)\nclass absent from training"]
    table = per_class_accuracy(known_mistakes(), CLASSES, absent).set_index("class")
    assert table["absent"].to_dict() == {"ant": 1, "bee": 0, "cow": 0}
    figure = per_class_figure(table.reset_index())
    ax = figure.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert [label for label in labels if label.endswith(" absent")] == ["ant (4) absent"]
    assert [p.get_hatch() for p in ax.patches[:3]].count("//") == 1 and "1 classes absent" in ax.get_title()


def test_absent_classes_of_training_targets():
    assert absent_classes(["ant", "bee", "cow", "dog"], [0, 2, 2]) == ["bee", "dog"]
    assert absent_classes(["ant"], []) == ["ant"]


def test_a_fold_without_a_class_is_counted_and_marked_in_the_report(tmp_path):
    run, work = fake_fold_run(tmp_path, ["ant", "bee", "cow"])
    folds = pd.read_csv(work / "folds.csv", dtype=str)
    folds.loc[folds["label"] == "cow", "fold"] = "0"  # both cow images validate in fold 0: fold0 never trains on cow
    folds.to_csv(work / "folds.csv", index=False)
    info = load_reorg(work)
    facts = {f["member"]: f for f in run_facts(run, work, info)}
    assert facts["fold0"]["absent_classes"] == ["cow"] and facts["fold1"]["absent_classes"] == []
    written = write_report(run, work, tmp_path / "report", device="cpu")
    page = written[-1].read_text(encoding="utf-8")
    assert ("<tr><th>images of classes absent from training</th><td>2 of 6 validation images (1 classes): "
            "their member never trained on their class") in page
    members = page.split('<section id="members">')[1].split("</section>")[0]
    assert "<th>classes absent from training</th>" in members
    assert re.search(r"<td>fold0</td>.*?<td class=\"num\">1</td>", members)  # per member: they differ
    assert re.search(r"<td>fold1</td>.*?<td class=\"num\">0</td>", members)


def test_whole_numbers_print_as_integers_in_the_cv_table():
    cv = {"metric": "accuracy", "cv": 1.0, "overall": {"accuracy": 1.0},
          "folds": [{"fold": 0, "accuracy": 1.0, "epochs": 1, "best_epoch": 1},
                    {"fold": 1, "accuracy": 0.75, "epochs": 12, "best_epoch": 7}]}
    page = table_html(cv_frame(cv))
    rows = re.findall(r"<tr>(.*?)</tr>", page)
    assert rows[1] == ('<td class="num">0</td><td class="num">1.0000</td><td class="num">1</td>'
                       '<td class="num">1</td>')  # a score stays a score, an epoch count an integer
    assert rows[3] == '<td>all</td><td class="num">1.0000</td><td></td><td></td>'


# ---------------------------------------------------------------- a member's facts


def test_member_facts_read_the_recorded_plan_before_the_settings(tmp_path):
    """A member whose config.json holds a plan: its data source, batch, steps, training and weights win
    over what the settings would give (they describe what ran); device and precision from "device"."""
    config = config_from_recipe(make_competition("toy"), tmp_path, tmp_path / "run", epochs=4,
                                batch_size=32).config.to_json()
    member = Run(tmp_path / "run").member("holdout")
    plan = {"source": {"kind": "files", "reason": "test"}, "batch_size": 12, "per_process_batch": 12,
            "steps_per_epoch": 5, "total_steps": 60, "epochs": 12, "training": "sgd", "weights": "hub",
            "adapted": ["epochs 4 -> 12: few steps"]}
    device = {"device_type": "cuda", "device_name": "NVIDIA H200", "amp_dtype": "bf16"}
    atomic_write_json(member.config_path, {"config": config, "device": device, "plan": plan})
    facts = member_facts(member)
    assert {k: facts[k] for k in ("data", "batch_size", "steps_per_epoch", "epochs", "weights", "adapted",
                                  "device", "precision", "optimizer")} == {
        "data": "files", "batch_size": 12, "steps_per_epoch": 5, "epochs": 12, "weights": "hub",
        "adapted": ["epochs 4 -> 12: few steps"], "device": "cuda (NVIDIA H200)", "precision": "bf16",
        "optimizer": config["optimizer"]}
    atomic_write_json(member.config_path, {"config": config})  # a run from before plans: its settings
    older = member_facts(member)
    assert (older["data"], older["batch_size"], older["epochs"], older["weights"]) == ("image_cache", 32, 4, "none")


def test_settings_that_differ_are_shown_per_member():
    a = {"member": "fold0", "model": "m", "fit": "logreg: C 1", "epochs": 1, "epochs_run": 1, "absent_classes": []}
    b = {"member": "fold1", "model": "m", "fit": "logreg: C 10", "epochs": 1, "epochs_run": 1,
         "absent_classes": ["cow"]}
    shared, differing = split_facts([a, b])
    assert shared == {"model": "m", "epochs": 1}  # epochs run = epochs: said once
    assert differing.to_dict("records") == [
        {"member": "fold0", "head fit": "logreg: C 1", "classes absent from training": 0},
        {"member": "fold1", "head fit": "logreg: C 10", "classes absent from training": 1}]
    stored = TrainConfig(competition="x", work_dir=".", run_dir=".", model="m").to_json()
    assert weights_of({**stored, "weights": "/w/a.safetensors"}) == "file: /w/a.safetensors"
    assert weights_of({**stored, "pretrained": True}) == "hub" and weights_of(stored) == "none"
