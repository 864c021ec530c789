"""predict-image, submit, the submission index and the report's figures."""
from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli.app import app
from conftest import config_from_recipe
from pipeline.config import resolve_config
from pipeline.data.items import list_split, load_reorg
from pipeline.report.build import validation_predictions
from pipeline.report.figures import confusion_counts, confusion_figure, image_grid, top_k
from pipeline.report.training_figures import learning_curves_figure
from pipeline.download.reorg import reorg
from pipeline.models import create_model
from pipeline.predict.submission_index import COLUMNS, record_submission, run_summary
from pipeline.train.stage import train
from tests.conftest import make_competition, write_raw

runner = CliRunner()
CLASSES = ["cat", "dog", "frog"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The toy download reorganised, a 4-epoch holdout run and a 3-fold 2-epoch run (~10 s)."""
    root = tmp_path_factory.mktemp("runs")
    comp = make_competition("toy")
    raw = write_raw(root / "raw", comp)
    work = root / "work"
    reorg(comp, raw, work, valid_ratio=0.25, folds=3)
    train(config_from_recipe(comp, work, root / "holdout", epochs=4, batch_size=8, device="cpu"))
    train(config_from_recipe(comp, work, root / "folds", epochs=2, batch_size=8, device="cpu", folds=3))
    return SimpleNamespace(comp=comp, work=work, holdout=root / "holdout", folds=root / "folds")


def printed_ranking(stdout: str) -> dict[str, list[tuple[str, float]]]:
    """{file: [(class, probability), ...]} from predict-image's output."""
    ranking, current = {}, None
    for line in stdout.splitlines():
        if line.startswith("  "):
            name, p = line.split()
            ranking[current].append((name, float(p)))
        elif line.strip():
            current = line.strip()
            ranking[current] = []
    return ranking


def assert_png(path: Path, min_side: int = 200) -> tuple[int, int]:
    with Image.open(path) as img:
        assert img.format == "PNG" and img.mode in ("RGB", "RGBA")
        assert min(img.size) >= min_side and max(img.size) <= 4000, img.size
        return img.size


# ---------------------------------------------------------------- predict-image


def test_predict_image_ranks_the_trained_colour_first(runs):
    images = [sorted((runs.work / "valid" / c).iterdir())[0] for c in CLASSES]
    result = invoke("predict-image", runs.holdout, *images, "--top-k", "3")
    assert result.exit_code == 0, result.output
    ranking = printed_ranking(result.stdout)
    assert list(ranking) == [str(p) for p in images]
    for path, true_class in zip(images, CLASSES):
        probs = [p for _, p in ranking[str(path)]]
        assert probs == sorted(probs, reverse=True)
        assert sum(probs) == pytest.approx(1.0, abs=2e-4)  # all three classes, each rounded to 4 places
        assert ranking[str(path)][0][0] == true_class


def test_predict_image_averages_folds_with_tta_and_plots(runs, tmp_path):
    image = sorted((runs.work / "valid" / "dog").iterdir())[0]
    plot = tmp_path / "pred.png"
    result = invoke("predict-image", runs.folds, image, "--top-k", "2", "--tta", "flip", "--plot", plot)
    assert result.exit_code == 0, result.output
    (ranked,) = printed_ranking(result.stdout.replace(f"{plot}: written", "")).values()
    assert len(ranked) == 2 and ranked[0][1] >= ranked[1][1] and 0 < ranked[0][1] <= 1
    assert assert_png(plot, min_side=100)


def test_predict_image_names_an_unreadable_file(runs, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    result = invoke("predict-image", runs.holdout, broken)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(broken) in lines[0] and "cannot read image" in lines[0]


def test_top_k_orders_and_truncates():
    assert top_k(np.array([0.2, 0.5, 0.3]), CLASSES, 2) == [("dog", 0.5), ("frog", 0.3)]


# ---------------------------------------------------------------- submit


@pytest.fixture
def fake_kaggle(monkeypatch):
    """A kaggle CLI that records its argument lists instead of uploading."""
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(list(cmd))
        return subprocess.CompletedProcess(cmd, 0, stdout="Successfully submitted to toy\n", stderr="")

    monkeypatch.setattr("pipeline.download.kaggle.shutil.which", lambda name: "/opt/bin/kaggle")
    monkeypatch.setattr("pipeline.download.kaggle.subprocess.run", fake_run)
    return calls


def test_submit_checks_then_uploads_with_the_exact_arguments(toy, fake_kaggle, monkeypatch):
    comp, raw = toy
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "not-a-real-key")
    csv = raw / comp.sample_submission
    result = invoke("submit", comp.slug, csv, "-m", "fastnet_s, 3 folds", "--sample", csv)
    assert result.exit_code == 0, result.output
    assert fake_kaggle == [["/opt/bin/kaggle", "competitions", "submit", "-c", "toy", "-f", str(csv),
                            "-m", "fastnet_s, 3 folds"]]
    assert "valid (10 rows" in result.stdout and "submitted to toy" in result.stdout


def test_submit_refuses_an_invalid_file_before_calling_kaggle(toy, fake_kaggle, monkeypatch, tmp_path):
    comp, raw = toy
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "not-a-real-key")
    sample = raw / comp.sample_submission
    bad = tmp_path / "bad.csv"
    pd.read_csv(sample, dtype=str).iloc[1:].to_csv(bad, index=False)
    result = invoke("submit", comp.slug, bad, "-m", "oops", "--sample", sample)
    assert result.exit_code == 1
    assert "id 't000' of the sample submission is missing" in result.stderr
    assert fake_kaggle == []


def test_submit_without_credentials_says_what_is_missing(toy, fake_kaggle, monkeypatch, tmp_path):
    comp, raw = toy
    empty = tmp_path / "home"
    empty.mkdir()
    monkeypatch.setenv("HOME", str(empty))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(empty))
    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    csv = raw / comp.sample_submission
    result = invoke("submit", comp.slug, csv, "-m", "first", "--sample", csv)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no Kaggle credentials found" in lines[0] and "kaggle.json" in lines[0]
    assert fake_kaggle == []


def test_submit_without_the_kaggle_cli_says_so(toy, monkeypatch):
    comp, raw = toy
    monkeypatch.setattr("pipeline.download.kaggle.shutil.which", lambda name: None)
    csv = raw / comp.sample_submission
    result = invoke("submit", comp.slug, csv, "-m", "first", "--sample", csv)
    assert result.exit_code == 1 and "the kaggle CLI is not installed" in result.stderr


# ---------------------------------------------------------------- submissions/index.csv


def test_index_only_ever_appends(tmp_path):
    index = tmp_path / "submissions" / "index.csv"
    record_submission(index, competition="toy", file="submissions/a.csv", run_dir="runs/r1", model="fastnet_s",
                      cv_score=0.91234567, members=["runs/r1/fold0", "runs/r1/fold1"], tta="flip")
    first = index.read_bytes()
    record_submission(index, competition="toy", file="submissions/b, final.csv", run_dir="runs/r2",
                      model="resnet18_cifar", cv_score=None, members=1, tta="none")
    lines = index.read_bytes().splitlines(keepends=True)
    assert len(lines) == 3 and index.read_bytes().startswith(first)
    assert lines[0].decode().strip() == ",".join(COLUMNS)
    frame = pd.read_csv(index, keep_default_na=False, na_values=[""], parse_dates=["time"])
    assert list(frame.columns) == list(COLUMNS) and len(frame) == 2
    assert frame["file"].tolist() == ["submissions/a.csv", "submissions/b, final.csv"]
    assert frame["cv_score"].iloc[0] == pytest.approx(0.912346) and np.isnan(frame["cv_score"].iloc[1])
    assert frame["members"].tolist() == ["runs/r1/fold0;runs/r1/fold1", "1"]
    assert frame["time"].notna().all() and str(frame["time"].dt.tz) == "UTC"


def test_run_summary_prefers_cv_then_the_best_holdout_score(runs, tmp_path):
    cv = json.loads((runs.folds / "cv.json").read_text())
    assert run_summary(runs.folds) == {"model": "fastnet_s", "cv_score": cv["cv"]}
    best = pd.read_csv(runs.holdout / "holdout" / "metrics.csv")["valid_accuracy"].max()
    assert run_summary(runs.holdout) == {"model": "fastnet_s", "cv_score": best}
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    shutil.copy(runs.holdout / "config.json", untrained / "config.json")
    assert run_summary(untrained) == {"model": "fastnet_s", "cv_score": ""}


# ---------------------------------------------------------------- report


def test_report_of_a_fold_run_writes_four_readable_pngs(runs, tmp_path):
    result = invoke("report", runs.folds, "--out", tmp_path / "report")
    assert result.exit_code == 0, result.output
    written = [Path(line) for line in result.stdout.split()]
    names = {"learning_curves.png", "confusion_matrix.png", "train_images.png", "most_wrong.png", "report.html"}
    assert {p.name for p in written} == names and all(p.parent == tmp_path / "report" for p in written)
    for path in written:
        if path.suffix == ".png":
            assert_png(path)


def test_report_of_a_holdout_run_predicts_its_valid_split(runs):
    info = load_reorg(runs.work)
    preds = validation_predictions(runs.holdout, runs.work, info, device="cpu")
    valid = list_split(runs.work, info, "valid")
    assert preds["id"].tolist() == [it.id for it in valid]
    assert np.allclose(preds[CLASSES].sum(axis=1), 1.0)
    result = invoke("report", runs.holdout)  # default --out: RUN_DIR/report
    assert result.exit_code == 0, result.output
    assert len(list((runs.holdout / "report").glob("*.png"))) == 4


def test_confusion_counts_sum_to_the_oof_rows(runs):
    oof = pd.read_csv(runs.folds / "oof.csv", dtype={"id": str})
    matrix = confusion_counts(oof, CLASSES)
    assert matrix.sum() == len(oof) == 36
    assert matrix.sum(axis=1).tolist() == oof["label"].value_counts()[CLASSES].tolist()
    accuracy = json.loads((runs.folds / "cv.json").read_text())["overall"]["accuracy"]
    assert np.trace(matrix) / len(oof) == pytest.approx(accuracy)


def hand_made_predictions() -> pd.DataFrame:
    return pd.DataFrame({
        "id": ["a", "b", "c", "d", "e"],
        "label": ["cat", "dog", "frog", "cat", "dog"],
        "cat": [0.9, 0.7, 0.1, 0.2, 0.3],
        "dog": [0.05, 0.2, 0.3, 0.75, 0.6],
        "frog": [0.05, 0.1, 0.6, 0.05, 0.1],
    })


def test_confusion_counts_of_a_hand_made_frame():
    matrix = confusion_counts(hand_made_predictions(), CLASSES)
    assert matrix.tolist() == [[1, 1, 0], [1, 1, 0], [0, 0, 1]]


def test_confusion_figure_writes_counts_only_for_few_classes():
    small = confusion_figure(np.array([[3, 1, 0], [0, 4, 0], [2, 0, 5]]), CLASSES)
    assert sorted(t.get_text() for t in small.axes[0].texts) == ["1", "2", "3", "4", "5"]
    many = [f"breed_{i}" for i in range(120)]
    big = confusion_figure(np.eye(120, dtype=int) * 7, many)
    ax = big.axes[0]
    assert len(ax.texts) == 0
    assert all(label.get_fontsize() <= 6 for label in ax.get_xticklabels())


def test_learning_curves_draw_one_line_per_member_and_kind():
    epochs = [1, 2, 3]
    member = pd.DataFrame({"epoch": epochs, "train_loss": [1.0, 0.6, 0.4], "valid_loss": [1.1, 0.8, 0.7],
                           "valid_accuracy": [0.4, 0.6, 0.7]})
    fig = learning_curves_figure({"fold0": member, "fold1": member})
    loss, accuracy = fig.axes
    assert len(loss.lines) == 4 and len(accuracy.lines) == 2
    full = learning_curves_figure({"full": member[["epoch", "train_loss"]]})
    assert len(full.axes) == 1 and len(full.axes[0].lines) == 1


def test_image_grid_says_when_there_is_nothing_to_show():
    fig = image_grid([], [], title="most confidently wrong", empty="every image is right")
    assert len(fig.axes) == 0 and "every image is right" in fig.texts[0].get_text()
    grid = image_grid([np.zeros((8, 8, 3), np.uint8)] * 4, ["a", "b", "c", "d"])
    assert [ax.get_title() for ax in grid.axes if ax.images] == ["a", "b", "c", "d"]


# ---------------------------------------------------------------- what each member ran


def settings_rows(page: str, section: str) -> dict[str, str]:
    """The th -> td rows of a key-value table of report.html, found by its section's id."""
    body = page.split(f'<section id="{section}">', 1)[1].split("</section>", 1)[0]
    return {html.unescape(k): html.unescape(v) for k, v in re.findall(r"<tr><th>(.*?)</th><td>(.*?)</td></tr>", body)}


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory):
    """A logistic-regression head on cached features from a weights file, a fine-tuned model (head on the
    frozen backbone, then everything) and plain SGD read from the files, each a holdout run on the toy data
    and its report (~20 s on a shared CPU)."""
    root = tmp_path_factory.mktemp("three")
    comp = make_competition("toy")
    work = root / "work"
    reorg(comp, write_raw(root / "raw", comp), work, valid_ratio=0.25, folds=3)
    weights = root / "fastnet_s.pt"
    torch.save(create_model("fastnet_s", 3).state_dict(), weights)

    def run(name: str, **flags) -> Path:
        flags = {"device": "cpu", "num_workers": 0, **flags}
        train(resolve_config(comp, work, root / name, None, flags, weights_config=lambda model: {}))
        result = invoke("report", root / name, "--out", root / name / "report", "--device", "cpu")
        assert result.exit_code == 0, result.output
        return root / name / "report"

    return SimpleNamespace(
        weights=weights,
        logreg=run("logreg", head="logreg", freeze_backbone=True, weights=weights),
        tuned=run("tuned", unfreeze_after=1, epochs=2, batch_size=8),
        sgd=run("sgd", epochs=3, optimizer="adamw", cache="off"))


@pytest.mark.parametrize("name, expected, curves", [
    ("logreg", {"epochs": "1", "optimizer": "fit", "training": "fit", "head": "logreg", "data": "features"}, False),
    ("tuned", {"epochs": "2", "optimizer": "sgd", "head": "linear", "data": "features, then image_cache",
               "weights": "none", "phases": "epoch 1: the head trained on the frozen backbone; epoch 2: the whole model"},
     True),
    ("sgd", {"epochs": "3", "optimizer": "adamw", "schedule": "cosine", "head": "linear", "data": "files",
             "weights": "none", "batch size": "8", "steps per epoch": "3"}, True),
])
def test_the_report_shows_what_each_member_ran(three_runs, name, expected, curves):
    folder = getattr(three_runs, name)
    page = (folder / "report.html").read_text(encoding="utf-8")
    ran = settings_rows(page, "settings")
    assert {k: ran.get(k) for k in expected} == expected
    assert ran["device"] == "cpu" and ran["precision"] == "fp32" and ran["training images"] == "27"
    assert (folder / "learning_curves.png").is_file() == curves  # a one-fit member has no curve to draw
    assert ("learning_curves.png" in page) == curves
    if name == "logreg":
        assert ran["weights"] == f"file: {three_runs.weights}"  # not "pretrained False"
        assert re.fullmatch(r"logreg: C [\d.]+ \(3-fold inner CV log loss by C: .+\)", ran["head fit"])
        assert "epochs 2 -> 1: --head logreg fits the head once" in ran["adapted to the data"]
        assert (folder / "head_fit.png").is_file() and "schedule" not in ran and "lr" not in ran
        assert "none: no member trained over several epochs" in settings_rows(page, "summary")["learning curves"]
    if name == "sgd":  # the recipe's batch of 16 adapted to 27 images; the --epochs flag kept
        assert ran["adapted to the data"].startswith("batch_size 16 -> 8: 27 training images make 1 step(s)")
        assert "epochs" not in ran["adapted to the data"]


def test_a_fitted_head_keeps_its_c_and_inner_cv_curve(three_runs):
    record = json.loads((three_runs.logreg.parent / "holdout" / "head_fit.json").read_text())
    assert record["head"] == "logreg" and record["rows"] == 27 and record["inner_folds"] == 3
    curve = {float(c): loss for c, loss in record["inner_cv_log_loss"].items()}
    assert set(curve) == {0.1, 1.0, 10.0} and record["C"] == min(curve, key=curve.get)
