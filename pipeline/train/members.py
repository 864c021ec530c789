"""The members one `pipeline train` command trains, and whether it may write them.

:func:`plan_members` maps the config's mode (holdout, every fold or one, full)
to members of the run layout with their training and validation items;
:func:`check_members` refuses, before anything is written, to overwrite a
finished or started member the user did not ask to (--force / --resume).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import TrainConfig
from pipeline.data.items import Item, fold_split, list_split, n_folds
from pipeline.errors import PipelineError
from pipeline.metrics import small_split_warning
from pipeline.runs import FOLD, FULL, HOLDOUT, Member, Run, member_name

log = logging.getLogger("pipeline")


@dataclass
class MemberResult:
    name: str
    dir: Path
    epochs: int
    best_epoch: int
    best_metric: float
    seconds: float
    skipped: bool = False
    kept: dict | None = None  # the weights predict uses: epoch, variant, metric, interval, valid_images


def guard_member(member: Member, resume: bool, force: bool) -> None:
    """Refuse to overwrite a member the user did not ask to overwrite."""
    if force:
        member.clear()
        return
    if member.is_finished and not resume:
        raise PipelineError(f"{member.dir} already holds a finished run; use --force to overwrite it or "
                            "choose a new RUN_DIR")
    if member.is_started and not resume:
        raise PipelineError(f"{member.dir} holds an unfinished run; use --resume to continue it or --force to start over")


def plan_members(cfg: TrainConfig, info: dict) -> list[tuple[Member, list[Item], list[Item]]]:
    """(member, train items, valid items) for each model this command trains."""
    run, work_dir = Run(cfg.run_dir), cfg.work_dir
    if cfg.mode == "holdout":
        return [(run.member(HOLDOUT), list_split(work_dir, info, "train"), list_split(work_dir, info, "valid"))]
    if cfg.mode == "full":
        return [(run.member(FULL), list_split(work_dir, info, "train_valid"), [])]
    total = n_folds(work_dir)
    if cfg.folds and cfg.folds != total:
        raise PipelineError(f"--folds {cfg.folds} but {work_dir}/folds.csv has {total} folds; "
                            f"use --folds {total} or rerun reorg with --folds {cfg.folds}")
    if cfg.fold is not None and cfg.fold >= total:
        raise PipelineError(f"--fold {cfg.fold} but {work_dir}/folds.csv has folds 0..{total - 1}")
    chosen = [cfg.fold] if cfg.fold is not None else list(range(total))
    return [(run.member(member_name(FOLD, k)), *fold_split(work_dir, info, k)) for k in chosen]


def already_done(member: Member, cfg: TrainConfig) -> MemberResult | None:
    """A finished member that --resume need not touch (its epochs reached, or it stopped early)."""
    if not member.is_finished:
        return None
    done = member.done()
    if done["epochs"] < cfg.epochs and not done.get("stopped_early"):
        member.unmark_done()  # --resume --epochs N: extend it
        return None
    best = done["best"]
    return MemberResult(member.name, member.dir, done["epochs"], best["epoch"], best["metric"], 0.0, skipped=True)


def check_members(cfg: TrainConfig, plans: list, n_classes: int, resume: bool, force: bool) -> None:
    """Refuse overwrites before anything is written; warn of small validation splits.

    ``plans`` are the members' plans (pipeline/train/plan.py), which warn of
    their own batches.
    """
    for plan in plans:
        member = plan.member
        guard_member(member, resume, force)
        if not plan.train_items:
            raise PipelineError(f"{member.name} has no training images in {cfg.work_dir}; check the labels file "
                                "and rerun reorg")
        if member.kind == HOLDOUT and (warning := small_split_warning(len(plan.valid_items), n_classes)):
            log.warning("warning: %s", warning)
