"""The three stages on real Kaggle-layout data from ../shared, and the demo."""
from __future__ import annotations

import pandas as pd
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
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
       "--freeze-backbone", "--image-size", "64", "--epochs", "1", "--batch-size", "32", "--device", "cpu")
    ok("predict", "dog-breed-identification", work, run, sub)
    frame = pd.read_csv(sub, dtype={"id": str})
    sample = pd.read_csv(raw / "sample_submission.csv", dtype={"id": str})
    assert frame.shape == (300, 121)
    assert list(frame.columns) == list(sample.columns)  # all 120 breeds, in the sample's order
    assert frame["id"].tolist() == sample["id"].tolist()
    probs = frame.iloc[:, 1:].to_numpy()
    assert (abs(probs.sum(axis=1) - 1) < 1e-6).all() and probs.min() > 0
    import json

    config = json.loads((run / "config.json").read_text())
    assert config["mean"] == [0.5, 0.5, 0.5] and config["image_size"] == 64  # the weights' normalisation


@pytest.mark.slow
def test_digits_demo_reaches_90_percent(tmp_path):
    raw, work, run, sub = tmp_path / "raw", tmp_path / "work", tmp_path / "run", tmp_path / "sub.csv"
    ok("download", "digits", raw)
    ok("reorg", "digits", raw, work)
    out = ok("train", "digits", work, run, "--device", "cpu")
    ok("predict", "digits", work, run, sub)
    metrics = pd.read_csv(run / "metrics.csv")
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
    metrics = pd.read_csv(run / "metrics.csv")
    assert metrics["steps"].tolist() == [1] and metrics["valid_accuracy"].between(0, 1).all()
