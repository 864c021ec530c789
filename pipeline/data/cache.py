"""Fast data paths: decoded-image caches, batch augmentation on the device, feature caches.

- Small images (CIFAR-sized): every image is decoded once into a uint8 array
  (N, H, W, 3) memory-mapped from WORK_DIR/cache/, keyed on the files it was
  built from, so a changed input builds a new one. Training then reads batches
  straight from that array (resident on the GPU when there is one) and does
  crop, flip and normalisation on whole batches: no per-image Python, no
  DataLoader workers.
- Frozen backbones: the backbone's pooled features of every image (one
  un-augmented view and N augmented ones) are computed once and cached; the
  head then trains on those vectors.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch

from pipeline.data.items import BAD_TARGET, Item, read_image
from pipeline.devices import non_blocking, probe
from pipeline.errors import PipelineError
from pipeline.models.inference import autocast
from pipeline.io import allocate, atomic_path, atomic_write_json
from pipeline.progress import track

log = logging.getLogger("pipeline")

CACHE_DIR = "cache"
MAX_CACHED_SIDE = 64  # "auto" caches images up to this side; larger ones stream from disk


def items_key(items: list[Item], *extra) -> str:
    """A digest of the files behind ``items`` (name, size, mtime) and any extra settings."""
    digest = hashlib.sha256(json.dumps([str(e) for e in extra]).encode())
    for it in items:
        st = os.stat(it.path)
        digest.update(f"{it.id}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def _decode_chunk(job: tuple[list[str], int, str, int]) -> list[str]:
    """Decode paths into rows [start, start+len) of the memmap; returns unreadable paths."""
    paths, side, out_path, start = job
    array = np.load(out_path, mmap_mode="r+")
    bad = []
    for offset, path in enumerate(paths):
        try:
            image = read_image(Path(path), min_side=side)
        except Exception:  # noqa: BLE001 - any decode failure marks the row
            bad.append(path)
            continue
        if image.shape[:2] != (side, side):
            image = cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA)
        array[start + offset] = image
    array.flush()
    return bad


def image_cache(work_dir: Path, items: list[Item], side: int, workers: int = 0) -> tuple[np.ndarray, set[int]]:
    """The (N, side, side, 3) uint8 array of ``items`` (memory-mapped) and unreadable rows.

    Built once, in parallel processes, into a temporary file renamed into
    place; later calls with the same files and side only map it.
    """
    key = items_key(items, side, "rgb-uint8-v1")
    folder = Path(work_dir) / CACHE_DIR
    path, bad_path = folder / f"images-{side}-{key}.npy", folder / f"images-{side}-{key}.bad.json"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(items), side, side, 3)).flush()
            allocate(tmp, tmp.stat().st_size)  # a full disk is an error now, not a SIGBUS in a decoding process
            chunk = 2048
            jobs = [([str(it.path) for it in items[i:i + chunk]], side, str(tmp), i) for i in range(0, len(items), chunk)]
            workers = workers or min(8, os.cpu_count() or 1)
            with ProcessPoolExecutor(max_workers=workers) as pool:
                done = track(zip(jobs, pool.map(_decode_chunk, jobs)), "caching images", len(items),
                             count=lambda job_bad: len(job_bad[0][0]))
                bad = [p for _, part in done for p in part]
            atomic_write_json(bad_path, bad)
        log.info("cached %d images at %dx%d in %s", len(items), side, side, path)
    bad = set(json.loads(bad_path.read_text())) if bad_path.is_file() else set()
    rows = {i for i, it in enumerate(items) if str(it.path) in bad}
    return np.load(path, mmap_mode="r"), rows


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

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        per_rank = -(-self.n // self.world)
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def batches(self):
        """Yields (CPU index tensor, generator for this pass's augmentation)."""
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=gen) if self.shuffle else torch.arange(self.n)
        if self.world > 1:
            padded = -(-self.n // self.world) * self.world
            order = torch.cat([order, order[: padded - self.n]])[self.rank :: self.world]
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


def cached_targets(items: list[Item], bad_rows: set[int]) -> torch.Tensor:
    """Targets of cached items, unreadable rows marked so the loss and the scores ignore them."""
    targets = torch.tensor([it.target for it in items], dtype=torch.long)
    if bad_rows:
        targets[sorted(bad_rows)] = BAD_TARGET
    return targets


def check_cacheable(augment: str, side: int) -> None:
    if augment not in ("pad_crop_flip", "none"):
        raise PipelineError(f"--cache on needs --augment pad_crop_flip or none (got {augment}); use --cache off")
    if side > 256:
        raise PipelineError(f"--cache on at {side} px would need too much memory; use --cache off")


# ---------------------------------------------------------------- frozen-backbone features


class FeatureHead(torch.nn.Module):
    """Runs only the head of ``wrapped_model`` on pooled feature vectors (B, F).

    The checkpoint is still the whole model (distributed.unwrap returns it),
    so predict needs nothing special.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.wrapped_model = model

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        model = self.wrapped_model
        if hasattr(model, "logits_from_pooled"):  # ours: the same head as the whole model's forward
            return model.logits_from_pooled(feats)
        rate = getattr(model, "drop_rate", 0.0) or 0.0  # timm: pooled (pre-logits) features -> classifier
        return model.get_classifier()(torch.nn.functional.dropout(feats, rate, self.training))


@torch.no_grad()
def extract_features(model: torch.nn.Module, loader, device: torch.device, n: int, transform=None,
                     amp_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features (n, F) of the loader's images (after ``transform``, e.g. a TTA view) and targets (n,).

    ``amp_dtype`` is the run's autocast dtype (None: fp32): the cache, training,
    validation and predict all compute features at the one precision of the run.
    """
    out, targets = None, torch.zeros(n, dtype=torch.long)
    copy_async = non_blocking(probe(device))
    for x, y, idx in track(loader, "backbone features", n):
        x = x.to(device, non_blocking=copy_async)
        if transform is not None:
            x = transform(x)
        with autocast(device, amp_dtype):
            f = model.forward_head(model.forward_features(x), pre_logits=True)
        f = f.float().cpu()
        if out is None:
            out = torch.empty((n, f.shape[1]))
        out[idx] = f
        targets[idx] = torch.as_tensor(y)
    return out, targets


def feature_bank(model: torch.nn.Module, items: list[Item], make_loader_for, views: int, key_extra: list,
                 work_dir: Path, device: torch.device, amp_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Pooled backbone features of ``items``: 'eval' (N, F), 'views' (V, N, F) augmented, and
    'bad', the positions of images that could not be decoded (their rows are zeros).

    ``make_loader_for(train: bool, view: int)`` gives a loader over ``items`` in
    order (augmented with per-view seeds when train). Cached in WORK_DIR/cache
    under a key of the files, the model, its weights, the data settings and
    the precision ``amp_dtype`` they are computed in.
    """
    key = items_key(items, *key_extra, views, str(amp_dtype), "features-v2")
    path = Path(work_dir) / CACHE_DIR / f"features-{key}.pt"
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    was_training = model.training
    model.eval()
    feats, targets = extract_features(model, make_loader_for(False, 0), device, len(items), amp_dtype=amp_dtype)
    bank = {"eval": feats, "bad": torch.nonzero(targets == BAD_TARGET).flatten()}  # unreadable images
    bank["views"] = torch.stack([extract_features(model, make_loader_for(True, v), device, len(items),
                                                  amp_dtype=amp_dtype)[0]
                                 for v in range(views)]) if views else bank["eval"][None]
    model.train(was_training)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(bank, tmp)
    return bank


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
