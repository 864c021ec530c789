"""One config schema: recipes as overlays, resolution with sources, --dry-run, resume rules."""
from __future__ import annotations

import dataclasses
import json

import pytest
from typer.testing import CliRunner

from conftest import make_competition, write_raw
from pipeline.cli.app import app
from pipeline.competition import Recipe
from pipeline.config import TrainConfig, resolve_config, resumed_config
from pipeline.errors import PipelineError
from pipeline.download.reorg import reorg

WEIGHTS_CFG = {"image_size": 224, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}


def fake_weights(model: str) -> dict:
    return dict(WEIGHTS_CFG)


@pytest.fixture
def dogs():
    """A competition whose default recipe is transfer learning (frozen backbone, mlp head, download)."""
    return make_competition("dogs", submission="probs", recipe=Recipe(
        model="resnet34", pretrained=True, freeze_backbone=True, head="mlp", epochs=20, lr=0.03),
        recipes={"long": Recipe(epochs=40, lr=0.01)})


def test_layers_and_sources(dogs):
    r = resolve_config(dogs, "w", "r", "long", {"lr": 0.05, "epochs": None}, weights_config=fake_weights)
    cfg, src = r.config, r.sources
    assert (cfg.epochs, src["epochs"]) == (40, "recipe long")  # the named recipe over the competition's
    assert (cfg.lr, src["lr"]) == (0.05, "flag")  # a flag over both
    assert (cfg.model, src["model"]) == ("resnet34", "competition")
    assert (cfg.image_size, src["image_size"]) == (224, "weights")  # the download's data config
    assert (cfg.momentum, src.get("momentum", "default")) == (0.9, "default")
    assert "epochs" in r.table() and "recipe long" in r.table()


def test_model_override_keeps_the_recipes_transfer_choices(dogs):
    r = resolve_config(dogs, "w", "r", None, {"model": "timm:tf_efficientnet_lite0", "weights": "x.safetensors"},
                       weights_config=fake_weights)
    cfg = r.config
    assert (cfg.freeze_backbone, cfg.head) == (True, "mlp")
    assert cfg.pretrained is False and str(cfg.weights) == "x.safetensors"
    assert any("replaces the recipe's download" in n for n in r.notes)


def test_flags_win_over_the_weights_data_config(dogs):
    r = resolve_config(dogs, "w", "r", None, {"image_size": 64}, weights_config=fake_weights)
    assert (r.config.image_size, r.sources["image_size"], r.config.mean) == (64, "flag", (0.5, 0.5, 0.5))


def test_recipe_is_a_checked_partial_overlay():
    assert dict(Recipe(lr=0.1)) == {"lr": 0.1}
    with pytest.raises(PipelineError, match="recipe setting.*lrr unknown; valid: .*lr"):
        Recipe(lrr=0.1)
    with pytest.raises(PipelineError, match="^optimizer 'lion' is not one of"):  # the name a recipe writes
        Recipe(optimizer="lion")


def test_resume_moves_only_movable_settings(tmp_path):
    saved = TrainConfig(competition="c", work_dir=tmp_path / "old", run_dir=tmp_path / "old", model="m", epochs=5)
    moved = resumed_config(saved, {"epochs": 8, "num_workers": 2, "lr": None}, tmp_path / "w", tmp_path / "r")
    assert (moved.epochs, moved.num_workers, moved.lr) == (8, 2, saved.lr)
    assert moved.run_dir == tmp_path / "r"  # never the folder a config file names
    assert resumed_config(saved, {"lr": saved.lr}, "w", "r").lr == saved.lr  # the same value is no change
    with pytest.raises(PipelineError, match="--lr 0.5 differs from the run's 0.1; a resumed run keeps its settings"):
        resumed_config(saved, {"lr": 0.5}, "w", "r")
    with pytest.raises(PipelineError, match="--lr-period"):
        resumed_config(saved, {"lr_period_epochs": 3}, "w", "r")


def test_every_setting_has_help_and_a_valid_default():
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("help"), f.name
        if f.metadata.get("choices") and f.default is not dataclasses.MISSING:
            assert f.default in f.metadata["choices"], f.name


def test_dry_run_prints_the_sources_and_writes_nothing(tmp_path):
    comp = make_competition("toy")
    raw = write_raw(tmp_path / "raw", comp)
    reorg(comp, raw, tmp_path / "work", folds=0)
    result = CliRunner().invoke(app, ["train", "toy", str(tmp_path / "work"), str(tmp_path / "run"),
                                      "--epochs", "3", "--dry-run"])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.strip()}
    assert lines["epochs"][1:] == ["3", "flag"]
    assert lines["model"][1:] == ['"fastnet_s"', "competition"]
    assert lines["optimizer"][1:] == ['"sgd"', "default"]
    assert not (tmp_path / "run").exists()
    # 27 training images: the recipe's batch 16 gives 1 step per epoch; the plan shown is the adapted one
    result = CliRunner().invoke(app, ["train", "toy", str(tmp_path / "work"), str(tmp_path / "run"), "--dry-run"])
    lines = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.strip()}
    assert lines["batch_size"][1:] == ["8", "adapted"] and lines["epochs"][2] == "adapted"
    assert "note: batch_size 16 -> 8" in result.stdout


def test_recipes_command_lists_named_recipes():
    result = CliRunner().invoke(app, ["recipes", "cifar-10"])
    assert result.exit_code == 0, result.output
    names = [line.split()[0] for line in result.stdout.splitlines()[1:]]
    assert names == ["default", "fast", "resnet18"]
    assert "model=fastnet" in result.stdout


def test_resume_refuses_a_changed_setting_through_the_cli(tmp_path):
    comp = make_competition("toy")
    raw = write_raw(tmp_path / "raw", comp)
    reorg(comp, raw, tmp_path / "work", folds=0)
    run = tmp_path / "run"
    args = ["train", "toy", str(tmp_path / "work"), str(run), "--epochs", "1", "--batch-size", "8", "--device", "cpu"]
    assert CliRunner().invoke(app, args).exit_code == 0
    before = json.loads((run / "config.json").read_text())
    refused = CliRunner().invoke(app, [*args, "--resume", "--lr", "0.7"])
    assert refused.exit_code == 1 and "--lr 0.7 differs from the run's 0.3" in refused.output
    assert json.loads((run / "config.json").read_text()) == before
