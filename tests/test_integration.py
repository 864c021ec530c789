"""The three stages on real Kaggle-layout data from ../shared, and the demo."""
from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from pipeline.cli.app import app
from tests.conftest import SHARED, requires_shared, tree_hash

runner = CliRunner()
WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0.mlillustrated_in1k.safetensors"


def ok(*args) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.slow
@requires_shared
def test_cifar10_tiny_chain(tmp_path):
    raw = SHARED / "data" / "cifar-10-tiny"
    before = tree_hash(raw)
    work, run, sub = tmp_path / "work", tmp_path / "run", tmp_path / "sub.csv"
    ok("reorg", "cifar-10", raw, work)
    ok("train", "cifar-10", work, run, "--epochs", "1", "--steps-per-epoch", "3", "--batch-size", "16", "--device", "cpu")
    ok("predict", "cifar-10", work, run, sub)
    frame = pd.read_csv(sub, dtype=str)
    sample = pd.read_csv(raw / "sampleSubmission.csv", dtype=str)
    assert list(frame.columns) == ["id", "label"] and len(frame) == 100
    assert frame["id"].tolist() == sample["id"].tolist()
    assert set(frame["label"]) <= {"airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"}
    assert tree_hash(raw) == before


@pytest.mark.slow
@requires_shared
def test_dog_breed_chain_with_offline_weights_and_frozen_backbone(tmp_path):
    raw = SHARED / "data" / "dog-breed-identification"
    work, run, sub = tmp_path / "work", tmp_path / "run", tmp_path / "sub.csv"
    ok("reorg", "dog-breed-identification", raw, work)
    ok("train", "dog-breed-identification", work, run, "--model", "timm:tf_efficientnet_lite0", "--weights", WEIGHTS,
       "--image-size", "64", "--epochs", "1", "--batch-size", "32", "--device", "cpu")
    ok("predict", "dog-breed-identification", work, run, sub)
    frame = pd.read_csv(sub, dtype={"id": str})
    sample = pd.read_csv(raw / "sample_submission.csv", dtype={"id": str})
    assert frame.shape == (300, 121)
    assert list(frame.columns) == list(sample.columns)  # all 120 breeds, in the sample's order
    assert frame["id"].tolist() == sample["id"].tolist()
    probs = frame.iloc[:, 1:].to_numpy()
    assert (abs(probs.sum(axis=1) - 1) < 1e-6).all() and probs.min() > 0
    doc = json.loads((run / "config.json").read_text())
    config, sources = doc["config"], doc["sources"]
    assert config["mean"] == [0.5, 0.5, 0.5] and config["image_size"] == 64  # the weights' normalisation
    assert (sources["mean"], sources["image_size"]) == ("weights", "flag")
    # overriding --model keeps the recipe's transfer choices: frozen backbone, MLP head
    assert (config["freeze_backbone"], config["head"], sources["head"]) == (True, "logreg", "competition")


@pytest.mark.slow
def test_digits_demo_reaches_90_percent(tmp_path):
    raw, work, run, sub = tmp_path / "raw", tmp_path / "work", tmp_path / "run", tmp_path / "sub.csv"
    ok("download", "digits", raw)
    ok("reorg", "digits", raw, work)
    out = ok("train", "digits", work, run, "--device", "cpu")
    ok("predict", "digits", work, run, sub)
    metrics = pd.read_csv(run / "holdout" / "metrics.csv")
    assert metrics["valid_accuracy"].max() >= 0.9, out
    assert len(pd.read_csv(sub)) == 300


@pytest.fixture(scope="module")
def cifar_tiny_work(tmp_path_factory):
    work = tmp_path_factory.mktemp("cifar") / "work"
    ok("reorg", "cifar-10", SHARED / "data" / "cifar-10-tiny", work, "--folds", "0")
    return work


def _registered_models():
    from pipeline.models import list_models

    return list_models()


@pytest.mark.slow
@requires_shared
@pytest.mark.parametrize("model", _registered_models())
def test_every_registered_model_trains_on_cifar10_tiny(cifar_tiny_work, tmp_path, model):
    run = tmp_path / "run"
    # Bottleneck ResNets see 1x1 maps in layer4 at 32 px: clip so one step at lr 0.1 cannot diverge
    ok("train", "cifar-10", cifar_tiny_work, run, "--model", model, "--epochs", "1", "--steps-per-epoch", "1",
       "--batch-size", "8", "--clip-grad", "1", "--device", "cpu")
    metrics = pd.read_csv(run / "holdout" / "metrics.csv")
    assert metrics["steps"].tolist() == [1] and metrics["valid_accuracy"].between(0, 1).all()


FOLD_RUNS = {
    "cifar-10": ("cifar-10-tiny", ["--model", "fastnet_s", "--batch-size", "64"]),
    "dog-breed-identification": ("dog-breed-identification",
                                 ["--model", "timm:tf_efficientnet_lite0", "--weights", str(WEIGHTS),
                                  "--freeze-backbone", "--image-size", "64", "--batch-size", "32"]),
}


@pytest.mark.slow
@requires_shared
@pytest.mark.parametrize("slug", sorted(FOLD_RUNS))
def test_three_folds_oof_cv_and_a_flip_tta_ensemble_submission(slug, tmp_path):
    import numpy as np
    from sklearn.metrics import accuracy_score, log_loss

    folder, args = FOLD_RUNS[slug]
    raw = SHARED / "data" / folder
    work, run, subs = tmp_path / "work", tmp_path / "run", tmp_path / "submissions"
    ok("reorg", slug, raw, work, "--folds", "3")
    ok("train", slug, work, run, "--folds", "3", "--epochs", "1", "--device", "cpu", "--tta", "flip", *args)
    assert all((run / f"fold{k}" / "best.pt").is_file() for k in range(3))
    oof = pd.read_csv(run / "oof.csv", dtype={"id": str})
    labels = pd.read_csv(work / "folds.csv", dtype={"id": str})
    assert oof["id"].is_unique and set(oof["id"]) == set(labels["id"])
    classes = json.loads((work / "reorg.json").read_text())["classes"]
    truth = oof["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    probs = oof[classes].to_numpy()
    cv = json.loads((run / "cv.json").read_text())
    assert cv["overall"]["accuracy"] == pytest.approx(accuracy_score(truth, probs.argmax(1)))
    assert cv["overall"]["log_loss"] == pytest.approx(log_loss(truth, probs, labels=np.arange(len(classes))))
    sub = subs / f"{slug}.csv"
    ok("predict", slug, work, run, sub, "--tta", "flip")
    ok("check", slug, sub, "--work-dir", work)
    index = pd.read_csv(subs / "index.csv")
    assert index["file"].tolist() == [f"{slug}.csv"] and index["members"].iloc[0] == "fold0;fold1;fold2"
    assert index["cv_score"].iloc[0] == pytest.approx(cv["cv"], abs=1e-4)  # the index keeps 4 decimals


@pytest.mark.slow
@requires_shared
def test_feature_cache_matches_the_uncached_path(tmp_path):
    """Frozen backbone, no augmentation: cached features give the same head, hence the same scores."""
    work = tmp_path / "work"
    ok("reorg", "dog-breed-identification", SHARED / "data" / "dog-breed-identification", work, "--folds", "0")
    common = ["--model", "timm:tf_efficientnet_lite0", "--weights", WEIGHTS, "--freeze-backbone", "--head", "linear",
              "--image-size", "48",
              "--epochs", "2", "--batch-size", "32", "--augment", "none", "--lr", "0.01", "--device", "cpu"]
    ok("train", "dog-breed-identification", work, tmp_path / "cached", *common)
    ok("train", "dog-breed-identification", work, tmp_path / "plain", *common, "--no-feature-cache")
    cached, plain = (pd.read_csv(tmp_path / n / "holdout" / "metrics.csv") for n in ("cached", "plain"))
    assert cached["valid_log_loss"].to_numpy() == pytest.approx(plain["valid_log_loss"].to_numpy(), rel=1e-4)
    assert list((work / "cache").glob("features-*.pt"))  # computed once, kept for the next run


@pytest.mark.slow
@requires_shared
def test_fast_recipe_with_a_whitened_stem_runs_through_the_cli(cifar_tiny_work, tmp_path):
    run = tmp_path / "run"
    ok("train", "cifar-10", cifar_tiny_work, run, "--recipe", "fast", "--epochs", "2", "--batch-size", "64",
       "--device", "cpu")
    config = json.loads((run / "config.json").read_text())["config"]
    assert (config["model"], config["data_init"], config["tta"], config["label_smoothing"]) == ("fastnet", True, "flip", 0.2)
    metrics = pd.read_csv(run / "holdout" / "metrics.csv")
    assert metrics["steps"].tolist() == [900 // 64] * 2 and metrics["valid_accuracy"].max() > 0.1
