"""The data plan: for each member, what the model consumes and the loaders that feed it.

One place decides between three sources, and builds each cache once (under
torchrun rank 0 builds it while the others wait at a barrier):

- ``features``: a frozen backbone's pooled features, computed once per image
  and augmented view (WORK_DIR/cache); the head trains on them.
- ``image_cache``: small images decoded once into a uint8 array, augmented a
  batch at a time on the device.
- ``files``: images decoded and augmented per sample by DataLoader workers.

Inference (OOF, predict, predict-image) reads files through the eval
transform; members that share a frozen backbone run it once per image and TTA
view (:func:`shared_backbone_groups`). Batches are (x, y, positions); x is an
image batch (B, C, H, W) or features, (B, F) or (V, B, F) for V views.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline import distributed as dist
from pipeline.data.cache import (CACHE_DIR, MAX_CACHED_SIDE, FeatureHead, FeatureLoader, TensorBatchLoader, cached_targets,
                            check_cacheable, extract_features, feature_bank, image_cache)
from pipeline.config import TrainConfig
from pipeline.devices import DevicePlan, ddp_find_unused
from pipeline.data.items import ImageDataset, Item, build_transform, list_split, load_reorg, make_loader, unreadable_message
from pipeline.errors import PipelineError
from pipeline.models.inference import TTA_VIEWS

log = logging.getLogger("pipeline")


@dataclass(frozen=True)
class Source:
    """What a member's model consumes while training, and why."""

    kind: str  # features | image_cache | files
    reason: str


def choose_source(cfg: TrainConfig) -> Source:
    """Feature cache for frozen backbones, image cache for small images, else files (pure)."""
    if cfg.freeze_backbone and cfg.feature_cache:
        return Source("features", "frozen backbone: its features are computed once and the head trains on them")
    if cfg.cache == "on":
        check_cacheable(cfg.augment, cfg.image_size)
        return Source("image_cache", "--cache on")
    if cfg.cache == "auto" and cfg.image_size <= MAX_CACHED_SIDE and cfg.augment in ("pad_crop_flip", "none"):
        return Source("image_cache", f"images of side {cfg.image_size} <= {MAX_CACHED_SIDE}: decoded once, "
                                     "augmented on the device")
    return Source("files", "images decoded per sample by DataLoader workers")


@dataclass
class DataPlan:
    """A member's loaders (kept across epochs), how its model consumes them, and the device decisions."""

    source: Source
    train: object
    valid: object | None
    view: Callable[[nn.Module], nn.Module]  # wraps a model to take the loaders' inputs
    device: DevicePlan  # precision, channels_last, workers, pinning: pipeline/devices.py decides
    unreadable_train: set[int] = field(default_factory=set)  # positions in train_items, found up front
    find_unused: bool = False  # DDP: some trainable parameters get no gradient (aux heads under a feature head)

    @property
    def channels_last(self) -> bool:
        """Image batches (4-D) and the model in channels_last memory format."""
        return self.device.channels_last


def plan_member(cfg: TrainConfig, model: nn.Module, train_items: list[Item], valid_items: list[Item],
                device: torch.device, dplan: DevicePlan) -> DataPlan:
    """The member's training and validation loaders from the chosen source; ``dplan``: the member's device plan."""
    source = choose_source(cfg)
    log.info("data: %s (%s)", source.kind, source.reason)
    if source.kind == "features":
        plan = _feature_plan(cfg, model, train_items, valid_items, device, source, dplan)
    elif source.kind == "image_cache":
        plan = _cached_plan(cfg, train_items, valid_items, device, source, dplan)
    else:
        plan = _file_plan(cfg, train_items, valid_items, device, source, dplan)
    plan.find_unused = ddp_find_unused(source.kind, bool(getattr(model, "aux_loss_weights", ())))
    return plan


def _file_plan(cfg: TrainConfig, train_items, valid_items, device, source: Source, dplan: DevicePlan) -> DataPlan:
    rank, world = dist.rank(), dist.world_size()
    train_tf = build_transform(cfg.augment, cfg.image_size, cfg.mean, cfg.std, train=True, seed=cfg.seed)
    train_dl = make_loader(ImageDataset(train_items, train_tf, cfg.image_size, strict=cfg.strict), cfg.batch_size,
                           True, dplan.workers, cfg.seed, drop_last=True, pin_memory=dplan.pin_memory, rank=rank,
                           world=world)
    valid_dl = None
    if valid_items:
        valid_dl = eval_loader(cfg, valid_items, cfg.batch_size * 2, dplan, strict=cfg.strict, rank=rank, world=world)
    return DataPlan(source, train_dl, valid_dl, lambda m: m, dplan)


def eval_loader(cfg: TrainConfig, items: list[Item], batch_size: int, dplan: DevicePlan | torch.device, *,
                strict: bool, rank: int = 0, world: int = 1):
    """Images of ``items`` in order through the run's eval transform (no randomness).

    ``dplan`` is a plan for image files (or the device to plan for): its workers
    and memory pinning feed the loader.
    """
    if isinstance(dplan, torch.device):
        dplan = dist.plan_for(cfg, dplan, "files")
    eval_tf = build_transform(cfg.augment, cfg.image_size, cfg.mean, cfg.std, train=False)
    return make_loader(ImageDataset(items, eval_tf, cfg.image_size, strict=strict), batch_size, False, dplan.workers,
                       0, pin_memory=dplan.pin_memory, rank=rank, world=world)


def build_once(build: Callable[[], object]) -> object:
    """Run a cache builder on rank 0 alone; the others wait at a barrier, then read what it built.

    Only rank 0 writes the cache (no two writers, no rank tidying another's
    temporary file). If rank 0 fails, every rank stops instead of waiting.
    """
    if not dist.is_distributed():
        return build()
    if dist.is_main():
        try:
            result = build()
        except BaseException:
            dist.all_true(False)  # release the waiting ranks, then fail here with the real error
            raise
        dist.all_true(True)
        return result
    if not dist.all_true(True):
        raise PipelineError("rank 0 failed to build a cache; its error is above")
    return build()  # finds rank 0's file: reads it


def _rows_of(items: list[Item], pool: list[Item]) -> torch.Tensor:
    """Positions of ``items`` in ``pool`` (by id): members select from one shared cache."""
    where = {it.id: i for i, it in enumerate(pool)}
    return torch.tensor([where[it.id] for it in items], dtype=torch.long)


def _unreadable_rows(cfg: TrainConfig, pool: list[Item], bad: set[int], train_items: list[Item],
                     valid_items: list[Item]) -> tuple[set[int], set[str]]:
    """Training positions and ids of the pool's unreadable images: an error under --strict, else a warning."""
    bad_ids = {pool[i].id for i in bad}
    bad_train = {j for j, it in enumerate(train_items) if it.id in bad_ids}
    if cfg.strict and (bad_train or any(it.id in bad_ids for it in valid_items)):
        first = next(it for it in [*train_items, *valid_items] if it.id in bad_ids)
        raise PipelineError(f"cannot read image {first.path} (id {first.id!r}); replace or remove the file "
                            f"({len(bad_ids)} unreadable)")
    if bad_train:
        log.warning("skipping %s", unreadable_message(train_items, bad_train, "training images"))
    return bad_train, bad_ids


def cache_root(cfg: TrainConfig) -> Path:
    """The folder whose cache/ holds the caches: WORK_DIR when writable, else RUN_DIR (a read-only work dir)."""
    cache = Path(cfg.work_dir) / CACHE_DIR
    if os.access(cache if cache.is_dir() else cfg.work_dir, os.W_OK | os.X_OK):
        return Path(cfg.work_dir)
    log.info("%s is read-only: caches go to %s", cfg.work_dir, Path(cfg.run_dir) / CACHE_DIR)
    return Path(cfg.run_dir)


def _cached_plan(cfg: TrainConfig, train_items, valid_items, device, source: Source, dplan: DevicePlan) -> DataPlan:
    info = load_reorg(cfg.work_dir)
    pool = list_split(cfg.work_dir, info, "train_valid")
    array, bad = build_once(lambda: image_cache(cache_root(cfg), pool, cfg.image_size))
    bad_train, _ = _unreadable_rows(cfg, pool, bad, train_items, valid_items)
    images = torch.from_numpy(np.array(array))  # into memory (or on to the GPU) once per member
    targets = cached_targets(pool, bad)
    common = dict(augment=cfg.augment, mean=cfg.mean, std=cfg.std, device=device, rank=dist.rank(),
                  world=dist.world_size(), channels_last=dplan.channels_last)
    rows = _rows_of(train_items, pool)
    train_dl = TensorBatchLoader(images[rows], targets[rows], cfg.batch_size, shuffle=True, seed=cfg.seed,
                                 drop_last=True, **common)
    valid_dl = None
    if valid_items:
        rows = _rows_of(valid_items, pool)
        valid_dl = TensorBatchLoader(images[rows], targets[rows], cfg.batch_size * 2, shuffle=False,
                                     **{**common, "augment": "none"})
    return DataPlan(source, train_dl, valid_dl, lambda m: m, dplan, bad_train)


def backbone_key(cfg: TrainConfig) -> list:
    """What a frozen backbone's features depend on: model, weights (by file stat) and image settings."""
    weights = cfg.weights and os.stat(cfg.weights)
    return [cfg.model, cfg.pretrained, str(cfg.weights), weights and weights.st_size,
            weights and weights.st_mtime_ns, cfg.image_size, cfg.mean, cfg.std, cfg.augment]


def _feature_plan(cfg: TrainConfig, model, train_items, valid_items, device, source: Source,
                  dplan: DevicePlan) -> DataPlan:
    info = load_reorg(cfg.work_dir)
    pool = list_split(cfg.work_dir, info, "train_valid")
    train_tf = build_transform(cfg.augment, cfg.image_size, cfg.mean, cfg.std, train=True, seed=cfg.seed)
    eval_tf = build_transform(cfg.augment, cfg.image_size, cfg.mean, cfg.std, train=False)

    files = dist.plan_for(cfg, device, "files")  # the backbone reads image files once: their workers and pinning

    def loader_for(train: bool, view: int):
        ds = ImageDataset(pool, train_tf if train else eval_tf, cfg.image_size, strict=cfg.strict)
        dl = make_loader(ds, 2 * cfg.batch_size, False, files.workers, cfg.seed + view, pin_memory=files.pin_memory)
        dl.sampler.set_epoch(view)
        return dl

    key = [*backbone_key(cfg), cfg.seed]  # feature_bank adds the dtype: features of another precision differ
    bank = build_once(lambda: feature_bank(model, pool, loader_for, cfg.feature_views, key, cache_root(cfg), device,
                                           amp_dtype=dplan.dtype))
    bad = set(bank["bad"].tolist())
    bad_train, _ = _unreadable_rows(cfg, pool, bad, train_items, valid_items)
    targets = cached_targets(pool, bad)  # unreadable images are left out of the loss and the scores
    rows = _rows_of(train_items, pool)
    common = dict(device=device, rank=dist.rank(), world=dist.world_size())
    train_dl = FeatureLoader(bank["views"][:, rows], targets[rows], cfg.batch_size, shuffle=True, seed=cfg.seed,
                             drop_last=True, **common)
    valid_dl = None
    if valid_items:
        rows = _rows_of(valid_items, pool)
        valid_dl = FeatureLoader(bank["eval"][None, rows], targets[rows], cfg.batch_size * 2, shuffle=False, **common)
    return DataPlan(source, train_dl, valid_dl, FeatureHead, dplan, bad_train)


# ---------------------------------------------------------------- inference inputs


def shared_backbone_groups(configs: list[TrainConfig], dtypes: list | None = None) -> list[list[int]]:
    """Indices of members grouped so that each group's frozen backbone is run once.

    Members with a frozen backbone, equal :func:`backbone_key` and equal
    precision (``dtypes``, one per member) share one group; every other member
    is a group of its own.
    """
    dtypes = dtypes or [None] * len(configs)
    groups: dict[str, list[int]] = {}
    for i, cfg in enumerate(configs):
        key = repr([*backbone_key(cfg), str(dtypes[i])]) if cfg.freeze_backbone else f"own-{i}"
        groups.setdefault(key, []).append(i)
    return list(groups.values())


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


def backbone_views(model: nn.Module, loader, device: torch.device, n: int, tta: str,
                   amp_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features (V, N, F) of every TTA view of the loader's images, and the targets (N,).

    ``amp_dtype`` is the run's precision: the head then sees features computed
    exactly as the ones it was trained on.
    """
    views, targets = [], torch.zeros(n, dtype=torch.long)
    for v in range(len(TTA_VIEWS[tta](torch.zeros(1, 1, 1, 1)))):
        feats, t = extract_features(model, loader, device, n, transform=lambda x, v=v: TTA_VIEWS[tta](x)[v],
                                    amp_dtype=amp_dtype)
        views.append(feats)
        targets = t
    return torch.stack(views), targets
