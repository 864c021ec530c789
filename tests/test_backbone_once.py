"""A frozen backbone runs once per image and view: the out-of-fold scores read the feature cache."""
from __future__ import annotations

import pandas as pd
import torch

from conftest import config_from_recipe
from pipeline.config import load_resolved
from pipeline.data.items import load_reorg
from pipeline.predict import stage as predict_stage
from pipeline.predict.cv import out_of_fold
from pipeline.runs import Run
from pipeline.predict.stage import predict
from pipeline.train import setup as train_setup
from pipeline.train.stage import train


def counting(build, seen: list[int]):
    """model_from_config whose first convolution counts the images it sees."""
    def make(cfg, num_classes, **kw):
        model = build(cfg, num_classes, **kw)
        first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        first.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
        return model
    return make


def test_a_frozen_three_fold_run_and_its_predict_run_the_backbone_once_per_image(toy_work, tmp_path, monkeypatch):
    comp, work = toy_work  # 36 labelled images in 3 folds, 10 test images
    seen: list[int] = []
    monkeypatch.setattr(train_setup, "model_from_config", counting(train_setup.model_from_config, seen))
    monkeypatch.setattr(predict_stage, "model_from_config", counting(predict_stage.model_from_config, seen))
    run = tmp_path / "run"
    train(config_from_recipe(comp, work, run, freeze_backbone=True, feature_views=0, folds=3, epochs=1,
                             batch_size=8, device="cpu"))
    assert sum(seen) == 36  # the cache: every labelled image once; the folds' scores read it
    oof = pd.read_csv(run / "oof.csv")
    assert len(oof) == 36 and set(oof["id"].astype(str)) == {p.stem for p in (work / "train_valid").rglob("*.png")}
    predict(comp, work, run, tmp_path / "sub.csv", device="cpu")
    assert sum(seen) == 36 + 10  # and the test images once, for the three members together


def test_the_cached_out_of_fold_scores_equal_the_backbones(toy_work, tmp_path, monkeypatch):
    """Reading the cache changes no score: the same members scored with the backbone run afresh."""
    comp, work = toy_work
    run = tmp_path / "run"
    train(config_from_recipe(comp, work, run, freeze_backbone=True, feature_views=0, folds=3, epochs=1,
                             batch_size=8, device="cpu"))
    cached = pd.read_csv(run / "oof.csv", dtype={"id": str})
    monkeypatch.setattr(predict_stage, "cached_views", lambda *a, **kw: None)
    cfg, _ = load_resolved(Run(run).config_path)
    fresh, _ = out_of_fold(cfg, comp, load_reorg(work), Run(run).finished("folds"), "best")
    merged = cached.merge(fresh, on="id", suffixes=("", "_fresh"))
    classes = [c for c in cached.columns if c not in ("id", "label")]
    assert len(merged) == 36
    for c in classes:
        assert (merged[c] - merged[f"{c}_fresh"]).abs().max() < 1e-5
