"""Training tricks of issue 23: gradient accumulation (point 4) and --time-limit (point 4)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from pipeline.config import TrainConfig, resolve_config
from pipeline.errors import PipelineError
from pipeline.models.inference import infer
from pipeline.models.views import image_views
from pipeline.train.budget import time_is_up
from pipeline.distributed import plan_for
from pipeline.train.engine import make_runtime, train_one_epoch
from pipeline.train.plan import steps_per_epoch
from pipeline.train.stage import train


def linear_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 3))  # no batch norm


def images(n=64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 4, 4, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def batches(x, y, size):
    return [(x[i:i + size], y[i:i + size], torch.arange(i, i + size)) for i in range(0, len(x), size)]


def trained(batch_size, accum, epochs=2, **kw):
    cfg = TrainConfig(model="linear", batch_size=batch_size, accum_steps=accum, lr=0.2, optimizer="sgd",
                      momentum=0.9, weight_decay=5e-4, schedule="cosine", epochs=epochs, device="cpu", **kw)
    model, (x, y) = linear_model(), images()
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    optimizer.param_groups[0]["base_lr"] = cfg.lr
    cpu = torch.device("cpu")
    rt = make_runtime(cfg, cpu, steps_per_epoch(cfg, len(x)), plan_for(cfg, cpu, "features"))
    for epoch in range(epochs):
        rt.step = epoch * rt.steps_per_epoch
        train_one_epoch(model, batches(x, y, batch_size), optimizer, nn.CrossEntropyLoss(), cfg, rt, None, epoch,
                        torch.Generator().manual_seed(epoch))
    return torch.cat([p.detach().flatten() for p in model.parameters()]), rt


@pytest.mark.parametrize("optimizer_kw", [{}, {"clip_grad": 0.5}])
def test_accumulated_batches_equal_one_big_batch(optimizer_kw):
    big, rt_big = trained(32, 1, **optimizer_kw)
    accumulated, rt_acc = trained(8, 4, **optimizer_kw)
    assert rt_big.steps_per_epoch == rt_acc.steps_per_epoch == 2 and rt_acc.step == 4  # optimizer steps
    assert torch.allclose(big, accumulated, atol=1e-5)
    small, _ = trained(8, 1, **optimizer_kw)  # 8 steps of 8: another trajectory, so the test can fail
    assert not torch.allclose(big, small, atol=1e-3)


def test_accumulation_needs_enough_images():
    cfg = TrainConfig(model="linear", batch_size=16, accum_steps=8, device="cpu")
    with pytest.raises(PipelineError, match="--accum-steps 8 x --batch-size 16"):
        steps_per_epoch(cfg, 100)
    assert steps_per_epoch(cfg, 300) == 2  # 300 // (16 x 8)


@pytest.mark.parametrize("elapsed, last, limit, up", [(50, 5, 1, False), (56, 5, 1, True), (10, 100, 0, False),
                                                      (0, 61, 1, True)])
def test_time_is_up_looks_one_epoch_ahead(elapsed, last, limit, up):
    assert time_is_up(elapsed, last, limit) is up


def test_time_limit_stops_at_an_epoch_boundary_leaving_a_finished_member(toy_work, tmp_path):
    comp, work = toy_work
    run_dir = tmp_path / "run"
    flags = {"device": "cpu", "epochs": 6, "batch_size": 8, "time_limit": 1e-4}  # 6 ms: one epoch passes it
    train(resolve_config(comp, work, run_dir, None, flags))
    member = run_dir / "holdout"
    done = json.loads((member / "done.json").read_text())
    assert done["epochs"] == 1 and done["time_limit_hit"] and (member / "best.pt").is_file()
    assert len(pd.read_csv(member / "metrics.csv")) == 1
    from pipeline.predict.stage import predict

    result = predict(comp, work, run_dir, tmp_path / "sub.csv", device="cpu")  # a finished member predicts
    assert result.rows == 10


# ---------------------------------------------------------------- --tta d4


def test_d4_views_are_the_eight_symmetries_of_the_square():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).reshape(2, 3, 5, 5)
    views = image_views(x, "d4")
    assert len(views) == 8 and all(v.shape == x.shape for v in views)
    assert len({v.numpy().tobytes() for v in views}) == 8  # all distinct
    assert any(torch.equal(v, torch.flip(x, dims=[3])) for v in views)  # holds the flip view
    assert any(torch.equal(v, torch.flip(x, dims=[2])) for v in views)  # and the up-down mirror


def test_d4_predictions_do_not_change_when_the_image_is_rotated_or_mirrored():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))  # not rotation invariant
    torch.manual_seed(0)
    x, y = torch.randn(6, 3, 6, 6), torch.zeros(6, dtype=torch.long)

    def probs(images, tta):
        return infer(net, [(images, y, torch.arange(6))], torch.device("cpu"), tta=tta, gather=False)[0]

    for turned in (torch.rot90(x, 1, dims=(2, 3)), torch.flip(x, dims=[2]), torch.rot90(x, 3, dims=(2, 3))):
        assert np.allclose(probs(turned, "d4"), probs(x, "d4"), atol=1e-6)
        assert not np.allclose(probs(turned, "flip"), probs(x, "flip"), atol=1e-3)  # flip alone is not enough


def test_predict_says_what_the_views_cost(toy_work, tmp_path):
    from pipeline.predict.stage import predict

    comp, work = toy_work
    run_dir = tmp_path / "run"
    train(resolve_config(comp, work, run_dir, None, {"device": "cpu", "epochs": 1, "batch_size": 8, "tta": "d4"}))
    assert json.loads((run_dir / "holdout" / "config.json").read_text())["config"]["tta"] == "d4"
    result = predict(comp, work, run_dir, tmp_path / "sub.csv", device="cpu")
    assert result.tta == "d4" and 0 < result.view_seconds < result.seconds
    plain = predict(comp, work, run_dir, tmp_path / "plain.csv", device="cpu", tta="none")
    assert plain.view_seconds == 0


# ---------------------------------------------------------------- augmentation presets (point 2)

NEW_PRESETS = ("trivialaugment", "randaugment", "d4", "erasing")


def photo(side=24, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (side, side, 3), dtype=np.uint8)


@pytest.mark.parametrize("augment", NEW_PRESETS)
def test_new_presets_are_seeded_per_sample_and_reproducible(augment):
    from pipeline.data.items import AUGMENTS, build_transform, seed_transform
    from pipeline.config import AUGMENTS as CONFIG_AUGMENTS

    assert augment in AUGMENTS and augment in CONFIG_AUGMENTS
    transform, image = build_transform(augment, 16, (0.5,) * 3, (0.25,) * 3, train=True), photo()

    def draw(seed):
        seed_transform(transform, seed)
        return transform(image=image)["image"]

    first = draw(7)
    assert first.shape == (3, 16, 16) and first.dtype == torch.float32
    assert torch.equal(draw(7), first)  # the same sample seed: the same image
    outputs = {draw(s).numpy().tobytes() for s in range(12)}
    assert len(outputs) >= 6  # other seeds: other draws
    evaluation = build_transform(augment, 16, (0.5,) * 3, (0.25,) * 3, train=False)
    assert torch.equal(evaluation(image=image)["image"], evaluation(image=image)["image"])


def test_trivialaugment_picks_one_operation_uniformly_per_sample():
    from pipeline.data.items import build_transform, seed_transform

    transform, image = build_transform("trivialaugment", 16, (0.5,) * 3, (0.25,) * 3, train=True), photo()
    transform.save_applied_params = True
    picked = []
    for s in range(400):
        seed_transform(transform, s)
        applied = [name for name, _ in transform(image=image)["applied_transforms"]]
        ops = [n for n in applied if n not in ("Resize", "PadIfNeeded", "RandomCrop", "HorizontalFlip", "OneOf",
                                               "Normalize", "ToTensorV2")]
        assert len(ops) == 1, applied
        picked.append(ops[0])
    counts = pd.Series(picked).value_counts()
    assert counts.index.nunique() == 8  # 14 operations of 8 kinds (5 Affine, 3 ColorJitter): every kind comes up
    assert counts["Affine"] / 400 == pytest.approx(5 / 14, abs=0.07)  # 5 of the 14 are Affine
    assert counts["ColorJitter"] / 400 == pytest.approx(3 / 14, abs=0.06)


def test_d4_preset_gives_one_of_the_eight_symmetries():
    from pipeline.data.items import build_transform, seed_transform

    image = photo(16)
    transform = build_transform("d4", 16, (0.0,) * 3, (1.0,) * 3, train=True)
    plain = torch.from_numpy(image.astype(np.float32) / 255).permute(2, 0, 1)[None]
    symmetries = [v[0] for v in image_views(plain, "d4")]
    seen = set()
    for s in range(40):
        seed_transform(transform, s)
        out = transform(image=image)["image"]
        match = [i for i, v in enumerate(symmetries) if torch.allclose(out, v, atol=1e-6)]
        assert len(match) == 1
        seen.add(match[0])
    assert len(seen) == 8


# ---------------------------------------------------------------- --layer-decay (point 5)


def test_layer_decay_gives_deeper_layers_more_lr_and_the_head_the_full_lr():
    from pipeline.models import create_model
    from pipeline.models.layer_decay import layer_decay_groups
    from pipeline.train.engine import build_optimizer

    model = create_model("timm:tf_efficientnet_lite0", 5)
    cfg = TrainConfig(model="timm:tf_efficientnet_lite0", lr=0.01, weight_decay=0.05, layer_decay=0.7,
                      backbone_lr_scale=0.5, optimizer="adamw")
    groups = build_optimizer(model, cfg).param_groups
    head = [g for g in groups if g["name"].endswith("_head")]
    assert head and all(g["lr"] == pytest.approx(0.01) for g in head)
    backbone = [g["lr"] for g in groups if not g["name"].endswith("_head")]
    assert backbone == sorted(backbone) and backbone[0] < 0.01 * 0.5 * 0.7 ** 5  # the stem: decayed most
    assert max(backbone) == pytest.approx(0.01 * 0.5 * 0.7)  # the layer below the head: one factor (x the scale)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for _ in model.parameters())  # every parameter once
    assert all(g["weight_decay"] == 0 for g in groups for p in g["params"] if p.ndim <= 1)
    plain = build_optimizer(model, TrainConfig(model="timm:tf_efficientnet_lite0", lr=0.01)).param_groups
    assert {g["lr"] for g in plain} == {0.01}
    with pytest.raises(PipelineError, match="needs a timm model"):
        layer_decay_groups(create_model("fastnet_s", 3), 0.1, 0.0, 0.7)
    with pytest.raises(PipelineError, match="--layer-decay must be in"):
        TrainConfig(model="fastnet_s", layer_decay=1.5)
