"""Test-time views (issue 23 point 1): named view lists, a test side above the training one (FixRes), multiscale,
and the rule that the out-of-fold scores and the submission see the same views."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import timm
import torch

from conftest import config_from_recipe
from test_backbone_once import counting
from pipeline.config import TrainConfig
from pipeline.errors import tta_views
from pipeline.data import views as data_views
from pipeline.data.items import build_transform, fold_split, list_split, load_reorg, read_image
from pipeline.errors import PipelineError
from pipeline.models.views import OPS, first_view_share, image_views
from pipeline.predict import stage as predict_stage
from pipeline.predict.stage import load_member, predict
from pipeline.runs import Run
from pipeline.train import setup as train_setup
from pipeline.train.stage import train


# ---------------------------------------------------------------- names


def test_view_lists_parse_and_presets_expand():
    assert tta_views("none") == (("none", 1.0),)
    assert tta_views("flip") == (("none", 1.0), ("flip", 1.0))  # the preset: the image and its mirror
    assert tta_views("none,flip,rot90") == (("none", 1.0), ("flip", 1.0), ("rot90", 1.0))  # each view once
    assert tta_views("flip,scale1.15") == (("none", 1.0), ("flip", 1.0), ("none", 1.15))
    assert tta_views("flip+scale1.3, rot90") == (("flip", 1.3), ("rot90", 1.0))
    assert tta_views("multiscale") == (("none", 1.0), ("none", 1.15), ("none", 1.3))
    d4 = tta_views("d4")
    assert len(d4) == 8 and {s for _, s in d4} == {1.0}
    assert len(tta_views("d4,multiscale")) == 10
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).reshape(2, 3, 5, 5)
    assert len({v.numpy().tobytes() for v in image_views(x, "d4")}) == 8  # the eight symmetries, all distinct
    assert torch.equal(OPS["transpose"](x), x.transpose(2, 3))
    assert torch.equal(OPS["vflip"](x), torch.flip(x, dims=[2]))


def test_shift_views_move_the_image_a_32nd_of_its_side_with_a_mirrored_border():
    from pipeline.models.views import shifted

    assert [op for op, _ in tta_views("flipshift")] == ["none", "flip", "shiftul", "shiftdr", "flipshiftul",
                                                        "flipshiftdr"]
    x = torch.rand(2, 3, 64, 64)
    up_left, down_right = OPS["shiftul"](x), OPS["shiftdr"](x)
    assert up_left.shape == x.shape and torch.equal(up_left[..., :-2, :-2], x[..., 2:, 2:])  # 64 / 32 = 2 px
    assert torch.equal(down_right[..., 2:, 2:], x[..., :-2, :-2])
    assert torch.equal(down_right[..., 0, 2:], x[..., 2, :-2])  # the new top row mirrors the image's own rows
    assert torch.equal(OPS["flipshiftdr"](x), shifted(torch.flip(x, dims=[3]), 1))
    small = torch.rand(1, 3, 16, 16)  # below 32 px: one pixel
    assert torch.equal(OPS["shiftul"](small)[..., :-1, :-1], small[..., 1:, 1:])
    nhwc = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(OPS["shiftdr"](nhwc), down_right)


@pytest.mark.parametrize("bad", ["rot45", "flipscale1.1", "scale3", "scale", "+scale1.2", "", "flip,mirror"])
def test_unknown_views_are_refused_with_the_valid_names(bad):
    with pytest.raises(PipelineError) as err:
        TrainConfig(model="fastnet_s", tta=bad)
    message = str(err.value)
    assert "\n" not in message and "unknown view" in message
    assert all(name in message for name in ("d4", "multiscale", "rot90", "transverse", "scaleF"))
    with pytest.raises(PipelineError, match="--test-size"):
        TrainConfig(model="fastnet_s", test_size="big")


def test_views_needing_two_scales_refuse_a_batch_of_one():
    with pytest.raises(ValueError, match="2 scale"):
        image_views(torch.zeros(1, 3, 8, 8), "flip,scale1.5")


# ---------------------------------------------------------------- test size


def test_auto_reads_test_input_size_and_crop_from_the_pretrained_config():
    lite0 = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=2).pretrained_cfg
    assert lite0.get("test_input_size") is None  # Lite0's weights give none: auto is the training side
    assert data_views.test_geometry("auto", 224, lite0) == (224, 0.875)
    made_up = {"input_size": (3, 224, 224), "test_input_size": (3, 288, 288), "crop_pct": 0.95, "test_crop_pct": 1.0}
    assert data_views.test_geometry("auto", 224, made_up) == (288, 1.0)
    assert data_views.test_geometry("auto", 112, made_up) == (144, 1.0)  # the ratio at another training side
    assert data_views.test_geometry("auto", 224, {**made_up, "test_crop_pct": None}) == (288, 0.95)
    assert data_views.test_geometry("train", 224, made_up) == (224, None)
    assert data_views.test_geometry("300", 224, made_up) == (300, None)
    assert data_views.test_geometry("auto", 224, None) == (224, None)  # no weights: the training side


def test_auto_sets_the_evaluation_transform_of_timm_weights(tmp_path, monkeypatch):
    made_up = {"input_size": (3, 32, 32), "test_input_size": (3, 40, 40), "crop_pct": 0.8, "test_crop_pct": 1.0}
    monkeypatch.setattr(data_views, "weights_test_config", lambda name: made_up)
    cfg = TrainConfig(model="timm:tf_efficientnet_lite0", weights=tmp_path / "w.safetensors", image_size=32,
                      augment="resized_crop_flip_jitter", test_size="auto", tta="flip")
    assert data_views.eval_geometry(cfg) == (40, 1.0)
    image = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    transform, side = data_views.eval_transform(cfg, cfg.tta)
    out = transform(image=image)["image"]
    assert side == 40 and out.shape == (3, 40, 40)
    # crop 1.0: the short side resized to 40 and centre-cropped, not 40 / 0.875 = 46 cropped to 40
    expected = build_transform(cfg.augment, 40, cfg.mean, cfg.std, train=False, crop_pct=1.0)(image=image)["image"]
    default = build_transform(cfg.augment, 40, cfg.mean, cfg.std, train=False)(image=image)["image"]
    assert torch.equal(out, expected) and not torch.allclose(out, default)
    untrained = dataclasses.replace(cfg, weights=None)  # no pretrained weights: no test_input_size to read
    assert data_views.eval_geometry(untrained) == (32, None)
    real = dataclasses.replace(cfg, image_size=224)
    monkeypatch.undo()
    assert data_views.eval_geometry(real) == (224, None)  # Lite0's real config: the training evaluation


# ---------------------------------------------------------------- what the network sees


def recording(build, seen: list[tuple[bool, int]]):
    """model_from_config whose network records (training?, input side) of every forward."""
    def make(cfg, num_classes, **kw):
        model = build(cfg, num_classes, **kw)
        model.register_forward_pre_hook(lambda module, args: seen.append((module.training, args[0].shape[-1])))
        return model
    return make


@pytest.mark.parametrize("cache", ["auto", "off"])  # the image cache (validation then reads files) and files
def test_test_size_and_multiscale_change_what_the_net_sees_in_evaluation_only(toy_work, tmp_path, monkeypatch, cache):
    comp, work = toy_work  # 16-px images, fastnet_s
    seen: list[tuple[bool, int]] = []
    monkeypatch.setattr(train_setup, "model_from_config", recording(train_setup.model_from_config, seen))
    monkeypatch.setattr(predict_stage, "model_from_config", recording(predict_stage.model_from_config, seen))
    run = tmp_path / "run"
    train(config_from_recipe(comp, work, run, tta="multiscale", test_size="20", cache=cache, epochs=1, num_workers=0,
                             batch_size=8, device="cpu"))
    assert {side for training, side in seen if training} == {16}  # training: the training side only
    assert {side for training, side in seen if not training} == {20, 23, 26}  # 20 x (1, 1.15, 1.3)
    assert "views      3 (multiscale) at sides 20, 23, 26 (training 16, --test-size 20)" in \
        (run / "summary.txt").read_text()  # the run's summary says so
    seen.clear()
    predict(comp, work, run, tmp_path / "sub.csv", device="cpu")
    assert {side for _, side in seen} == {20, 23, 26}


# ---------------------------------------------------------------- the cache of a frozen backbone's views
# (counting: tests/test_backbone_once.py's model builder whose first convolution counts the images it sees)


def test_the_view_feature_cache_key_follows_the_views_and_the_test_size(toy_work, tmp_path, monkeypatch):
    comp, work = toy_work  # 36 labelled images in 3 folds
    seen: list[int] = []
    monkeypatch.setattr(train_setup, "model_from_config", counting(train_setup.model_from_config, seen))
    monkeypatch.setattr(predict_stage, "model_from_config", counting(predict_stage.model_from_config, seen))

    def run(name: str, **flags) -> int:
        before = len(seen) and sum(seen)
        train(config_from_recipe(comp, work, tmp_path / name, freeze_backbone=True, feature_views=0, folds=3,
                                 epochs=1, batch_size=8, device="cpu", num_workers=0, **flags))
        return sum(seen) - before

    assert run("flip", tta="flip") == 36 + 36 * 2  # the training features, then both views of every image once
    assert run("flip-again", tta="none,flip") == 0  # the same views: both caches read
    assert run("rot90", tta="none,rot90") == 36 * 2  # other views: computed afresh
    assert run("flip-20", tta="flip", test_size="20") == 36 * 2  # another test side: computed afresh
    member = Run(tmp_path / "flip").finished("folds")[0]
    _, valid = fold_split(work, load_reorg(work), member.fold)
    before = sum(seen)
    predict_stage.predict_items([member], valid, tta="none,vflip", device="cpu", num_workers=0)
    assert sum(seen) - before == len(valid) * 2  # only the rows asked for (a holdout's validation images)
    assert run("vflip", tta="none,vflip") == (36 - len(valid)) * 2  # then the rest, once
    oof = {name: pd.read_csv(tmp_path / name / "oof.csv", dtype={"id": str}).set_index("id").sort_index()
           for name in ("flip", "flip-again", "rot90")}
    assert np.allclose(oof["flip"].iloc[:, 1:], oof["flip-again"].iloc[:, 1:])
    assert np.abs(oof["flip"].iloc[:, 1:].to_numpy() - oof["rot90"].iloc[:, 1:].to_numpy()).max() > 0  # other views
    info = load_reorg(work)
    at_20 = pd.read_csv(tmp_path / "flip-20" / "oof.csv", dtype={"id": str}).set_index("id")
    for member in Run(tmp_path / "flip-20").finished("folds"):  # the cached view features are the views at 20 px
        lm = load_member(member, torch.device("cpu"))
        _, valid = fold_split(work, info, member.fold)
        np.testing.assert_allclose(at_20.loc[[it.id for it in valid], info["classes"]].to_numpy(),
                                   by_hand(lm.model, lm.config, valid, "flip", 20), atol=1e-5)


# ---------------------------------------------------------------- the CV scores what is submitted


def by_hand(model: torch.nn.Module, cfg: TrainConfig, items, tta: str, side: int) -> np.ndarray:
    """Each image decoded, resized to each view's side through the evaluation preset, the view's operation, the
    softmax, averaged: the views computed without the loader or pipeline/models/views.py's batching."""
    images = [read_image(it.path) for it in items]
    probs = []
    for op, scale in tta_views(tta):
        transform = build_transform(cfg.augment, int(round(side * scale)), cfg.mean, cfg.std, train=False)
        x = torch.stack([transform(image=image)["image"] for image in images])
        with torch.no_grad():
            probs.append(torch.softmax(model(OPS[op](x)), dim=1))
    p = torch.stack(probs).mean(0).double()
    return (p / p.sum(1, keepdim=True)).numpy()


def test_out_of_fold_and_submission_see_the_same_views(toy_work, tmp_path):
    comp, work = toy_work
    run_dir, tta = tmp_path / "run", "flip,rot90+scale1.25"
    train(config_from_recipe(comp, work, run_dir, tta=tta, test_size="20", folds=3, epochs=1, batch_size=8,
                             device="cpu", cache="off", num_workers=0))
    run, info = Run(run_dir), load_reorg(work)
    oof = pd.read_csv(run_dir / "oof.csv", dtype={"id": str}).set_index("id")
    cv = json.loads((run_dir / "cv.json").read_text())
    assert (cv["tta"], cv["test_side"]) == (tta, 20)  # the CV says which views and side it scored
    members = [load_member(m, torch.device("cpu")) for m in run.finished("folds")]
    for lm in members:  # each fold's out-of-fold rows: its member over those images with the run's views
        _, valid = fold_split(work, info, lm.member.fold)
        np.testing.assert_allclose(oof.loc[[it.id for it in valid], info["classes"]].to_numpy(),
                                   by_hand(lm.model, lm.config, valid, tta, 20), atol=1e-5)
    result = predict(comp, work, run_dir, tmp_path / "sub.csv", device="cpu")
    assert result.tta == tta and 0 < result.view_seconds < result.seconds  # predict says what the views cost
    test = list_split(work, info, "test")
    submitted = predict_stage.predict_items(run.finished("folds"), test, tta=tta, device="cpu")[1]
    mean = sum(by_hand(lm.model, lm.config, test, tta, 20) for lm in members) / len(members)
    np.testing.assert_allclose(submitted, mean, atol=1e-5)


def test_the_cost_of_the_views_follows_their_pixels():
    assert first_view_share("multiscale") == pytest.approx(1 / (1 + 1.15 ** 2 + 1.3 ** 2))
    assert first_view_share("d4") == pytest.approx(1 / 8) and first_view_share("none") == 1
