"""The fast data paths: batch augmentation, per-sample seeds, the image cache, whitening, recipes."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from pipeline.data.cache import image_cache
from pipeline.data.loaders import IndexBatches, TensorBatchLoader, batch_crop_flip, make_loader
from pipeline.data.items import ImageDataset, build_transform, list_split, load_reorg
from pipeline.errors import PipelineError
from pipeline.download.reorg import reorg


def test_batch_crop_flip_translates_and_flips_whole_images():
    # pixel value = column index + 100 * row index, so every output pixel tells where it came from
    rows, cols = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    image = (100 * rows + cols + 1)[None, None].repeat(64, 3, 1, 1)  # +1: padding zeros stand out
    out = batch_crop_flip(image, torch.Generator().manual_seed(0))
    assert out.shape == image.shape
    flips = 0
    for img in out[:, 0]:
        inside = img[img > 0]
        r, c = (inside - 1) // 100, (inside - 1) % 100
        # within one image, rows shift by one constant and columns by one constant (or mirror)
        dr = (r.view(-1) - torch.nonzero(img > 0)[:, 0]).unique()
        assert len(dr) == 1 and abs(int(dr)) <= 1
        dc = c.view(-1) - torch.nonzero(img > 0)[:, 1]
        dc_mirror = c.view(-1) + torch.nonzero(img > 0)[:, 1]
        assert len(dc.unique()) == 1 or len(dc_mirror.unique()) == 1
        flips += len(dc_mirror.unique()) == 1 and len(dc.unique()) != 1
    assert 10 < flips < 54  # about half are flipped


def test_index_batches_shard_the_epoch_across_ranks():
    seen = []
    for rank in range(2):
        batches = IndexBatches(10, 2, shuffle=True, seed=3, drop_last=False, rank=rank, world=2)
        batches.set_epoch(1)
        seen += [int(i) for idx, _ in batches.batches() for i in idx]
    assert sorted(seen) == list(range(10))  # every sample once per epoch, across the ranks
    again = IndexBatches(10, 2, shuffle=True, seed=3, drop_last=False, rank=0, world=2)
    again.set_epoch(2)
    assert [int(i) for idx, _ in again.batches() for i in idx] != seen[:5]  # epochs differ


def test_augmentation_does_not_depend_on_the_worker_count(toy, tmp_path):
    comp, raw = toy
    reorg(comp, raw, tmp_path / "work", folds=0)
    items = list_split(tmp_path / "work", load_reorg(tmp_path / "work"), "train")
    tf = build_transform("resized_crop_flip_jitter", 16, comp.mean, comp.std, train=True, seed=0)
    batches = []
    for workers in (0, 2):
        loader = make_loader(ImageDataset(items, tf, 16), 8, True, workers, seed=5)
        loader.sampler.set_epoch(3)
        batches.append(torch.cat([x for x, _, _ in loader]))
    assert torch.equal(batches[0], batches[1])


def test_image_cache_is_built_once_and_follows_its_inputs(toy, tmp_path):
    comp, raw = toy
    reorg(comp, raw, tmp_path / "work", folds=0)
    work = tmp_path / "work"
    items = list_split(work, load_reorg(work), "train_valid")
    array, bad = image_cache(work, items, 16, workers=1)
    assert array.shape == (36, 16, 16, 3) and array.dtype == np.uint8 and not bad
    first = next((work / "cache").glob("images-16-*.npy"))
    again, _ = image_cache(work, items, 16, workers=1)
    assert list((work / "cache").glob("images-16-*.npy")) == [first]  # reused, not rebuilt
    np.testing.assert_array_equal(array, again)
    os.utime(items[0].path, ns=(1, 1))  # an input changed: a new cache
    image_cache(work, items, 16, workers=1)
    assert len(list((work / "cache").glob("images-16-*.npy"))) == 2


def test_tensor_loader_normalises_and_keeps_targets():
    images = torch.full((5, 4, 4, 3), 255, dtype=torch.uint8)
    loader = TensorBatchLoader(images, torch.arange(5), 2, shuffle=False, augment="none", mean=(0.5,) * 3,
                               std=(0.25,) * 3, device=torch.device("cpu"))
    xs, ys, idx = zip(*loader)
    assert torch.allclose(torch.cat(xs), torch.full((5, 3, 4, 4), 2.0))  # (1 - 0.5) / 0.25
    assert torch.cat(ys).tolist() == [0, 1, 2, 3, 4] and len(loader) == 3


def test_whitened_stem_decorrelates_patches():
    from pipeline.models import create_model

    model = create_model("fastnet_s", 10)
    images = torch.randn(16, 3, 16, 16) * torch.tensor([3.0, 1.0, 0.2]).view(1, 3, 1, 1)
    model.init_from_data(images)
    with torch.no_grad():
        out = torch.nn.functional.conv2d(images, model.stem[0].weight, padding=0)  # (B, 16, 14, 14)
    half = out[:, :8].permute(1, 0, 2, 3).reshape(8, -1)
    cov = torch.cov(half)
    assert torch.allclose(torch.diag(cov), torch.ones(8), atol=0.1)  # unit variance per direction
    assert (cov - torch.diag(torch.diag(cov))).abs().max() < 0.1  # and uncorrelated


def test_named_recipes():
    from pipeline.competition import get_competition
    from conftest import config_from_recipe

    comp = get_competition("cifar-10")
    fast = config_from_recipe(comp, "w", "r", recipe_name="fast", epochs=3).config
    assert (fast.model, fast.tta, fast.nesterov, fast.epochs) == ("fastnet", "flip", True, 3)
    with pytest.raises(PipelineError, match="no recipe 'nope'; choose one of: default, fast, resnet18"):
        config_from_recipe(comp, "w", "r", recipe_name="nope")
