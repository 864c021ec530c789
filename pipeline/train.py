"""Training: one model on a holdout split, one per CV fold, or one on train_valid.

``train(cfg)`` is the entry point. Each trained model (a "member") lives in its
own folder with config.json, metrics.csv, last.pt (every epoch, for --resume)
and best.pt (best validation metric). Every epoch re-seeds all randomness from
(seed, epoch) and the learning rate is a pure function of the step, so a run
resumed from an epoch checkpoint replays exactly what an uninterrupted run does.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from pipeline import distributed as dist
from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.competition import Competition, get_competition
from pipeline.config import TrainConfig
from pipeline.cache import (MAX_CACHED_SIDE, FeatureHead, FeatureLoader, TensorBatchLoader, cached_targets,
                            check_cacheable, feature_bank, image_cache)
from pipeline.data import (BAD_TARGET, ImageDataset, Item, build_transform, fold_split, list_split, load_reorg,
                           make_loader, n_folds, unreadable_message)
from pipeline.errors import PipelineError
from pipeline.io import atomic_write_csv, atomic_write_json
from pipeline.metrics import is_better, score
from pipeline.models import compute_loss, create_model, freeze_backbone, param_groups, set_train_mode

log = logging.getLogger("pipeline")

DONE_FILE = "done.json"  # written when a member finishes; guards against overwriting


# ---------------------------------------------------------------- schedule


def lr_multiplier(step: int, total_steps: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """The factor applied to each group's base lr at optimizer step ``step`` (0-based)."""
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    if cfg.schedule == "onecycle":
        peak = max(1, int(0.3 * total_steps))
        if step < peak:
            return 0.04 + 0.96 * step / peak
        progress = (step - peak) / max(1, total_steps - peak)
        return 0.5 * (1 + math.cos(math.pi * progress)) + 1e-4
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "cosine":
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    if cfg.schedule == "step":
        return cfg.lr_decay ** ((step // steps_per_epoch) // cfg.lr_period_epochs)
    return 1.0


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD/Adam/AdamW over the model's groups (no weight decay on norms and biases)."""
    groups = param_groups(model, cfg.lr, cfg.weight_decay, cfg.backbone_lr_scale)
    if not any(g["params"] for g in groups):
        raise PipelineError("the model has no trainable parameters; drop --freeze-backbone or check --model")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    return optimizer.param_groups[-1]["lr"]


# ---------------------------------------------------------------- one epoch


def mix_batch(x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, gen: torch.Generator):
    """Mixup or cutmix (chosen at random when both are on); returns x, y_a, y_b, lam."""
    alphas = [a for a in (cfg.mixup, cfg.cutmix) if a > 0]
    if not alphas:
        return x, y, y, 1.0
    use_cutmix = cfg.cutmix > 0 and (cfg.mixup == 0 or torch.rand(1, generator=gen).item() < 0.5)
    alpha = cfg.cutmix if use_cutmix else cfg.mixup
    lam = float(torch.distributions.Beta(alpha, alpha).sample().item())
    perm = torch.randperm(x.shape[0], generator=gen).to(x.device)
    if use_cutmix:
        h, w = x.shape[-2:]
        cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        cy, cx = int(torch.randint(h, (1,), generator=gen)), int(torch.randint(w, (1,), generator=gen))
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
        x = x.clone()
        x[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        x = lam * x + (1 - lam) * x[perm]
    return x, y, y[perm], lam


@dataclass
class Runtime:
    """What the loop needs besides the config: device, precision, step count."""

    device: torch.device
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None
    steps_per_epoch: int
    total_steps: int
    step: int = 0

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)


def train_one_epoch(model: nn.Module, loader, optimizer, criterion, cfg: TrainConfig, rt: Runtime,
                    ema, epoch: int, gen: torch.Generator) -> tuple[float, int, set[int]]:
    """One pass; returns the mean training loss, the optimizer steps taken and unreadable positions."""
    set_train_mode(model, True)
    aux_weights = getattr(dist.unwrap(model), "aux_loss_weights", ())
    loss_sum = torch.zeros((), device=rt.device)  # summed on device: no host sync per step
    seen, first_step = 0, rt.step
    unreadable = []  # dataset positions whose image could not be decoded (file loaders only)
    start = time.perf_counter()
    bar = tqdm(loader, total=rt.steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
               leave=False, disable=None if dist.is_main() else True, dynamic_ncols=True)
    for i, (x, y, idx) in enumerate(bar):
        if i >= rt.steps_per_epoch:
            break
        if y.device.type == "cpu":  # checked before the copy: no host sync
            unreadable.append(idx[y == BAD_TARGET])
        x = x.to(rt.device, non_blocking=True)
        y = y.to(rt.device, non_blocking=True)
        if cfg.channels_last and rt.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        set_lr(optimizer, lr_multiplier(rt.step, rt.total_steps, rt.steps_per_epoch, cfg))
        x, y_a, y_b, lam = mix_batch(x, y, cfg, gen)
        with rt.autocast():
            out = model(x)
            loss = lam * compute_loss(out, y_a, criterion, aux_weights)
            if lam < 1:
                loss = loss + (1 - lam) * compute_loss(out, y_b, criterion, aux_weights)
        optimizer.zero_grad(set_to_none=True)
        backward_step(loss, optimizer, model, cfg, rt)
        if ema is not None:
            ema.update_parameters(dist.unwrap(model))
        rt.step += 1
        loss_sum += loss.detach() * x.shape[0]
        seen += x.shape[0]
        if i % 10 == 0 and bar.disable is False:
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", img_s=f"{seen / (time.perf_counter() - start):.0f}")
    total = dist.all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(seen), device=rt.device)]))
    if not torch.isfinite(total[0]):
        raise PipelineError(f"the training loss became {float(total[0])} in epoch {epoch + 1}: training diverged; "
                            "lower --lr or add --clip-grad 1")
    bad = {int(i) for part in unreadable for i in part}
    return float(total[0] / max(total[1], 1)), rt.step - first_step, bad


def backward_step(loss: torch.Tensor, optimizer, model: nn.Module, cfg: TrainConfig, rt: Runtime) -> None:
    """Backward, optional gradient clipping, optimizer step; GradScaler for fp16.

    No host sync here: a non-finite loss is caught once per epoch, from the sum.
    """
    if rt.scaler is not None:
        rt.scaler.scale(loss).backward()
        rt.scaler.unscale_(optimizer)
    else:
        loss.backward()
    if cfg.clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
    if rt.scaler is not None:
        rt.scaler.step(optimizer)
        rt.scaler.update()
    else:
        optimizer.step()


@torch.no_grad()
def evaluate(model: nn.Module, loader, rt: Runtime) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Softmax probabilities (N, C), targets (N,) and dataset positions (N,) over ``loader``.

    Under DDP each rank sees a shard; the shards are gathered and the padding
    repeats that DistributedSampler adds are dropped by position.
    """
    set_train_mode(model, False)
    probs, targets, positions = [], [], []
    for x, y, idx in loader:
        x = x.to(rt.device, non_blocking=True)
        if rt.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with rt.autocast():
            logits = model(x)
        probs.append(torch.softmax(logits.float(), dim=1))
        targets.append(y.to(rt.device))
        positions.append(idx.to(rt.device))
    p = dist.gather_cat(torch.cat(probs)).cpu().double().numpy()
    t = dist.gather_cat(torch.cat(targets)).cpu().numpy()
    i = dist.gather_cat(torch.cat(positions)).cpu().numpy()
    i, first = np.unique(i, return_index=True)
    return p[first], t[first], i


# ---------------------------------------------------------------- one member


def make_runtime(cfg: TrainConfig, device: torch.device, n_train: int) -> Runtime:
    """Precision and step counts: bf16 autocast on CUDA by default, nothing on CPU."""
    amp = cfg.amp
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "none"
    if device.type != "cuda":
        amp = "none"  # CPU autocast is slower than fp32 for these models
    dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    per_rank = math.ceil(n_train / dist.world_size())
    steps = max(1, per_rank // cfg.batch_size)  # drop_last: every step a full batch
    if cfg.steps_per_epoch:
        steps = min(steps, cfg.steps_per_epoch)
    return Runtime(device, dtype, scaler, steps, steps * cfg.epochs)


def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    model = create_model(cfg.model, num_classes, pretrained=cfg.pretrained, weights=cfg.weights,
                         head=cfg.head, head_hidden=cfg.head_hidden, drop_rate=cfg.drop_rate)
    if cfg.freeze_backbone:
        freeze_backbone(model)
    return model


@dataclass
class DataPlan:
    """The member's loaders (persistent across epochs) and how the model consumes them."""

    train: object
    valid: object | None
    view: Callable[[nn.Module], nn.Module]  # wraps a model to take the loaders' inputs
    unreadable_train: set[int] = field(default_factory=set)  # positions in train_items, found up front


def use_image_cache(cfg: TrainConfig) -> bool:
    if cfg.cache == "off":
        return False
    if cfg.cache == "on":
        check_cacheable(cfg.augment, cfg.image_size)
        return True
    return cfg.image_size <= MAX_CACHED_SIDE and cfg.augment in ("pad_crop_flip", "none")


def plan_data(cfg: TrainConfig, model: nn.Module, train_items: list[Item], valid_items: list[Item],
              device: torch.device) -> DataPlan:
    """Feature cache for frozen backbones, image cache for small images, else files."""
    if cfg.freeze_backbone and cfg.feature_cache:
        return _feature_plan(cfg, model, train_items, valid_items, device)
    if use_image_cache(cfg):
        return _cached_plan(cfg, train_items, valid_items, device)
    rank, world = dist.rank(), dist.world_size()
    pin = device.type == "cuda"
    train_tf = build_transform(cfg.augment, cfg.image_size, cfg.mean, cfg.std, train=True, seed=cfg.seed)
    eval_tf = build_transform(cfg.augment, cfg.image_size, cfg.mean, cfg.std, train=False)
    train_dl = make_loader(ImageDataset(train_items, train_tf, cfg.image_size, strict=cfg.strict), cfg.batch_size,
                           True, cfg.num_workers, cfg.seed, drop_last=True, pin_memory=pin, rank=rank, world=world)
    valid_dl = None
    if valid_items:
        valid_dl = make_loader(ImageDataset(valid_items, eval_tf, cfg.image_size, strict=cfg.strict),
                               cfg.batch_size * 2, False, cfg.num_workers, 0, pin_memory=pin, rank=rank, world=world)
    return DataPlan(train_dl, valid_dl, lambda m: m)


def _rows_of(items: list[Item], pool: list[Item]) -> torch.Tensor:
    """Positions of ``items`` in ``pool`` (by id): members select from one shared cache."""
    where = {it.id: i for i, it in enumerate(pool)}
    return torch.tensor([where[it.id] for it in items], dtype=torch.long)


def _cached_plan(cfg: TrainConfig, train_items, valid_items, device) -> DataPlan:
    info = load_reorg(cfg.work_dir)
    pool = list_split(cfg.work_dir, info, "train_valid")
    array, bad = image_cache(cfg.work_dir, pool, cfg.image_size)
    bad_ids = {pool[i].id for i in bad}
    bad_train = {j for j, it in enumerate(train_items) if it.id in bad_ids}
    if cfg.strict and (bad_train or any(it.id in bad_ids for it in valid_items)):
        first = next(it for it in [*train_items, *valid_items] if it.id in bad_ids)
        raise PipelineError(f"cannot read image {first.path} (id {first.id!r}); replace or remove the file "
                            f"({len(bad_ids)} unreadable)")
    if bad_train:
        log.warning("skipping %s", unreadable_message(train_items, bad_train, "training images"))
    images = torch.from_numpy(np.array(array))  # into memory (or on to the GPU) once per member
    targets = cached_targets(pool, bad)
    common = dict(augment=cfg.augment, mean=cfg.mean, std=cfg.std, device=device, rank=dist.rank(),
                  world=dist.world_size(), channels_last=cfg.channels_last and device.type == "cuda")
    rows = _rows_of(train_items, pool)
    train_dl = TensorBatchLoader(images[rows], targets[rows], cfg.batch_size, shuffle=True, seed=cfg.seed,
                                 drop_last=True, **common)
    valid_dl = None
    if valid_items:
        rows = _rows_of(valid_items, pool)
        valid_dl = TensorBatchLoader(images[rows], targets[rows], cfg.batch_size * 2, shuffle=False,
                                     **{**common, "augment": "none"})
    return DataPlan(train_dl, valid_dl, lambda m: m, bad_train)


def _feature_plan(cfg: TrainConfig, model, train_items, valid_items, device) -> DataPlan:
    info = load_reorg(cfg.work_dir)
    pool = list_split(cfg.work_dir, info, "train_valid")
    train_tf = build_transform(cfg.augment, cfg.image_size, cfg.mean, cfg.std, train=True, seed=cfg.seed)
    eval_tf = build_transform(cfg.augment, cfg.image_size, cfg.mean, cfg.std, train=False)

    def loader_for(train: bool, view: int):
        ds = ImageDataset(pool, train_tf if train else eval_tf, cfg.image_size, strict=cfg.strict)
        dl = make_loader(ds, 2 * cfg.batch_size, False, cfg.num_workers, cfg.seed + view, pin_memory=device.type == "cuda")
        dl.sampler.set_epoch(view)
        return dl

    weights = cfg.weights and os.stat(cfg.weights)
    key = [cfg.model, cfg.pretrained, str(cfg.weights), weights and weights.st_size, weights and weights.st_mtime_ns,
           cfg.image_size, cfg.mean, cfg.std, cfg.augment, cfg.seed]
    bank = feature_bank(model, pool, loader_for, cfg.feature_views, key, cfg.work_dir, device)
    targets = torch.tensor([it.target for it in pool])
    rows = _rows_of(train_items, pool)
    common = dict(device=device, rank=dist.rank(), world=dist.world_size())
    train_dl = FeatureLoader(bank["views"][:, rows], targets[rows], cfg.batch_size, shuffle=True, seed=cfg.seed,
                             drop_last=True, **common)
    valid_dl = None
    if valid_items:
        rows = _rows_of(valid_items, pool)
        valid_dl = FeatureLoader(bank["eval"][None, rows], targets[rows], cfg.batch_size * 2, shuffle=False, **common)
    return DataPlan(train_dl, valid_dl, FeatureHead)


@dataclass
class MemberResult:
    name: str
    dir: Path
    epochs: int
    best_epoch: int
    best_metric: float
    seconds: float


def _member_state(model, ema, optimizer, rt: Runtime, epoch: int, history: list, best: dict,
                  cfg: TrainConfig, classes: list[str]) -> dict:
    return {
        "model": dist.unwrap(model).state_dict(),
        "ema": ema.module.state_dict() if ema is not None else None,
        "optimizer": optimizer.state_dict(),
        "scaler": rt.scaler.state_dict() if rt.scaler is not None else None,
        "epoch": epoch,  # epochs completed
        "history": history,
        "best": best,
        "config": cfg.to_json(),
        "classes": classes,
    }


def _restore(path: Path, model, ema, optimizer, rt: Runtime) -> tuple[int, list, dict]:
    state = load_checkpoint(path)
    dist.unwrap(model).load_state_dict(state["model"])
    if ema is not None and state.get("ema") is not None:
        ema.module.load_state_dict(state["ema"])
    optimizer.load_state_dict(state["optimizer"])
    for group in optimizer.param_groups:  # base lrs come from this config, not the file
        group.setdefault("base_lr", group["lr"])
    if rt.scaler is not None and state.get("scaler"):
        rt.scaler.load_state_dict(state["scaler"])
    log.info("resuming %s after epoch %d", path.parent, state["epoch"])
    return int(state["epoch"]), list(state["history"]), dict(state["best"])


def _evaluate_variants(model, ema_view, valid_dl, rt: Runtime, num_classes: int) -> tuple[dict, set[int]]:
    """Scores of the live weights and, with --ema, of the averaged ones (``ema_view``).

    Unreadable images (target BAD_TARGET) are left out of the scores; their
    positions come back for the caller to report.
    """
    p, t, pos = evaluate(model, valid_dl, rt)
    if not np.isfinite(p).all():
        raise PipelineError("the model's validation outputs are NaN or infinite: training diverged; "
                            "lower --lr, add --clip-grad 1, or raise --batch-size")
    keep = t != BAD_TARGET
    row = {f"valid_{k}": v for k, v in score(p[keep], t[keep], num_classes).items()}
    row = {"valid_loss": row["valid_log_loss"], **row}
    if ema_view is not None:
        p, t, _ = evaluate(ema_view, valid_dl, rt)
        row.update({f"valid_{k}_ema": v for k, v in score(p[keep], t[keep], num_classes).items()})
    return row, {int(i) for i in pos[~keep]}


def _pick_best(row: dict, comp: Competition, has_ema: bool) -> tuple[str, float]:
    live = row.get(f"valid_{comp.metric}", math.nan)
    if has_ema and is_better(comp, row.get(f"valid_{comp.metric}_ema", math.nan), live):
        return "ema", row[f"valid_{comp.metric}_ema"]
    return "live", live


@dataclass
class MemberState:
    """Everything one member's epochs share."""

    model: nn.Module  # the plain model: what checkpoints hold
    net: nn.Module  # what the loop calls: the model seen through the data plan, DDP, compile
    optimizer: torch.optim.Optimizer
    ema: object | None
    rt: Runtime
    criterion: nn.Module
    data: DataPlan
    first_epoch: int
    history: list
    best: dict
    reported: dict  # unreadable positions already warned about, per split


def _setup_member(cfg: TrainConfig, n_classes: int, member_dir: Path, train_items: list[Item],
                  valid_items: list[Item], resume: bool) -> MemberState:
    """Model, optimizer, precision, EMA, data; restored from last.pt when resuming."""
    device = dist.resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, n_classes).to(device)
    if cfg.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg)
    rt = make_runtime(cfg, device, len(train_items))
    ema = make_ema(model, cfg.ema)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing, ignore_index=BAD_TARGET)
    first_epoch, history, best = 0, [], {"epoch": 0, "metric": math.nan, "variant": "live"}
    if resume and (member_dir / "last.pt").is_file():
        first_epoch, history, best = _restore(member_dir / "last.pt", model, ema, optimizer, rt)
    data = plan_data(cfg, model, train_items, valid_items, device)
    if cfg.data_init and first_epoch == 0 and hasattr(model, "init_from_data"):
        model.init_from_data(next(iter(data.train))[0])  # e.g. a whitening first layer
    net = dist.wrap(data.view(model), device)
    if cfg.compile:
        net = torch.compile(net)
    reported = {"train": set(data.unreadable_train), "valid": set()}
    return MemberState(model, net, optimizer, ema, rt, criterion, data, first_epoch, history, best, reported)


def _warn_unreadable(st: MemberState, split: str, bad: set[int], items: list[Item], verb: str) -> None:
    """One warning per run for the unreadable images of a split (not one per epoch)."""
    if bad - st.reported[split]:
        noun = {"train": "training images", "valid": "validation images"}[split]
        log.warning("%s %s", verb, unreadable_message(items, bad, noun))
        st.reported[split] |= bad


def _run_epoch(cfg: TrainConfig, st: MemberState, epoch: int, train_items: list[Item], valid_items: list[Item],
               n_classes: int) -> dict:
    """Train one epoch and score it; the metrics.csv row."""
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed * 1000 + epoch)  # dropout etc.: the same stream on resume
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    st.rt.step = epoch * st.rt.steps_per_epoch
    st.data.train.sampler.set_epoch(epoch)
    loss, steps, bad = train_one_epoch(st.net, st.data.train, st.optimizer, st.criterion, cfg, st.rt, st.ema, epoch, gen)
    _warn_unreadable(st, "train", bad, train_items, "skipping")
    row = {"epoch": epoch + 1, "train_loss": loss, "lr": st.optimizer.param_groups[-1]["lr"], "steps": steps}
    if st.data.valid is not None:
        ema_view = st.ema and st.data.view(st.ema.module)
        scores, bad = _evaluate_variants(st.net, ema_view, st.data.valid, st.rt, n_classes)
        row.update(scores)
        _warn_unreadable(st, "valid", bad, valid_items, "not scoring")
    row["seconds"] = round(time.perf_counter() - t0, 3)
    return row


def _update_best(st: MemberState, row: dict, comp: Competition) -> bool:
    """Record the epoch as best if it improved the metric (always, without validation)."""
    variant, metric = _pick_best(row, comp, st.ema is not None)
    if st.data.valid is not None and not is_better(comp, metric, st.best["metric"]):
        return False
    st.best = {"epoch": row["epoch"], "metric": metric, "variant": variant}
    return True


def fit_member(cfg: TrainConfig, comp: Competition, classes: list[str], member_dir: Path,
               train_items: list[Item], valid_items: list[Item], resume: bool) -> MemberResult:
    """Train one model; checkpoints in ``member_dir``; returns its best score."""
    start = time.perf_counter()
    st = _setup_member(cfg, len(classes), member_dir, train_items, valid_items, resume)
    board = tensorboard_writer(member_dir) if cfg.tensorboard and dist.is_main() else None
    stale = 0
    for epoch in range(st.first_epoch, cfg.epochs):
        row = _run_epoch(cfg, st, epoch, train_items, valid_items, len(classes))
        st.history.append(row)
        improved = _update_best(st, row, comp)
        stale = 0 if improved else stale + 1
        if dist.is_main():
            _save_epoch(member_dir, st.model, st.ema, st.optimizer, st.rt, epoch + 1, st.history, st.best,
                        cfg, classes, improved)
            _log_scalars(board, row)
        log.info(_epoch_line(row, comp, cfg.epochs))
        if cfg.early_stop and stale >= cfg.early_stop:
            log.info("early stop: no improvement of %s for %d epochs", comp.metric, stale)
            break
    if dist.is_main():
        atomic_write_json(member_dir / DONE_FILE, {"epochs": len(st.history), "best": st.best})
    return MemberResult(member_dir.name, member_dir, len(st.history), st.best["epoch"], st.best["metric"],
                        time.perf_counter() - start)


def _log_scalars(board, row: dict) -> None:
    if board is not None:
        for key, value in row.items():
            if key != "epoch":
                board.add_scalar(key, value, row["epoch"])
        board.flush()


def tensorboard_writer(member_dir: Path):
    """A SummaryWriter logging into member_dir/tensorboard (needs the tensorboard package)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise PipelineError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(log_dir=str(member_dir / "tensorboard"))


def make_ema(model: nn.Module, decay: float):
    """An exponential moving average of the weights (and BN buffers), or None."""
    if not decay:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


@contextlib.contextmanager
def deferred_interrupt():
    """Hold Ctrl-C back until the block ends, then raise it: an epoch's files are all or none."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def _save_epoch(member_dir: Path, model, ema, optimizer, rt, epochs_done: int, history: list, best: dict,
                cfg: TrainConfig, classes: list[str], improved: bool) -> None:
    """last.pt every epoch, best.pt when the metric improved, then metrics.csv.

    Ctrl-C waits until all three are written, and a metrics.csv row always has
    its checkpoint on disk (resume rewrites metrics.csv from last.pt's history).
    """
    with deferred_interrupt():
        state = _member_state(model, ema, optimizer, rt, epochs_done, history, best, cfg, classes)
        save_checkpoint(member_dir / "last.pt", state)
        if improved:
            weights = state["ema"] if best["variant"] == "ema" else state["model"]
            save_checkpoint(member_dir / "best.pt", {"model": weights, "config": state["config"],
                                                     "classes": classes, "epoch": epochs_done, "best": best})
        atomic_write_csv(member_dir / "metrics.csv", pd.DataFrame(history))


def _epoch_line(row: dict, comp: Competition, epochs: int) -> str:
    parts = [f"epoch {row['epoch']}/{epochs}", f"train_loss {row['train_loss']:.4f}"]
    for key in ("valid_loss", "valid_accuracy", f"valid_{comp.metric}_ema"):
        if key in row:
            parts.append(f"{key} {row[key]:.4f}")
    parts.append(f"lr {row['lr']:.3g}")
    parts.append(f"{row['seconds']:.1f}s")
    return "  ".join(parts)


# ---------------------------------------------------------------- the stage

MEMBER_FILES = ("config.json", "metrics.csv", "last.pt", "best.pt", DONE_FILE)


def guard_member(member_dir: Path, resume: bool, force: bool) -> None:
    """Refuse to overwrite a member the user did not ask to overwrite."""
    done = (member_dir / DONE_FILE).is_file()
    started = (member_dir / "last.pt").is_file()
    if force:
        for name in MEMBER_FILES:
            (member_dir / name).unlink(missing_ok=True)
        return
    if done and not resume:
        raise PipelineError(f"{member_dir} already holds a finished run; use --force to overwrite it or choose a new RUN_DIR")
    if started and not resume:
        raise PipelineError(f"{member_dir} holds an unfinished run; use --resume to continue it or --force to start over")


def plan_members(cfg: TrainConfig, work_dir: Path, info: dict) -> list[tuple[Path, list[Item], list[Item]]]:
    """(member dir, train items, valid items) for each model this command trains."""
    run_dir = cfg.run_dir
    if cfg.mode == "holdout":
        return [(run_dir, list_split(work_dir, info, "train"), list_split(work_dir, info, "valid"))]
    if cfg.mode == "full":
        return [(run_dir / "full", list_split(work_dir, info, "train_valid"), [])]
    total = n_folds(work_dir)
    if cfg.folds and cfg.folds != total:
        raise PipelineError(f"--folds {cfg.folds} but {work_dir}/folds.csv has {total} folds; "
                            f"use --folds {total} or rerun reorg with --folds {cfg.folds}")
    chosen = [cfg.fold] if cfg.fold is not None else list(range(total))
    return [(run_dir / f"fold{k}", *fold_split(work_dir, info, k)) for k in chosen]


def train(cfg: TrainConfig, resume: bool = False, force: bool = False) -> list[MemberResult]:
    """Train every member ``cfg`` asks for; writes the run's files into cfg.run_dir."""
    comp = get_competition(cfg.competition)
    info = load_reorg(cfg.work_dir)
    if info["competition"] != comp.slug:
        raise PipelineError(f"{cfg.work_dir} was reorganised for {info['competition']!r}, not {comp.slug!r}")
    classes = info["classes"]
    members = plan_members(cfg, cfg.work_dir, info)
    for member_dir, train_items, _ in members:
        guard_member(member_dir, resume, force)
        if len(train_items) < cfg.batch_size and not dist.is_distributed():
            log.warning("%s: %d training images is less than one batch of %d; using batch size %d",
                        member_dir, len(train_items), cfg.batch_size, len(train_items))
    if dist.is_main():
        atomic_write_json(cfg.run_dir / "config.json", cfg.to_json())
    results = []
    for member_dir, train_items, valid_items in members:
        member_cfg = replace(cfg, batch_size=min(cfg.batch_size, len(train_items)))
        if cfg.mode == "folds":  # each member records the one fold it trained on
            member_cfg = replace(member_cfg, folds=0, fold=int(member_dir.name[len("fold"):]))
        if dist.is_main():
            atomic_write_json(member_dir / "config.json", member_cfg.to_json())
        results.append(fit_member(member_cfg, comp, classes, member_dir, train_items, valid_items, resume))
        dist.barrier()
    if cfg.mode == "folds" and dist.is_main():
        write_cv(cfg, comp, info, results)
    return results


def write_cv(cfg: TrainConfig, comp: Competition, info: dict, results: list[MemberResult]) -> dict | None:
    """oof.csv and cv.json, once every fold of folds.csv has a finished model."""
    from pipeline.predict import predict_member

    total = n_folds(cfg.work_dir)
    fold_dirs = [cfg.run_dir / f"fold{k}" for k in range(total)]
    missing = [d.name for d in fold_dirs if not (d / DONE_FILE).is_file()]
    if missing:
        log.info("out-of-fold score waits for %s", ", ".join(missing))
        return None
    classes = info["classes"]
    frames, per_fold = [], []
    for k, member_dir in enumerate(fold_dirs):
        _, valid_items = fold_split(cfg.work_dir, info, k)
        ids, probs = predict_member(member_dir, valid_items, tta=cfg.tta, device=cfg.device,
                                    num_workers=cfg.num_workers, unreadable="drop")
        kept = set(ids)
        targets = np.array([it.target for it in valid_items if it.id in kept])
        per_fold.append({"fold": k, **score(probs, targets, len(classes)), **_fold_meta(member_dir)})
        frame = pd.DataFrame(probs, columns=classes)
        frame.insert(0, "label", [classes[t] for t in targets])
        frame.insert(0, "id", ids)
        frames.append(frame)
    oof = pd.concat(frames, ignore_index=True)
    atomic_write_csv(cfg.run_dir / "oof.csv", oof)
    targets = oof["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    overall = score(oof[classes].to_numpy(), targets, len(classes))
    cv = {"metric": comp.metric, "cv": overall[comp.metric], "overall": overall, "folds": per_fold, "tta": cfg.tta}
    atomic_write_json(cfg.run_dir / "cv.json", cv)
    log.info(format_cv_table(cv))
    return cv


def _fold_meta(member_dir: Path) -> dict:
    import json

    done = json.loads((member_dir / DONE_FILE).read_text())
    metrics = pd.read_csv(member_dir / "metrics.csv")
    return {"epochs": done["epochs"], "best_epoch": done["best"]["epoch"],
            "seconds": round(float(metrics["seconds"].sum()), 1)}


def format_cv_table(cv: dict) -> str:
    lines = [f"{'fold':>4}  {'epochs':>6}  {'best':>4}  {'accuracy':>8}  {'log_loss':>8}  {'seconds':>8}"]
    for f in cv["folds"]:
        lines.append(f"{f['fold']:>4}  {f['epochs']:>6}  {f['best_epoch']:>4}  {f['accuracy']:>8.4f}  "
                     f"{f['log_loss']:>8.4f}  {f['seconds']:>8.1f}")
    o = cv["overall"]
    lines.append(f"{'oof':>4}  {'':>6}  {'':>4}  {o['accuracy']:>8.4f}  {o['log_loss']:>8.4f}")
    return "cross-validation (out of fold):\n" + "\n".join(lines)
