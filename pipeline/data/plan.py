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

import dataclasses
import logging
import math
import os
from functools import partial
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline import distributed as dist
from pipeline.data.cache import MAX_CACHED_SIDE, cache_path, image_cache, items_key, stored_tensors
from pipeline.data.features import feature_bank
from pipeline.data.views import eval_geometry, eval_sizes, eval_transform, trains_geometry
from pipeline.data.loaders import FeatureLoader, TensorBatchLoader, make_loader
from pipeline.config import CACHEABLE_AUGMENTS, TrainConfig
from pipeline.devices import DevicePlan, ddp_find_unused, inference_batch
from pipeline.models.task import bad_mask, target_tensor
from pipeline.models.views import is_plain
from pipeline.workdir import BAD_TARGET
from pipeline.data.items import (ImageDataset, Item, build_transform, list_split, load_reorg,
                                 unreadable_message)
from pipeline.errors import PipelineError, tta_views
from pipeline.io import atomic_path
from pipeline.models.heads import FeatureHead
from pipeline.workdir import CACHE_DIR

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
    if cfg.cache == "on":  # the config refused augmentations and sides the cache cannot take
        return Source("image_cache", "--cache on")
    if cfg.cache == "auto" and cfg.image_size <= MAX_CACHED_SIDE and cfg.augment in CACHEABLE_AUGMENTS:
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
                device: torch.device, dplan: DevicePlan, meta=None, weights: torch.Tensor | None = None) -> DataPlan:
    """The member's training and validation loaders from the chosen source; ``dplan``: the member's device plan.

    ``meta`` (items -> encoded metadata (N, M), pipeline/data/metadata.py) gives each loader its ``meta`` table,
    one row per position, which the loops hand to the model with each batch. ``weights`` (one per training
    item): the training sampler draws with replacement in proportion to them.
    """
    source = choose_source(cfg)
    log.info("data: %s (%s)", source.kind, source.reason)
    if source.kind == "features":
        plan = _feature_plan(cfg, model, train_items, valid_items, device, source, dplan)
    elif source.kind == "image_cache":
        plan = _cached_plan(cfg, train_items, valid_items, device, source, dplan)
    else:
        plan = _file_plan(cfg, train_items, valid_items, device, source, dplan)
    plan.find_unused = ddp_find_unused(source.kind, bool(getattr(model, "aux_loss_weights", ())))
    if weights is not None:  # --balance sampler: rare classes drawn as often as common ones
        plan.train.sampler.weights = weights
    if meta is not None:
        plan.train.meta = meta(train_items)
        if plan.valid is not None:
            plan.valid.meta = meta(valid_items)
    return plan


def _file_plan(cfg: TrainConfig, train_items, valid_items, device, source: Source, dplan: DevicePlan) -> DataPlan:
    rank, world = dist.rank(), dist.world_size()
    train_tf = build_transform(cfg.augment, cfg.image_size, cfg.mean, cfg.std, train=True, seed=cfg.seed)
    train_dl = make_loader(ImageDataset(train_items, train_tf, cfg.image_size, strict=cfg.strict), cfg.batch_size,
                           True, dplan.workers, cfg.seed, drop_last=True, pin_memory=dplan.pin_memory, rank=rank,
                           world=world)
    return DataPlan(source, train_dl, _valid_files(cfg, valid_items, device, dplan), lambda m: m, dplan)


def _valid_files(cfg: TrainConfig, valid_items: list[Item], device, dplan: DevicePlan):
    """The validation images through the run's evaluation (test size, views' scales), sharded like training."""
    if not valid_items:
        return None
    world = dist.world_size()
    batch = inference_batch(test_sized(cfg, cfg.tta), device, workers=dplan.workers,
                            half_precision=dplan.dtype is not None, processes=world)
    return eval_loader(cfg, valid_items, batch, dplan, strict=cfg.strict, rank=dist.rank(), world=world)


def eval_loader(cfg: TrainConfig, items: list[Item], batch_size: int, dplan: DevicePlan | torch.device, *,
                strict: bool, rank: int = 0, world: int = 1, tta: str | None = None):
    """Images of ``items`` in order through the run's eval transform (no randomness), at the test size and
    each scale the views of ``tta`` (default: the run's) need (pipeline/data/views.py).

    ``dplan`` is a plan for image files (or the device to plan for): its workers
    and memory pinning feed the loader.
    """
    if isinstance(dplan, torch.device):
        dplan = dist.plan_for(cfg, dplan, "files")
    eval_tf, side = eval_transform(cfg, cfg.tta if tta is None else tta)
    return make_loader(ImageDataset(items, eval_tf, side, strict=strict), batch_size, False, dplan.workers,
                       0, pin_memory=dplan.pin_memory, rank=rank, world=world)


def _rows_of(items: list[Item], pool: list[Item]) -> torch.Tensor:
    """Positions of ``items`` in ``pool`` (by key: a pool of training and test images may hold an id twice):
    members select from one shared cache."""
    where = {it.key: i for i, it in enumerate(pool)}
    return torch.tensor([where[it.key] for it in items], dtype=torch.long)


def _unreadable_rows(cfg: TrainConfig, pool: list[Item], bad: set[int], train_items: list[Item],
                     valid_items: list[Item]) -> set[int]:
    """Training positions of the pool's unreadable images: an error under --strict, else a warning."""
    bad_keys = {pool[i].key for i in bad}
    bad_train = {j for j, it in enumerate(train_items) if it.key in bad_keys}
    if cfg.strict and (bad_train or any(it.key in bad_keys for it in valid_items)):
        first = next(it for it in [*train_items, *valid_items] if it.key in bad_keys)
        raise PipelineError(f"cannot read image {first.path} (id {first.id!r}); replace or remove the file "
                            f"({len(bad_keys)} unreadable)")
    if bad_train:
        log.warning("skipping %s", unreadable_message(train_items, bad_train, "training images"))
    return bad_train


def cache_root(cfg: TrainConfig) -> Path:
    """The folder whose cache/ holds the caches: WORK_DIR when writable, else RUN_DIR (a read-only work dir)."""
    cache = Path(cfg.work_dir) / CACHE_DIR
    if os.access(cache if cache.is_dir() else cfg.work_dir, os.W_OK | os.X_OK):
        return Path(cfg.work_dir)
    log.info("%s is read-only: caches go to %s", cfg.work_dir, Path(cfg.run_dir) / CACHE_DIR)
    return Path(cfg.run_dir)


def cached_targets(items: list[Item], bad_rows: set[int]) -> torch.Tensor:
    """Targets of cached items, unreadable rows marked so the loss and the scores ignore them."""
    targets = target_tensor([it.target for it in items])
    if bad_rows:
        targets[sorted(bad_rows)] = BAD_TARGET if targets.ndim == 1 else math.nan
    return targets


def test_sized(cfg: TrainConfig, tta: str) -> TrainConfig:
    """``cfg`` at the largest side its evaluation decodes: what the inference batch's memory budget needs."""
    return dataclasses.replace(cfg, image_size=max(eval_sizes(cfg, tta)))


def backbone_key(cfg: TrainConfig) -> list:
    """What a frozen backbone's features depend on: model, weights (by file stat) and image settings."""
    weights = cfg.weights and os.stat(cfg.weights)
    return [cfg.model, cfg.pretrained, str(cfg.weights), weights and weights.st_size,
            weights and weights.st_mtime_ns, cfg.image_size, cfg.mean, cfg.std, cfg.augment]


def feature_key(cfg: TrainConfig, pool: list[Item], amp_dtype: torch.dtype | None) -> str:
    """The feature cache's key: the pool's files, the backbone, its augmented views and their seed, and
    the precision (features computed in another dtype differ)."""
    return items_key(pool, *backbone_key(cfg), cfg.seed, cfg.feature_views, str(amp_dtype), "features-v2")


def _pooled_plan(cfg: TrainConfig, train_items: list[Item], valid_items: list[Item], source: Source,
                 dplan: DevicePlan, pool: list[Item], bad: set[int], loader, view) -> DataPlan:
    """Loaders cut from one cache over the pool (train_valid, then the test images when some training rows are
    pseudo-labelled test images): rows selected by id, unreadable rows marked.

    ``loader(rows, targets, train)`` makes the loader over the cached rows and their targets; ``view`` wraps
    the model to take it. Training targets are the training items' own (a teacher may have mixed them).
    """
    bad_train = _unreadable_rows(cfg, pool, bad, train_items, valid_items)
    # unreadable images are left out of the loss and the scores
    train_dl = loader(_rows_of(train_items, pool), cached_targets(train_items, bad_train), True)
    valid_rows = _rows_of(valid_items, pool)
    valid_dl = loader(valid_rows, cached_targets(pool, bad)[valid_rows], False) if valid_items else None
    return DataPlan(source, train_dl, valid_dl, view, dplan, bad_train)


def cache_pools(cfg: TrainConfig, train_items: list[Item]) -> list[list[Item]]:
    """The pools a member's caches are built over: train_valid, and the test split when training rows come
    from it (--pseudo-label); each pool has its own cache, shared by every run on the work folder."""
    info = load_reorg(cfg.work_dir)
    pool = list_split(cfg.work_dir, info, "train_valid")
    if not any(it.test for it in train_items):
        return [pool]
    return [pool, list_split(cfg.work_dir, info, "test")]


def _cached_plan(cfg: TrainConfig, train_items, valid_items, device, source: Source, dplan: DevicePlan) -> DataPlan:
    pools, arrays, bad = cache_pools(cfg, train_items), [], set()
    for part in pools:
        array, part_bad = dist.main_first(partial(image_cache, cache_root(cfg), part, cfg.image_size))
        bad |= {sum(len(a) for a in arrays) + i for i in part_bad}  # positions in the joined pool
        arrays.append(np.array(array))  # into memory (or on to the GPU) once per member
    pool = [it for part in pools for it in part]
    images = torch.from_numpy(arrays[0] if len(arrays) == 1 else np.concatenate(arrays))
    common = dict(mean=cfg.mean, std=cfg.std, device=device, rank=dist.rank(), world=dist.world_size(),
                  channels_last=dplan.channels_last)

    def loader(rows, targets, train: bool):
        if train:
            return TensorBatchLoader(images[rows], targets, cfg.batch_size, shuffle=True, seed=cfg.seed,
                                     drop_last=True, augment=cfg.augment, **common)
        return TensorBatchLoader(images[rows], targets, cfg.batch_size * 2, shuffle=False, augment="none",
                                 **common)

    plan = _pooled_plan(cfg, train_items, valid_items, source, dplan, pool, bad, loader, lambda m: m)
    if valid_items and not trains_geometry(cfg, cfg.tta):  # views at other sides: validated on the files, as OOF
        files = dist.plan_for(cfg, device, "files")
        plan.valid = _valid_files(cfg, valid_items, device, dataclasses.replace(dplan, workers=files.workers,
                                                                               pin_memory=files.pin_memory))
    return plan


def _feature_plan(cfg: TrainConfig, model, train_items, valid_items, device, source: Source,
                  dplan: DevicePlan) -> DataPlan:
    pools = cache_pools(cfg, train_items)
    files = dist.plan_for(cfg, device, "files")  # the backbone reads image files once: their workers and pinning
    batch = inference_batch(cfg, device, workers=files.workers, half_precision=dplan.dtype is not None)
    banks = []
    for part in pools:
        path = cache_path(cache_root(cfg), "features", feature_key(cfg, part, dplan.dtype))
        sets = [ImageDataset(part, build_transform(cfg.augment, cfg.image_size, cfg.mean, cfg.std, train=train,
                                                   seed=cfg.seed), cfg.image_size, strict=cfg.strict)
                for train in (False, True)]  # eval, train transforms: read only when the cache is built
        # handed over whole: the cache calls the feature extractor, never back into this module
        build = partial(feature_bank, model, *sets, cfg.feature_views, batch_size=batch,
                        workers=files.workers, pin_memory=files.pin_memory, seed=cfg.seed, device=device,
                        amp_dtype=dplan.dtype, channels_last=files.channels_last)
        banks.append(dist.main_first(partial(stored_tensors, path, build)))
    bank = banks[0] if len(banks) == 1 else joined_banks(banks)
    pool = [it for part in pools for it in part]
    common = dict(device=device, rank=dist.rank(), world=dist.world_size())

    def loader(rows, targets, train: bool):
        if train:
            return FeatureLoader(bank["views"][:, rows], targets, cfg.batch_size, shuffle=True, seed=cfg.seed,
                                 drop_last=True, **common)
        return FeatureLoader(bank["eval"][None, rows], targets, cfg.batch_size * 2, shuffle=False, **common)

    return _pooled_plan(cfg, train_items, valid_items, source, dplan, pool, set(bank["bad"].tolist()), loader,
                        FeatureHead)


def joined_banks(banks: list[dict]) -> dict:
    """Feature banks of consecutive pools as one: rows appended, unreadable positions shifted."""
    offsets = np.cumsum([0] + [len(b["eval"]) for b in banks])[:-1]
    return {"eval": torch.cat([b["eval"] for b in banks]), "views": torch.cat([b["views"] for b in banks], dim=1),
            "bad": torch.cat([b["bad"] + int(o) for b, o in zip(banks, offsets)])}


# ---------------------------------------------------------------- inference inputs


def cached_views(cfg: TrainConfig, items: list[Item], tta: str, amp_dtype: torch.dtype | None,
                 compute: Callable[[list[Item]], tuple[torch.Tensor, torch.Tensor]] | None = None,
                 strict: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The features (V, N, F) of the views of ``tta`` of ``items`` and their targets (N,) from a feature cache
    over the pool (train_valid), when ``items`` are images of the pool (the same files), the backbone frozen
    and cached; else None, and the caller runs the backbone.

    One plain view at the training geometry: the un-augmented features the member trained and validated on
    (the training cache). Other views (flip, d4, scales, a test size): a cache of the pool's view features
    keyed on the views and the test geometry as well; the rows it lacks are computed by ``compute(items)``
    (-> (V, n, F), targets) and added (without ``compute``: None). Either way each image and view goes
    through the backbone once, whichever folds, members and runs ask; test images are not in the pool.
    ``strict``: None when a row is unreadable (the caller then reads the files and says which).
    """
    if not (cfg.freeze_backbone and cfg.feature_cache):
        return None
    try:
        pool = list_split(cfg.work_dir, load_reorg(cfg.work_dir), "train_valid")
    except (PipelineError, OSError):
        return None
    where = {it.id: i for i, it in enumerate(pool)}
    if any(it.id not in where or pool[where[it.id]].path != it.path for it in items):
        return None
    plain = is_plain(tta) and trains_geometry(cfg, tta)
    try:
        path = cache_path(cache_root(cfg), "features" if plain else "views",
                          feature_key(cfg, pool, amp_dtype) if plain else view_key(cfg, pool, tta, amp_dtype))
    except OSError:  # the weights file the key stats has gone
        return None
    rows = torch.tensor([where[it.id] for it in items], dtype=torch.long)
    if plain or compute is None:
        if not path.is_file():
            return None
        bank = stored_tensors(path, dict)
        bad = set(bank["bad"].tolist())
        views = bank["eval"][None] if plain else bank["views"]
        if not plain and not bank["done"][rows].all():
            return None
    else:
        views, bad = _add_views(path, pool, rows, compute)
    if strict and bad & set(rows.tolist()):
        return None
    log.info("data: features of %d images read from the feature cache %s", len(items), path.name)
    return views[:, rows], cached_targets(pool, bad)[rows]


def _add_views(path: Path, pool: list[Item], rows: torch.Tensor, compute) -> tuple[torch.Tensor, set[int]]:
    """The view cache at ``path`` with ``rows`` of the pool computed where it lacks them (saved atomically):
    all its views (V, N, F) and the pool positions of unreadable images."""
    bank = stored_tensors(path, dict) if path.is_file() else {}
    done = bank.get("done", torch.zeros(len(pool), dtype=torch.bool))
    missing = rows[~done[rows]].unique()
    if len(missing):
        views, targets = compute([pool[i] for i in missing.tolist()])
        if "views" not in bank:
            bank["views"], bank["bad"] = torch.zeros(len(views), len(pool), views.shape[2]), torch.zeros(0).long()
        bank["views"][:, missing] = views
        bank["bad"] = torch.cat([bank["bad"], missing[bad_mask(targets)]])
        bank["done"] = done.index_fill(0, missing, True)
        with atomic_path(path) as tmp:
            torch.save(bank, tmp)
    return bank["views"], set(bank["bad"].tolist())


def view_key(cfg: TrainConfig, pool: list[Item], tta: str, amp_dtype: torch.dtype | None) -> str:
    """The view feature cache's key: the pool's files, the backbone, the views and the test geometry (side,
    crop: a changed --tta or --test-size never reads another's features), and the precision."""
    return items_key(pool, *backbone_key(cfg), tta_views(tta), eval_geometry(cfg), str(amp_dtype), "views-v1")


def shared_backbone_groups(configs: list[TrainConfig], dtypes: list | None = None) -> list[list[int]]:
    """Indices of members grouped so that each group's frozen backbone is run once.

    Members with a frozen backbone, equal :func:`backbone_key` and equal
    precision (``dtypes``, one per member) share one group; every other member
    is a group of its own.
    """
    dtypes = dtypes or [None] * len(configs)
    groups: dict[str, list[int]] = {}
    for i, cfg in enumerate(configs):
        key = repr([*backbone_key(cfg), cfg.test_size, str(dtypes[i])]) if cfg.freeze_backbone else f"own-{i}"
        groups.setdefault(key, []).append(i)
    return list(groups.values())


