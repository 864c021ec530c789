"""The data plan: which source a member consumes, and the device decisions that follow from it."""
from __future__ import annotations

import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.data.plan import choose_source, shared_backbone_groups
from pipeline.devices import device_plan as plan_with_kind
from pipeline.devices import A100, ARM_CPU, CPU, P100, T4
from pipeline.train.engine import Runtime, make_runtime, train_one_epoch


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"competition": "c", "work_dir": ".", "run_dir": ".", "model": "fastnet_s", **kw})


def device_plan(config, acc, input_kind=None, **kw):
    """The member's device plan for its training source (or ``input_kind``), as a member plan asks for it."""
    return plan_with_kind(config, acc, input_kind or choose_source(config).kind, **kw)


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


@pytest.mark.parametrize("acc, settings, want", [
    (T4, {}, True), (A100, dict(image_size=96), True), (P100, {}, False), (CPU, {}, True), (ARM_CPU, {}, False),
    (CPU, dict(channels_last=False), False), (A100, dict(channels_last=False), False),
    (A100, dict(freeze_backbone=True), False), (CPU, dict(freeze_backbone=True, channels_last=True), False),
], ids=["T4-cache", "A100-files", "P100", "CPU", "ARM", "CPU-off", "A100-off", "A100-features", "CPU-features"])
def test_channels_last_decided_by_the_device_plan_from_the_source(acc, settings, want):
    """The member's source sets the batch kind: feature batches are 2-D and never channels_last."""
    assert device_plan(cfg(**settings), acc).channels_last is want


def test_device_plan_of_a_member_follows_its_source_and_explicit_settings():
    files = device_plan(cfg(image_size=96), T4, cpu_count=8)
    assert (files.workers, files.pin_memory, files.amp_dtype, files.grad_scaler) == (7, True, "fp16", True)
    features = device_plan(cfg(freeze_backbone=True), T4, cpu_count=8)
    assert (features.workers, features.pin_memory) == (0, False)
    assert device_plan(cfg(freeze_backbone=True), T4, "files", cpu_count=8).workers == 7  # the backbone's pass
    explicit = device_plan(cfg(image_size=96, num_workers=3, amp="bf16"), CPU, cpu_count=8)
    assert (explicit.workers, explicit.amp_dtype, explicit.backend) == (3, "bf16", "gloo")
    assert device_plan(cfg(amp="bf16"), T4, amp="none").amp_dtype == "none"  # predict's trained dtype wins


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
    # features of another precision differ: bf16 and fp32 members do not share a backbone pass
    assert shared_backbone_groups([frozen, frozen], ["bf16", "none"]) == [[0], [1]]


@pytest.mark.parametrize("acc, dtype, scaled", [(T4, torch.float16, True), (P100, torch.float16, True),
                                                (A100, torch.bfloat16, False), (CPU, None, False)],
                         ids=["T4", "P100", "A100", "CPU"])
def test_the_runtime_takes_precision_and_scaler_from_the_device_plan(acc, dtype, scaled):
    """--amp auto: fp16 with loss scaling where bf16 is emulated (Kaggle's T4 and P100), bf16 from Ampere on."""
    rt = make_runtime(cfg(image_size=96), torch.device("cpu"), 64, device_plan(cfg(image_size=96), acc))
    assert rt.amp_dtype == dtype and (rt.scaler is not None) is scaled
    assert rt.channels_last is (acc.type == "cpu" or acc.capability >= (7, 0))  # the CPU here is an x86 one
