"""Augmentation: independent, reproducible random draws (issue 13.5); presets that keep the
whole image (issue 15.4).

``param_correlations`` is also a measurement: run this file as a script to print the
pairwise correlations with albumentations' own seeding and with ``seed_transform``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import AUGMENTS
from pipeline.data.items import ImageDataset, Item, build_transform, read_image, seed_transform
from pipeline.data.loaders import EpochSampler

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.25, 0.25)
UNIT = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # mean, std that leave pixels / 255


def jitter_params(transform: A.Compose, image: np.ndarray) -> tuple[float, float, float]:
    """(crop area fraction, flipped 0/1, brightness factor) of one call of resized_crop_flip_jitter."""
    applied = dict(transform(image=image)["applied_transforms"])
    x1, y1, x2, y2 = applied["RandomResizedCrop"]["crop_coords"]
    area = (x2 - x1) * (y2 - y1) / (image.shape[0] * image.shape[1])
    return area, float("HorizontalFlip" in applied), applied["ColorJitter"]["brightness"]


def param_correlations(seeder: Callable[[A.BaseCompose, int], None] = seed_transform,
                       n: int = 2000) -> dict[str, float]:
    """Pearson r of each pair of (crop area, flip, brightness) over ``n`` samples seeded as
    EpochSampler seeds them, each sample's transform reseeded by ``seeder``."""
    transform = build_transform("resized_crop_flip_jitter", 16, MEAN, STD, train=True)
    transform.save_applied_params = True
    image = np.zeros((40, 48, 3), dtype=np.uint8)
    rows = []
    for _, seed in EpochSampler(n, shuffle=True, seed=3):
        seeder(transform, seed)
        rows.append(jitter_params(transform, image))
    values = dict(zip(("area", "flip", "brightness"), np.array(rows).T))
    return {f"{a}~{b}": float(np.corrcoef(values[a], values[b])[0, 1])
            for a, b in itertools.combinations(values, 2)}


def albumentations_seeding(transform: A.BaseCompose, seed: int) -> None:
    """What ImageDataset did before: one seed handed to every transform."""
    transform.set_random_seed(seed)


def test_random_parameters_are_uncorrelated() -> None:
    correlations = param_correlations()
    assert len(correlations) == 3
    assert all(abs(r) < 0.1 for r in correlations.values()), correlations


def test_measurement_sees_the_correlation_of_shared_seeds() -> None:
    # The measurement itself can fail: a shared seed correlates the draws strongly.
    correlations = param_correlations(albumentations_seeding, n=500)
    assert max(abs(r) for r in correlations.values()) > 0.5, correlations


def test_each_random_parameter_still_varies() -> None:
    transform = build_transform("resized_crop_flip_jitter", 16, MEAN, STD, train=True)
    transform.save_applied_params = True
    image = np.zeros((40, 48, 3), dtype=np.uint8)
    rows = []
    for seed in range(200):
        seed_transform(transform, seed)
        rows.append(jitter_params(transform, image))
    area, flip, brightness = np.array(rows).T
    assert 0.35 < flip.mean() < 0.65
    assert area.min() < 0.3 and area.max() > 0.8
    assert brightness.min() < 0.75 and brightness.max() > 1.25


def write_image(path: Path, seed: int = 0, size: tuple[int, int] = (36, 28)) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.mark.parametrize("augment", AUGMENTS)
def test_same_seed_same_image_through_the_dataset(tmp_path: Path, augment: str) -> None:
    item = Item("a", write_image(tmp_path / "a.png"), 0)
    dataset = ImageDataset([item], build_transform(augment, 24, MEAN, STD, train=True), 24)
    first, again, other = dataset[(0, 11)][0], dataset[(0, 11)][0], dataset[(0, 12)][0]
    assert first.shape == (3, 24, 24)
    torch.testing.assert_close(first, again)
    if augment != "none":
        seeds = range(12, 20)  # flip alone leaves a 1-in-2 chance of a repeat per seed
        assert any(not torch.equal(first, dataset[(0, s)][0]) for s in seeds)


@pytest.mark.parametrize("augment", AUGMENTS)
@pytest.mark.parametrize("train", [True, False])
def test_output_shapes(augment: str, train: bool) -> None:
    transform = build_transform(augment, 20, MEAN, STD, train=train)
    for height, width in [(20, 20), (13, 50), (64, 30)]:
        image = np.full((height, width, 3), 100, dtype=np.uint8)
        out = transform(image=image)["image"]
        assert out.shape == (3, 20, 20) and out.dtype == torch.float32


@pytest.mark.parametrize("augment", AUGMENTS)
def test_eval_transform_is_deterministic(augment: str) -> None:
    image = np.random.default_rng(1).integers(0, 256, (30, 45, 3), dtype=np.uint8)
    outs = [build_transform(augment, 16, MEAN, STD, train=False, seed=s)(image=image)["image"] for s in (0, 1, 2)]
    transform = build_transform(augment, 16, MEAN, STD, train=False)
    outs += [transform(image=image)["image"] for _ in range(3)]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0])


def bordered_image(height: int, width: int) -> np.ndarray:
    """Grey, with a 4-px red band on the left and a 4-px blue band on the right."""
    image = np.full((height, width, 3), 128, dtype=np.uint8)
    image[:, :4] = (255, 0, 0)
    image[:, -4:] = (0, 0, 255)
    return image


@pytest.mark.parametrize("train", [True, False])
def test_letterbox_keeps_all_of_a_wide_image_and_pads_equally(train: bool) -> None:
    transform = build_transform("letterbox", 32, *UNIT, train=train)
    out = transform(image=bordered_image(32, 64))["image"].numpy()  # (3, 32, 32), pixels / 255
    pad = np.flatnonzero((out == 0).all(axis=(0, 2)))  # rows that are padding only
    assert list(pad) == [*range(8), *range(24, 32)]  # 8 rows above and 8 below the 16 of content
    content = out[:, 8:24]
    red, blue = np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.0, 1.0])
    left, right = content[:, :, 0].T, content[:, :, -1].T  # (16, 3) edge columns
    if train and np.allclose(left, blue):  # flipped this time
        left, right = right, left
    np.testing.assert_allclose(left, np.tile(red, (16, 1)), atol=0.01)
    np.testing.assert_allclose(right, np.tile(blue, (16, 1)), atol=0.01)
    np.testing.assert_allclose(content[:, :, 2:-2], 128 / 255, atol=0.01)  # the grey middle, unchanged


def test_letterbox_pads_with_the_mean_colour() -> None:
    out = build_transform("letterbox", 16, MEAN, STD, train=False)(image=bordered_image(8, 16))["image"]
    # Padding normalises to zero (up to rounding the mean to whole pixel values); content does not.
    assert out[:, :4].abs().max() < 0.5 / 255 / STD[0] + 1e-6 and out[:, -4:].abs().max() < 0.5 / 255 / STD[0] + 1e-6
    assert out[1, 4:12].abs().min() > 0.1  # grey 128 is not the green mean 102


def test_light_keeps_framing_close_to_the_resize() -> None:
    image = bordered_image(48, 48)
    evaluated = build_transform("light", 48, *UNIT, train=False)(image=image)["image"]
    expected = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(evaluated, expected, atol=0.01, rtol=0)  # eval: the resize only
    trained = build_transform("light", 48, *UNIT, train=True)
    moved = 0
    for seed in range(20):
        seed_transform(trained, seed)
        out = trained(image=image)["image"]
        # Shifts <= 6 %, scale >= 0.9 and 10 degrees leave the grey centre in place.
        torch.testing.assert_close(out[:, 16:32, 16:32], expected[:, 16:32, 16:32], atol=0.01, rtol=0)
        moved += not torch.allclose(out, expected, atol=0.01)
    assert moved >= 18  # but the geometry does change


def test_dataset_reseeds_through_seed_transform(tmp_path: Path) -> None:
    path = write_image(tmp_path / "a.png", size=(40, 30))
    dataset = ImageDataset([Item("a", path, 0)], build_transform("resized_crop_flip_jitter", 16, MEAN, STD, True), 16)
    reference = build_transform("resized_crop_flip_jitter", 16, MEAN, STD, train=True)
    image = read_image(path)
    for seed in (5, 6, 7):
        seed_transform(reference, seed)
        torch.testing.assert_close(dataset[(0, seed)][0], reference(image=image)["image"])


if __name__ == "__main__":
    for name, seeder in [("one shared seed (before)", albumentations_seeding), ("seed_transform", seed_transform)]:
        print(name, {pair: round(r, 3) for pair, r in param_correlations(seeder).items()})
