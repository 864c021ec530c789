"""Augmentation presets of issue 23 (point 2): TrivialAugment, RandAugment, the D4 group, random erasing.

Each is a list of albumentations transforms like the presets of
pipeline/data/items.py (registered there in ``_PRESETS``), built on the
pad-crop-flip geometry of small images; evaluation is the plain resize. The
policies are albumentations' forms of the papers': TrivialAugment (Müller &
Hutter 2021) applies ONE operation picked uniformly with a magnitude drawn
uniformly up to its maximum (``A.OneOf`` over ranges); RandAugment (Cubuk et
al. 2020) applies N = 2 operations picked at random, at magnitudes up to
M = 9 of 30 (``A.SomeOf``). Every random choice is a transform of its own, so
``seed_transform`` gives each its own stream, seeded per sample.
"""
from __future__ import annotations

import albumentations as A
import cv2

RANDAUGMENT_N, RANDAUGMENT_M = 2, 9 / 30  # operations per image; magnitude as a share of the maximum


def operations(m: float, fill: tuple[int, ...]) -> list[A.BasicTransform]:
    """The TrivialAugment-wide operations at magnitudes up to ``m`` (0-1) of their maxima, each applied (p 1)."""
    affine = {"border_mode": cv2.BORDER_CONSTANT, "fill": fill, "p": 1.0}
    return [
        A.NoOp(p=1.0),
        A.Affine(rotate=(-135 * m, 135 * m), **affine),  # TA-wide: up to 135 degrees
        A.Affine(shear={"x": (-45 * m, 45 * m), "y": (0, 0)}, **affine),
        A.Affine(shear={"x": (0, 0), "y": (-45 * m, 45 * m)}, **affine),
        A.Affine(translate_percent={"x": (-0.3 * m, 0.3 * m), "y": (0, 0)}, **affine),
        A.Affine(translate_percent={"x": (0, 0), "y": (-0.3 * m, 0.3 * m)}, **affine),
        A.ColorJitter(brightness=(1 - 0.99 * m, 1 + 0.99 * m), contrast=0, saturation=0, hue=0, p=1.0),
        A.ColorJitter(brightness=0, contrast=(1 - 0.99 * m, 1 + 0.99 * m), saturation=0, hue=0, p=1.0),
        A.ColorJitter(brightness=0, contrast=0, saturation=(1 - 0.99 * m, 1 + 0.99 * m), hue=0, p=1.0),
        A.Sharpen(alpha=(0.0, 0.99 * m), lightness=(1.0, 1.0), p=1.0),
        A.Posterize(num_bits=(max(1, round(8 - 6 * m)), 8), p=1.0),
        A.Solarize(threshold_range=(1 - m, 1.0), p=1.0),
        A.AutoContrast(p=1.0),
        A.Equalize(p=1.0),
    ]


def _geometry(s: int) -> list:
    pad = max(1, s // 8)
    return [A.Resize(height=s, width=s, interpolation=cv2.INTER_AREA),
            A.PadIfNeeded(min_height=s + 2 * pad, min_width=s + 2 * pad, border_mode=cv2.BORDER_CONSTANT, fill=0),
            A.RandomCrop(height=s, width=s), A.HorizontalFlip(p=0.5)]


def _resize(s: int) -> list:
    return [A.Resize(height=s, width=s, interpolation=cv2.INTER_AREA)]


def trivialaugment(s: int, train: bool, fill: tuple[int, ...]) -> list:
    """pad_crop_flip, then one operation picked uniformly at a magnitude drawn uniformly."""
    return _geometry(s) + [A.OneOf(operations(1.0, fill), p=1.0)] if train else _resize(s)


def randaugment(s: int, train: bool, fill: tuple[int, ...]) -> list:
    """pad_crop_flip, then RANDAUGMENT_N operations at magnitudes up to RANDAUGMENT_M."""
    if not train:
        return _resize(s)
    return _geometry(s) + [A.SomeOf(operations(RANDAUGMENT_M, fill), n=RANDAUGMENT_N, replace=True, p=1.0)]


def d4(s: int, train: bool, fill: tuple[int, ...]) -> list:
    """Resize, then one of the 8 rotations and mirrors of the square (orientation-free images: satellite, cells)."""
    return _resize(s) + [A.D4(p=1.0)] if train else _resize(s)


def erasing(s: int, train: bool, fill: tuple[int, ...]) -> list:
    """pad_crop_flip, then random erasing (Zhong et al. 2020): half the images lose a rectangle of 2-33 %."""
    return _geometry(s) + [A.Erasing(scale=(0.02, 0.33), ratio=(0.3, 3.3), fill=fill, p=0.5)] if train else _resize(s)


PRESETS = {"trivialaugment": trivialaugment, "randaugment": randaugment, "d4": d4, "erasing": erasing}
