"""The evaluation transform of a run's test views: the decoded image resized to the test size, at each scale.

A test size above the training one (FixRes, Touvron et al. 2019) and the
``scaleF`` views resize the *decoded image* to the larger side, not the
(B, C, H, W) tensor: the larger input then holds real detail from the file,
and the network sees objects at the apparent size it learnt from random
resized crops. Upsampling the tensor (F.interpolate) would only blur the
training-size image into more pixels. So the loader decodes each image once
and resizes it once per scale of the views (a list of tensors per batch when
the views need several; pipeline/models/views.py picks from it), and training
never sees any of this: its transforms stay at the training side.
"""
from __future__ import annotations

import torch

from pipeline.config import TrainConfig
from pipeline.data.items import EVAL_CROP_PCT, EVAL_CROPS, build_transform
from pipeline.models import weights_test_config
from pipeline.models.views import scales


def test_geometry(test_size: str, image_size: int, pretrained_cfg: dict | None) -> tuple[int, float | None]:
    """(side, centre-crop fraction or None for the preset's own) of the evaluation transform (pure).

    ``auto`` reads the weights' ``test_input_size`` and ``test_crop_pct`` (else ``crop_pct``) from
    ``pretrained_cfg`` (timm's); training at another side than the weights' ``input_size``, the test side
    keeps their ratio (FixRes: the apparent object size is what must match). Without a test_input_size:
    the training side, at the weights' crop_pct.
    """
    if test_size == "train":
        return image_size, None
    if test_size != "auto":
        return int(test_size), None
    cfg = pretrained_cfg or {}
    test_input, train_input = cfg.get("test_input_size"), cfg.get("input_size")
    crop = (cfg.get("test_crop_pct") if test_input else None) or cfg.get("crop_pct")
    side = int(round(image_size * test_input[-1] / train_input[-1])) if test_input and train_input else image_size
    return side, float(crop) if crop else None


def eval_geometry(cfg: TrainConfig) -> tuple[int, float | None]:
    """(test side, centre-crop fraction or None for the preset's own) of a run's evaluation transform.

    ``--test-size auto`` reads the pretrained weights' config (with --pretrained or --weights FILE: the
    architecture's pretrained_cfg; no download); a crop only matters to presets that centre-crop.
    """
    weights = weights_test_config(cfg.model) if cfg.test_size == "auto" and (cfg.pretrained or cfg.weights) else None
    side, crop = test_geometry(cfg.test_size, cfg.image_size, weights)
    if cfg.augment not in EVAL_CROPS or crop is None or abs(crop - EVAL_CROP_PCT) < 1e-9:
        crop = None
    return side, crop


def eval_sizes(cfg: TrainConfig, tta: str) -> tuple[int, ...]:
    """The decoded sides the views of ``tta`` need, one per scale (ascending)."""
    side, _ = eval_geometry(cfg)
    return tuple(int(round(side * scale)) for scale in scales(tta))


def trains_geometry(cfg: TrainConfig, tta: str) -> bool:
    """Whether the views need only the training evaluation transform (one scale, the training side, the
    preset's crop): then a training cache of evaluation images or features serves them."""
    return eval_sizes(cfg, tta) == (cfg.image_size,) and eval_geometry(cfg)[1] is None


class ScaledTransform:
    """The evaluation transforms of several sides, applied to one decoded image: a list of tensors."""

    def __init__(self, transforms: list, sizes: tuple[int, ...]):
        self.transforms, self.sizes = transforms, sizes

    def __call__(self, image) -> dict:
        return {"image": [t(image=image)["image"] for t in self.transforms]}

    def set_random_seed(self, seed: int) -> None:
        """Nothing random here; the loaders seed every transform they are given (items.seed_transform)."""

    def blank(self) -> list[torch.Tensor]:
        """What an unreadable image becomes: zeros at each side (its target marks it)."""
        return [torch.zeros(3, s, s) for s in self.sizes]


def eval_transform(cfg: TrainConfig, tta: str):
    """(transform, largest side) of ``tta``'s evaluation: one albumentations pipeline at the test side, or a
    :class:`ScaledTransform` over the sides of its scales."""
    _, crop = eval_geometry(cfg)
    sizes = eval_sizes(cfg, tta)
    transforms = [build_transform(cfg.augment, s, cfg.mean, cfg.std, train=False, crop_pct=crop) for s in sizes]
    return (transforms[0] if len(sizes) == 1 else ScaledTransform(transforms, sizes)), max(sizes)
