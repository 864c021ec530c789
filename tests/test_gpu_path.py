"""The CUDA code path, exercised on CPU: every recipe of every competition with --channels-last --amp bf16.

On a GPU, channels_last and autocast are on by default; CI has none, so these
tests ask for them explicitly with ``--device cpu`` (honoured there), train one
step of each recipe on a tiny synthetic download in the competition's own
layout, holdout and two folds, feature cache on and off where the recipe
freezes its backbone, and check what each member recorded and what its model
was really fed. A transform that only fits 4-D image batches (channels_last)
applied to 2-D cached features then fails here, not on a user's GPU.
"""
from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import make_competition, write_raw
from pipeline.predict import stage as predict_module
from pipeline.train import stage as train_module
from pipeline.models.heads import FeatureHead
from pipeline.workdir import CACHE_DIR
from pipeline.cli.app import app
from pipeline.competition import _REGISTRY, Recipe, get_competition
from conftest import config_from_recipe
from pipeline.config import TrainConfig
from pipeline.data.items import list_split, load_reorg
from pipeline.data.loaders import FeatureViews
from pipeline.data.plan import eval_loader
from pipeline.distributed import plan_for
from pipeline.devices import X86
from pipeline.models.inference import infer, normalise_rows
from pipeline.models import create_model
from pipeline.predict.stage import load_member, predict_items
from pipeline.download.reorg import reorg
from pipeline.runs import DEVICE_KEY, Run
from pipeline.train.stage import train

FAST = ["--device", "cpu", "--channels-last", "--amp", "bf16", "--epochs", "1", "--steps-per-epoch", "1",
        "--image-size", "16", "--batch-size", "8"]


def _every_recipe() -> list:
    """(competition, recipe, extra flags) for each recipe; frozen backbones with the feature cache on and off."""
    cases = []
    for slug in ("cifar-10", "digits", "dog-breed-identification"):
        comp = _REGISTRY[slug]
        for name, recipe in [("default", comp.recipe), *sorted(comp.recipes.items())]:
            # a logreg head needs the feature cache: without it the recipe's frozen backbone trains a linear head
            files = ["--no-feature-cache", *(["--head", "linear"] if recipe.get("head") == "logreg" else [])]
            variants = [[], files] if recipe.get("freeze_backbone") else [[]]
            cases += [pytest.param(slug, name, v, id=f"{slug}-{name}{'-files' if v else ''}") for v in variants]
    return cases


CASES = _every_recipe()


@pytest.fixture(scope="module")
def works(tmp_path_factory) -> dict[str, Path]:
    """A reorganised synthetic download (two folds) per competition."""
    root = tmp_path_factory.mktemp("gpu-path")
    found = {}
    for slug in ("cifar-10", "digits", "dog-breed-identification"):
        comp = get_competition(slug)
        raw = write_raw(root / slug / "raw", comp, per_class=8, n_test=4, size=20)
        reorg(comp, raw, root / slug / "work", folds=2)
        found[slug] = root / slug / "work"
    return found


@pytest.fixture(scope="module")
def resnet34_weights(tmp_path_factory) -> Path:
    """ImageNet-shaped resnet34 weights on disk: the dog recipe's download, offline (random values)."""
    path = tmp_path_factory.mktemp("weights") / "resnet34.pth"
    torch.manual_seed(0)
    torch.save(create_model("resnet34", 1000).state_dict(), path)
    return path


@pytest.fixture
def fed(monkeypatch) -> list[dict]:
    """What each trained model's forward and classifier received during training."""
    seen: list[dict] = []
    from pipeline.train import setup as setup_module

    build = setup_module.model_from_config

    def record(module, args):
        x = args[0]
        if module.training and torch.is_grad_enabled():
            seen.append({"ndim": x.ndim, "channels_last": x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last)
                         and not x.is_contiguous(), "autocast": torch.is_autocast_enabled("cpu")
                         and torch.get_autocast_dtype("cpu")})

    def spying(cfg, n_classes, **kw):
        model = build(cfg, n_classes, **kw)
        model.register_forward_pre_hook(record)
        model.get_classifier().register_forward_pre_hook(record)
        return model

    monkeypatch.setattr(setup_module, "model_from_config", spying)
    return seen


def _train(work: Path, run: Path, slug: str, recipe: str, extra: list, weights: Path) -> None:
    args = ["train", slug, str(work), str(run), "--recipe", recipe, *FAST, *extra]
    if slug == "dog-breed-identification":
        args += ["--weights", str(weights)]  # the recipe downloads ImageNet weights; no network here
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)


def _check_member(member, recipe_freezes: bool, feature_cache: bool, logreg: bool = False) -> None:
    device = json.loads(member.config_path.read_text())[DEVICE_KEY]
    features = recipe_freezes and feature_cache
    assert (device["device_type"], device["amp_dtype"], device["backend"]) == ("cpu", "bf16", "gloo")
    assert device["grad_scaler"] is False  # bf16 has fp32's range: no loss scaling
    assert device["channels_last"] is (not features)  # 2-D feature batches never
    metrics = member.metrics()
    steps = [0] if logreg else [1]  # a logreg head is fitted in closed form on the cached features: no SGD step
    assert metrics["steps"].tolist() == steps and np.isfinite(metrics["valid_loss"]).all()


def _check_fed(seen: list[dict], features: bool) -> None:
    assert seen and all(s["autocast"] == torch.bfloat16 for s in seen)  # every training forward in bf16
    images = [s for s in seen if s["ndim"] == 4]
    assert all(s["channels_last"] for s in images)
    assert bool(images) is not features  # a feature head sees only (B, F) batches
    assert any(s["ndim"] == 2 for s in seen)


@pytest.mark.parametrize("slug, recipe, extra", CASES)
def test_one_step_of_every_recipe_on_the_cuda_path_holdout(slug, recipe, extra, works, resnet34_weights, fed,
                                                           tmp_path):
    run = tmp_path / "run"
    _train(works[slug], run, slug, recipe, extra, resnet34_weights)
    chosen = get_competition(slug).get_recipe(recipe)
    freezes, logreg = bool(chosen.get("freeze_backbone")), chosen.get("head") == "logreg" and not extra
    _check_member(Run(run).member("holdout"), freezes, not extra, logreg)
    if not logreg:  # a logreg head trains no forward pass: its features' precision is tested below
        _check_fed(fed, features=freezes and not extra)


@pytest.mark.slow
@pytest.mark.parametrize("slug, recipe, extra", CASES)
def test_one_step_of_every_recipe_on_the_cuda_path_two_folds(slug, recipe, extra, works, resnet34_weights, fed,
                                                             tmp_path):
    run = tmp_path / "run"
    _train(works[slug], run, slug, recipe, [*extra, "--folds", "2"], resnet34_weights)
    chosen = get_competition(slug).get_recipe(recipe)
    freezes, logreg = bool(chosen.get("freeze_backbone")), chosen.get("head") == "logreg" and not extra
    for member in Run(run).finished("folds"):
        _check_member(member, freezes, not extra, logreg)
    cv = Run(run).read_cv()
    n = len(list_split(works[slug], load_reorg(works[slug]), "train_valid"))
    assert cv is not None and len(np.loadtxt(Run(run).oof_path, dtype=str, delimiter=",", skiprows=1)) == n
    if not logreg:
        _check_fed(fed, features=freezes and not extra)


def test_recorded_settings_follow_an_explicit_choice_and_default_otherwise(works, tmp_path):
    """No flags on CPU: fp32, channels_last as the CPU's architecture decides; --amp fp16 on a CPU records the
    scaler it needs."""
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "digits", str(works["digits"]), str(run), "--device", "cpu",
                                      "--epochs", "1", "--steps-per-epoch", "1", "--num-workers", "0"])
    assert result.exit_code == 0, result.output
    member = Run(run).member("holdout")
    device = json.loads(member.config_path.read_text())[DEVICE_KEY]
    x86 = platform.machine().lower() in X86
    assert (device["amp_dtype"], device["channels_last"], device["workers"]) == ("none", x86, 0)
    cfg = TrainConfig.from_json(json.loads(member.config_path.read_text()))
    assert cfg.channels_last is None and cfg.num_workers == 0  # unset stays "decided by the device"


# ---------------------------------------------------------------- one precision per run


def _toy_run(tmp_path: Path, **recipe) -> tuple[Path, Path]:
    comp = make_competition("toy-amp", recipe=Recipe(epochs=1, batch_size=8, lr=0.1, augment="none", **recipe))
    work, run = tmp_path / "work", tmp_path / "run"
    reorg(comp, write_raw(tmp_path / "raw", comp, per_class=6), work, folds=0)
    train(config_from_recipe(comp, work, run, device="cpu", amp="bf16", steps_per_epoch=1, feature_views=0))
    return work, run


def test_cached_features_validation_and_predict_share_the_runs_precision(tmp_path, monkeypatch):
    """A bf16 feature-cache run: predict computes the very features the head trained on, in bf16."""
    work, run = _toy_run(tmp_path, model="resnet18", freeze_backbone=True)
    (bank_file,) = (work / CACHE_DIR).glob("features-*.pt")
    bank = torch.load(bank_file, weights_only=True)
    extracted = []
    from pipeline.data import features

    real = features.extract_features
    monkeypatch.setattr(features, "extract_features", lambda *a, **kw: extracted.append(
        (kw.get("amp_dtype"), kw.get("channels_last"), real(*a, **kw)[0])) or real(*a, **kw))
    monkeypatch.setattr(predict_module, "cached_views", lambda *a, **kw: None)  # test images: the backbone runs
    pool = list_split(work, load_reorg(work), "train_valid")  # the bank's images, in its order
    member = Run(run).member("holdout")
    _, probs, _ = predict_items([member], pool, device="cpu", batch_size=16)
    (dtype, nhwc, feats), = extracted
    assert dtype == torch.bfloat16 and nhwc is (platform.machine().lower() in X86)  # the files plan's format
    scale = bank["eval"].abs().max()
    assert (feats - bank["eval"]).abs().max() <= 1e-5 * scale  # the same path: the same features
    loaded = load_member(member, torch.device("cpu"))
    loader = eval_loader(loaded.config, pool, 16, plan_for(loaded.config, torch.device("cpu"), "files"), strict=True)
    fp32 = real(loaded.model, loader, torch.device("cpu"), len(pool))[0]
    assert (fp32 - bank["eval"]).abs().max() > 1e-3 * scale  # fp32 features differ beyond rounding: not what it learnt
    targets = torch.tensor([it.target for it in pool])
    head, _, _ = infer(FeatureHead(loaded.model), FeatureViews(bank["eval"][None], targets, 16), torch.device("cpu"),
                       amp_dtype=torch.bfloat16)
    np.testing.assert_allclose(probs, normalise_rows(head), atol=1e-6)


def test_features_in_channels_last_equal_the_contiguous_ones(tmp_path):
    """The NHWC backbone pass (on by default on x86 CPUs and recent GPUs) computes the same features."""
    work, run = _toy_run(tmp_path, model="resnet18", freeze_backbone=True)
    loaded = load_member(Run(run).member("holdout"), torch.device("cpu"))
    pool = list_split(work, load_reorg(work), "train_valid")
    loader = eval_loader(loaded.config, pool, 16, plan_for(loaded.config, torch.device("cpu"), "files"), strict=True)
    from pipeline.data.features import extract_features

    nchw = extract_features(loaded.model, loader, torch.device("cpu"), len(pool), channels_last=False)[0]
    nhwc = extract_features(loaded.model, loader, torch.device("cpu"), len(pool), channels_last=True)[0]
    assert loaded.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)  # converted in place
    assert nchw.abs().max() > 0 and (nhwc - nchw).abs().max() <= 1e-4 * nchw.abs().max()


def test_validation_oof_and_predict_of_an_image_run_use_its_precision(tmp_path, monkeypatch):
    """Every infer() call of a bf16 run (validation while training, predict after) autocasts to bf16."""
    dtypes = []
    for module in (train_module, predict_module):
        real = module.infer
        monkeypatch.setattr(module, "infer", lambda *a, real=real, **kw: dtypes.append(kw.get("amp_dtype"))
                            or real(*a, **kw))
    work, run = _toy_run(tmp_path, model="fastnet_s")
    predict_items(Run(run).finished(), list_split(work, load_reorg(work), "test"), device="cpu")
    assert len(dtypes) == 2 and set(dtypes) == {torch.bfloat16}
