"""The data plan: which source a member consumes, and CUDA-only formats only where they fit."""
from __future__ import annotations

import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.dataplan import Source, channels_last_for, choose_source, shared_backbone_groups
from pipeline.engine import Runtime, train_one_epoch


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"competition": "c", "work_dir": ".", "run_dir": ".", "model": "fastnet_s", **kw})


@pytest.mark.parametrize("settings, kind", [
    (dict(freeze_backbone=True), "features"),
    (dict(freeze_backbone=True, feature_cache=False, image_size=224, augment="resized_crop_flip_jitter"), "files"),
    (dict(image_size=32), "image_cache"),
    (dict(image_size=32, cache="off"), "files"),
    (dict(image_size=96), "files"),
    (dict(image_size=96, cache="on"), "image_cache"),
    (dict(image_size=32, augment="resized_crop_flip_jitter"), "files"),
])
def test_choose_source(settings, kind):
    source = choose_source(cfg(**settings))
    assert source.kind == kind and source.reason


@pytest.mark.parametrize("device, kind, want", [
    ("cuda", "files", True), ("cuda", "image_cache", True), ("cuda", "features", False),
    ("cpu", "files", False), ("cpu", "features", False),
])
def test_channels_last_only_for_image_batches_on_cuda(device, kind, want):
    assert channels_last_for(cfg(), torch.device(device), Source(kind, "")) is want
    assert channels_last_for(cfg(channels_last=False), torch.device(device), Source(kind, "")) is False


class Batches:
    """A loader of fixed batches with the sampler hook the engine calls."""

    def __init__(self, batches):
        self.batches, self.sampler = batches, self

    def set_epoch(self, epoch):
        pass

    def __iter__(self):
        return iter(self.batches)


@pytest.mark.parametrize("shape", [(8, 16), (8, 3, 4, 4)], ids=["features", "images"])
def test_an_epoch_with_channels_last_on_takes_feature_and_image_batches(shape):
    """The bug class of a 2-D feature batch sent to channels_last, exercised on CPU."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(3))
    x, y = torch.randn(*shape), torch.randint(0, 3, (8,))
    model(x)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.param_groups[0]["base_lr"] = 0.1
    rt = Runtime(torch.device("cpu"), None, None, steps_per_epoch=2, total_steps=2, channels_last=True)
    loader = Batches([(x, y, torch.arange(8))] * 2)
    loss, steps, bad = train_one_epoch(model, loader, optimizer, torch.nn.CrossEntropyLoss(), cfg(epochs=1), rt,
                                       None, 0, torch.Generator().manual_seed(0))
    assert steps == 2 and loss > 0 and bad == set()


def test_shared_backbone_groups():
    frozen = cfg(freeze_backbone=True, model="timm:x")
    other_weights = cfg(freeze_backbone=True, model="timm:y")
    trained = cfg(model="timm:x")
    assert shared_backbone_groups([frozen, trained, frozen, other_weights, trained]) == [[0, 2], [1], [3], [4]]
