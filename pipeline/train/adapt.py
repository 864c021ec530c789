"""A recipe adapted to the data: enough optimizer steps on small data, the user's flags untouched.

A recipe states intent at full data size ("N epochs at batch B"); on a few
hundred images that can mean one optimizer step per epoch. :func:`adapt_to_data`
is pure: the resolved config and the number of training images in, the
adapted config and a note per change out (train.py logs them and stores them
in the run's config.json).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from pipeline.config import TrainConfig

MIN_STEPS_PER_EPOCH = 8  # a recipe's batch is capped so that each epoch takes at least these many steps
MIN_BATCH = 8  # ... but not below this
MIN_TOTAL_STEPS = 300  # epochs are raised until the run takes at least these many optimizer steps
MAX_EPOCH_FACTOR = 10  # ... but never beyond this multiple of the recipe's epochs
MIN_IMAGES_SEEN = 50_000  # on small data the epochs also rise until a run trains on this many images in all
SEEN_EPOCH_FACTOR = 1.5  # ... by at most this factor of the recipe's epochs (the time a small-data default may add)
MAX_DROPPED = 0.05  # drop_last may leave out at most this share of the training images per epoch
FIXED_SOURCES = ("flag", "caller")  # values the user gave: never adapted
SQRT_SCALED = ("ada", "lamb")  # optimizer name parts (adam, adamw, adagrad, lamb) whose lr follows sqrt(batch), as in timm


def adapt_to_data(cfg: TrainConfig, n_train: int, sources: Mapping[str, str]) -> tuple[TrainConfig, list[str]]:
    """The config with its recipe values adapted to ``n_train`` training images (per process), and why (pure).

    A recipe states intent at full data size ("N epochs at batch B"); on small
    data that can mean one optimizer step per epoch. Values whose source is a
    flag (or a caller's own TrainConfig) are kept. Adapted: the batch (at least
    MIN_STEPS_PER_EPOCH steps per epoch and MIN_TOTAL_STEPS in the recipe's
    epochs, >= MIN_BATCH, made smaller where drop_last would leave out more than
    MAX_DROPPED of the images; with --accum-steps N these bound the N batches of
    an optimizer step, and the recipe's lr follows the step's images on any data
    size); where the batch cannot shrink enough, the epochs
    (at least MIN_TOTAL_STEPS steps in all, at most MAX_EPOCH_FACTOR x the
    recipe's) with the step schedule's period and the warm-up stretched alike;
    on small data the epochs (at least MIN_IMAGES_SEEN images seen in all, at
    most SEEN_EPOCH_FACTOR x the recipe's: :func:`_see_enough`).
    A logreg head: one fit, on the unaugmented features.
    """
    def free(name: str) -> bool:
        return sources.get(name, "default") not in FIXED_SOURCES

    if cfg.head == "logreg" and not cfg.unfreeze_after:
        return _adapted_logreg(cfg, free)
    changes, notes = _logreg_views(cfg, free)
    batch, accum = cfg.batch_size, cfg.accum_steps  # an optimizer step takes batch x accum images
    if free("batch_size") and n_train > 0:
        batch = max(1, adapted_batch(batch * accum, n_train, cfg.epochs) // accum)
        if batch != cfg.batch_size:
            changes["batch_size"] = batch
            per = f" x {accum} accumulated" if accum > 1 else ""
            notes.append(f"batch_size {cfg.batch_size} -> {batch}: {n_train} training images make "
                         f"{n_train // (cfg.batch_size * accum)} step(s) per epoch at {cfg.batch_size}{per}, "
                         f"{n_train // (batch * accum)} at {batch}{per} (at least {MIN_STEPS_PER_EPOCH} wanted; "
                         f"--batch-size keeps yours)")
    if free("batch_size") and free("lr") and batch * accum != cfg.batch_size:
        # the recipe set its lr for a step of its batch; a step now takes batch x accum images (timm's global batch)
        changes["lr"] = scaled_lr(cfg.lr, cfg.optimizer, cfg.batch_size, batch * accum)
        what = "the batch" if accum == 1 else f"the images of a step ({batch} x {accum} accumulated)"
        notes.append(f"lr {cfg.lr:g} -> {changes['lr']:.4g}: scaled with {what} "
                     f"({lr_scaling(cfg.optimizer)} for {cfg.optimizer}; --lr keeps yours)")
    steps = max(1, n_train // (batch * accum))
    if free("epochs") and not cfg.steps_per_epoch and steps * cfg.epochs < MIN_TOTAL_STEPS:
        epochs = min(-(-MIN_TOTAL_STEPS // steps), cfg.epochs * MAX_EPOCH_FACTOR)
        changes.update(epochs=epochs, **_stretched(cfg, epochs / cfg.epochs, free))
        notes.append(f"epochs {cfg.epochs} -> {epochs}: {steps} step(s) per epoch make {steps * cfg.epochs} in all, "
                     f"{steps * epochs} now (at least {MIN_TOTAL_STEPS} wanted; --epochs keeps yours)")
    if free("epochs") and not cfg.steps_per_epoch and n_train > 0:
        _see_enough(cfg, n_train, changes, notes, free)
    return (dataclasses.replace(cfg, **changes) if changes else cfg), notes


def _see_enough(cfg: TrainConfig, n_train: int, changes: dict, notes: list[str], free) -> None:
    """Epochs up to MIN_IMAGES_SEEN images in all, by at most SEEN_EPOCH_FACTOR x the recipe's (in place).

    With the lr scaled linearly to the batch, how far SGD moves the weights follows
    the images it trains on, not the steps: a recipe's epochs on a few thousand
    images stop far short of what it was tuned for. On CIFAR-10 2,000 with the
    fast recipe, 15 epochs instead of 10 scored 0.621 against 0.572 on 1,000
    held-out images (paired change +0.049 [+0.027, +0.071]; issue 23).
    """
    epochs = changes.get("epochs", cfg.epochs)
    wanted = min(-(-MIN_IMAGES_SEEN // n_train), int(cfg.epochs * SEEN_EPOCH_FACTOR))
    if wanted <= epochs:
        return
    changes.update(epochs=wanted, **_stretched(cfg, wanted / cfg.epochs, free))
    notes.append(f"epochs {epochs} -> {wanted}: {n_train} training images make {n_train * epochs:,} seen in "
                 f"{epochs} epochs, {n_train * wanted:,} now (at least {MIN_IMAGES_SEEN:,} wanted, at most "
                 f"{SEEN_EPOCH_FACTOR:g}x the recipe's epochs; --epochs keeps yours)")


def adapted_batch(batch: int, n_train: int, epochs: int = 1) -> int:
    """``batch`` capped for ``n_train`` images and ``epochs`` (see :func:`adapt_to_data`); unchanged on large data.

    The cap gives at least MIN_STEPS_PER_EPOCH steps per epoch and, where the
    batch can shrink that far, MIN_TOTAL_STEPS in the recipe's epochs: the
    epochs (the recipe's intent, and its compute) stay, the batch moves.
    """
    limit = max(MIN_BATCH, min(n_train // MIN_STEPS_PER_EPOCH, n_train * epochs // MIN_TOTAL_STEPS))
    batch = min(batch, limit)
    while batch > MIN_BATCH and batch < n_train and (n_train % batch) / n_train > MAX_DROPPED:
        batch -= 1  # drop_last leaves out n % batch images every epoch: a slightly smaller batch fits better
    return min(batch, n_train)


def lr_scaling(optimizer: str) -> str:
    """How an optimizer's lr follows its batch: "sqrt" for Adam-type ones, "linear" for SGD (timm's rule)."""
    return "sqrt" if any(part in optimizer.lower() for part in SQRT_SCALED) else "linear"


def scaled_lr(lr: float, optimizer: str, old_batch: int, new_batch: int) -> float:
    """The lr a recipe tuned at ``old_batch`` should take at ``new_batch`` (pure).

    SGD's update is a sum over the batch: the lr scales linearly with it
    (Goyal et al. 2017). Adam-type updates are normalised by the gradient's
    second moment, whose noise falls with sqrt(batch): the lr follows the
    square root (timm's train.py ``--lr-base-scale``).
    """
    ratio = new_batch / old_batch
    return lr * (math.sqrt(ratio) if lr_scaling(optimizer) == "sqrt" else ratio)


def _stretched(cfg: TrainConfig, factor: float, free) -> dict[str, Any]:
    """Epoch-counted schedule settings scaled with the epochs, so the schedule keeps its shape."""
    out: dict[str, Any] = {}
    if cfg.schedule == "step" and free("lr_period_epochs"):
        out["lr_period_epochs"] = max(1, round(cfg.lr_period_epochs * factor))
    if cfg.warmup_epochs and free("warmup_epochs"):
        out["warmup_epochs"] = cfg.warmup_epochs * factor
    return out


def _adapted_logreg(cfg: TrainConfig, free) -> tuple[TrainConfig, list[str]]:
    """A logreg head is fitted once (one "epoch"), by default on the unaugmented features."""
    changes, notes = _logreg_views(cfg, free)
    if cfg.epochs != 1:
        changes["epochs"] = 1
        notes.insert(0, f"epochs {cfg.epochs} -> 1: --head logreg fits the head once")
    return dataclasses.replace(cfg, **changes), notes


def _logreg_views(cfg: TrainConfig, free) -> tuple[dict[str, Any], list[str]]:
    if cfg.head != "logreg" or not (free("feature_views") and cfg.feature_views):
        return {}, []
    return {"feature_views": 0}, ["feature_views -> 0: --head logreg fits the unaugmented features"]
