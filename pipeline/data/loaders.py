"""Every iterable that yields batches ``(x, y, positions)``: over image files, a decoded-image array, or features.

One ordering rule (:func:`epoch_order`) serves them all: a permutation fixed
by (seed, epoch), sharded under DDP. Positions index the items the loader was
made from, so callers map outputs back to ids.
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from pipeline.data.items import ImageDataset
from pipeline.data.shm import loader_workers


def epoch_order(n: int, shuffle: bool, seed: int, epoch: int, rank: int = 0,
                world: int = 1, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Generator]:
    """The order of ``n`` samples in pass ``epoch`` for this rank, and the generator that drew it.

    Under DDP each rank takes every world-th index of the permutation, padded
    with its first indices to equal length. The generator goes on to draw
    the pass's batch augmentation (:class:`TensorBatchLoader`). With ``weights``
    (--balance sampler) the pass draws n samples with replacement, each in
    proportion to its weight, instead of a permutation.
    """
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    if shuffle and weights is not None:
        order = torch.multinomial(weights.double(), n, replacement=True, generator=gen)
    else:
        order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
    if world > 1:
        padded = -(-n // world) * world
        order = torch.cat([order, order[: padded - n]])[rank::world]
    return order, gen


class EpochSampler(torch.utils.data.Sampler):
    """Yields (index, seed) pairs: a permutation fixed by (seed, epoch), one seed per sample.

    Per-sample seeds make augmentation independent of the worker count and
    let workers persist across epochs (call ``set_epoch``). Under DDP each rank
    takes every world-th index of the permutation, padded to equal length.
    """

    def __init__(self, n: int, shuffle: bool, seed: int, rank: int = 0, world: int = 1):
        self.n, self.shuffle, self.seed, self.rank, self.world = n, shuffle, seed, rank, world
        self.epoch = 0
        self.weights = None  # --balance sampler: per-sample weights (set by the data plan)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order, _ = epoch_order(self.n, self.shuffle, self.seed, self.epoch, self.rank, self.world, self.weights)
        gen = torch.Generator().manual_seed(self.seed * 7919 + self.epoch * 104_729 + 1)
        seeds = torch.randint(0, 2**31 - 1, (self.n,), generator=gen)
        return iter([(int(i), int(seeds[i])) for i in order])

    def __len__(self) -> int:
        return -(-self.n // self.world) if self.world > 1 else self.n


def make_loader(dataset: ImageDataset, batch_size: int, shuffle: bool, num_workers: int, seed: int,
                drop_last: bool = False, pin_memory: bool = False, rank: int = 0, world: int = 1) -> DataLoader:
    """A DataLoader whose order and augmentation are fixed by ``seed`` and the epoch.

    Workers persist across epochs; call ``loader.sampler.set_epoch(epoch)``
    before each pass.
    """
    sampler = EpochSampler(len(dataset), shuffle, seed, rank, world)
    num_workers = loader_workers(num_workers, batch_size * 3 * dataset.image_size ** 2 * 4, 4)  # what /dev/shm holds
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
    )


class IndexBatches:
    """Batches of indices into N samples: order fixed by (seed, epoch), sharded under DDP.

    Call ``set_epoch`` before each pass (the training loop reaches it as
    ``loader.sampler.set_epoch``, as for a DataLoader).
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int, drop_last: bool, rank: int, world: int):
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.drop_last, self.rank, self.world = drop_last, rank, world
        self.epoch = 0
        self.sampler = self
        self.weights = None  # --balance sampler: per-sample weights (set by the data plan)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        per_rank = -(-self.n // self.world)
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def batches(self):
        """Yields (CPU index tensor, generator for this pass's augmentation)."""
        order, gen = epoch_order(self.n, self.shuffle, self.seed, self.epoch, self.rank, self.world, self.weights)
        for b in range(len(self)):
            yield order[b * self.batch_size : (b + 1) * self.batch_size], gen


class TensorBatchLoader(IndexBatches):
    """Batches of (x, y, index) cut from a uint8 image tensor, augmented per batch.

    ``augment`` is pad_crop_flip (random translation by up to side/8 px with
    zero padding, horizontal flip) or none; then normalisation, on the device.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, batch_size: int, *, shuffle: bool,
                 augment: str, mean, std, device: torch.device, seed: int = 0, drop_last: bool = False,
                 rank: int = 0, world: int = 1, channels_last: bool = False):
        super().__init__(len(images), batch_size, shuffle, seed, drop_last, rank, world)
        self.images = images.to(device)  # (N, H, W, 3) uint8, resident
        self.targets = targets.to(device)
        self.augment, self.device, self.channels_last = augment, device, channels_last
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255

    def __iter__(self):
        for idx, gen in self.batches():
            dev_idx = idx.to(self.device, non_blocking=True)
            # contiguous before float: a permuted float tensor keeps channels-last strides
            # and makes every later op (pad, gather) slow
            x = self.images.index_select(0, dev_idx).permute(0, 3, 1, 2).contiguous().float()  # (B, 3, H, W)
            if self.augment == "pad_crop_flip":
                x = batch_crop_flip(x, gen)
            x = (x - self.mean) / self.std
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.targets[dev_idx], idx


def batch_crop_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random translation (zero padding, up to side/8 px) and horizontal flip of a batch.

    One gather over flattened pixel indices: no per-image loop and no host sync.
    """
    b, c, h, w = x.shape
    pad = max(1, h // 8)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen).to(x.device)
    flip = (torch.rand(b, generator=gen) < 0.5).to(x.device)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = torch.arange(h, device=x.device)[None, :] + dy[:, None]  # (B, H)
    cols = torch.arange(w, device=x.device)[None, :].expand(b, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols) + dx[:, None]  # (B, W)
    flat = (rows[:, :, None] * (w + 2 * pad) + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
    return padded.reshape(b, c, -1).gather(2, flat).reshape(b, c, h, w)


class FeatureLoader(IndexBatches):
    """Batches of (features, y, index); epoch e trains on augmented view e mod V."""

    def __init__(self, views: torch.Tensor, targets: torch.Tensor, batch_size: int, *, shuffle: bool,
                 device: torch.device, seed: int = 0, drop_last: bool = False, rank: int = 0, world: int = 1):
        super().__init__(views.shape[1], batch_size, shuffle, seed, drop_last, rank, world)
        self.views = views.to(device)  # (V, N, F)
        self.targets = targets.to(device)
        self.device = device

    def __iter__(self):
        feats = self.views[self.epoch % len(self.views)]
        for idx, _ in self.batches():
            dev_idx = idx.to(self.device, non_blocking=True)
            yield feats[dev_idx], self.targets[dev_idx], idx


class FeatureViews:
    """Batches (features (V, B, F), targets, positions) over features computed once."""

    def __init__(self, views: torch.Tensor, targets: torch.Tensor, batch_size: int):
        self.views, self.targets, self.batch_size = views, targets, batch_size  # (V, N, F), (N,)

    def __iter__(self):
        for start in range(0, self.views.shape[1], self.batch_size):
            idx = torch.arange(start, min(start + self.batch_size, self.views.shape[1]))
            yield self.views[:, idx], self.targets[idx], idx

    def __len__(self) -> int:
        return -(-self.views.shape[1] // self.batch_size)


