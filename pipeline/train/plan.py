"""One plan per member: what it trains on, with which settings, in how many steps, from which data source.

:func:`plan_run` is the only place that works these out. Training, the run
summary, ``--dry-run``, the warnings, lr-find and each member's config.json
read the :class:`MemberPlan`; nothing recomputes a batch, a step count or a
data source afterwards.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from pipeline import distributed as dist
from pipeline.config import AUTO, Resolved, TrainConfig
from pipeline.data.items import Item
from pipeline.data.plan import Source, choose_source
from pipeline.devices import DevicePlan
from pipeline.errors import PipelineError
from pipeline.data.metadata import MetaEncoder, item_metadata, meta_tensor
from pipeline.download.specfile import competition_of
from pipeline.runs import Member
from pipeline.models.task import Task, target_tensor
from pipeline.train.adapt import adapt_to_data, lr_scaling, scaled_lr
from pipeline.train.autobatch import lr_batch, resolve_auto
from pipeline.train.engine import phase
from pipeline.train.members import plan_members
from pipeline.train.teacher import Teachers

log = logging.getLogger("pipeline")


@dataclass(frozen=True)
class MemberPlan:
    """A member, its items and everything derived from them and the resolved config."""

    member: Member
    train_items: list[Item] = field(repr=False)
    valid_items: list[Item] = field(repr=False)
    config: TrainConfig  # adapted to the data, batch capped at the process's share, the fold recorded
    per_process: int  # this process's share of the training images
    source: Source  # what the model consumes while training (in its first phase), and why
    steps_per_epoch: int
    total_steps: int  # optimizer steps over every phase (a fitted logreg phase takes none)
    notes: tuple[str, ...] = ()  # why the recipe's values were adapted
    warnings: tuple[str, ...] = ()  # what the plan itself warns about
    task: Task = Task("single", ())  # the work folder's task, fitted to this member's training targets
    metadata: MetaEncoder | None = None  # the spec's metadata columns, encoded as this member's training rows say
    batch_auto: bool = False  # --batch-size auto: the batch was picked here and halves on out-of-memory
    fit_items: list[Item] | None = field(default=None, repr=False)  # what the loaders train on (train/teacher.py)
    teacher: dict = field(default_factory=dict)  # --soft-labels / --pseudo-label: the teacher and its rows

    @property
    def training_rows(self) -> list[Item]:
        """The rows the member's loaders train on: its training items, targets mixed with a teacher's and the
        pseudo-labelled test images added when asked; else its training items."""
        return self.train_items if self.fit_items is None else self.fit_items

    @property
    def name(self) -> str:
        return self.member.name

    def source_at(self, epoch: int) -> Source:
        """What the model consumes in the phase of ``epoch``: the first phase's source, then (--unfreeze-after)
        the unfrozen phase's, images."""
        if not self.config.unfreeze_after or epoch < self.config.unfreeze_after:
            return self.source
        return choose_source(phase(self.config, epoch))

    def device(self, device: torch.device, epoch: int = 0) -> DevicePlan:
        """The device decisions for this member's source in the phase of ``epoch`` on ``device`` (this
        process's): a fresh start, a phase switch and a resume into a later phase all take them from here."""
        return dist.plan_for(phase(self.config, epoch), device, self.source_at(epoch).kind)

    def to_json(self) -> dict[str, Any]:
        """The member's plan as its config.json records it (the report reads it back)."""
        cfg = self.config
        later = self.source_at(cfg.unfreeze_after) if cfg.unfreeze_after else None
        return {"source": {"kind": self.source.kind, "reason": self.source.reason},
                "unfrozen_source": later and {"kind": later.kind, "reason": later.reason},
                "n_train": len(self.train_items), "n_valid": len(self.valid_items),
                "valid_ids": ids_digest(self.valid_items),
                "batch_size": cfg.batch_size, "per_process": self.per_process,
                "per_process_batch": cfg.batch_size, "steps_per_epoch": self.steps_per_epoch,
                "total_steps": self.total_steps, "epochs": cfg.epochs, "training": training_kind(cfg),
                "weights": weights_source(cfg), "adapted": list(self.notes), "warnings": list(self.warnings),
                **({"task": self.task.to_json()} if self.task.kind != "single" else {}),
                **({"metadata": self.metadata.to_json()} if self.metadata is not None else {}),
                **({"teacher": self.teacher} if self.teacher else {})}

    def meta(self, items: list[Item]) -> torch.Tensor | None:
        """The encoded metadata of ``items`` (None without metadata)."""
        return meta_tensor(self.metadata, self.config.work_dir, items)


def ids_digest(items: list[Item]) -> str:
    """A digest of the items' ids: a member trained elsewhere is shown to have validated on the same fold."""
    return hashlib.sha256("\n".join(sorted(it.id for it in items)).encode()).hexdigest()[:16]


def steps_per_epoch(cfg: TrainConfig, per_process: int) -> int:
    """Optimizer steps per epoch for a process's share of images (drop_last: every step --accum-steps full
    batches)."""
    if per_process and per_process // cfg.batch_size < cfg.accum_steps:
        raise PipelineError(f"--accum-steps {cfg.accum_steps} x --batch-size {cfg.batch_size} needs more than the "
                            f"{per_process} training images per process; lower --accum-steps or --batch-size")
    steps = max(1, per_process // (cfg.batch_size * cfg.accum_steps))
    return min(steps, cfg.steps_per_epoch) if cfg.steps_per_epoch else steps


def fitted_epochs(cfg: TrainConfig) -> int:
    """Epochs whose head is fitted (logreg), not stepped: the whole run, or the frozen phase."""
    return min(cfg.epochs, cfg.unfreeze_after or cfg.epochs) if cfg.head == "logreg" else 0


def training_kind(cfg: TrainConfig) -> str:
    """fit (a logreg head, no SGD), sgd, or "fit, then sgd" (--unfreeze-after after a logreg phase)."""
    if cfg.head != "logreg":
        return "sgd"
    return "fit, then sgd" if cfg.unfreeze_after and cfg.unfreeze_after < cfg.epochs else "fit"


def weights_source(cfg: TrainConfig) -> str:
    """Where the initial weights come from: a file, the hub (pretrained), or none (from scratch)."""
    if cfg.weights:
        return f"file: {cfg.weights}"
    return "hub" if cfg.pretrained else "none"


def plan_member(cfg: TrainConfig, sources: dict[str, str], member: Member, train_items: list[Item],
                valid_items: list[Item], task: Task, columns: list[str] = (), *, probe: bool = False,
                lr_batch: int = 128, teacher: Teachers | None = None) -> MemberPlan:
    """One member's plan: the recipe adapted to its images, the batch capped (--batch-size auto: picked,
    probed when ``probe``), steps and source; the task fitted to its training targets (a regression's
    standardisation); ``teacher``: the run's teachers (its training rows then come from them)."""
    fit_items, record = None, {}
    if teacher is not None:
        fit_items, record = teacher.member_rows(cfg, member, train_items, task)
    share = dist.per_process(len(train_items if fit_items is None else fit_items))
    encoder = None
    if columns:  # fitted on this member's training rows only
        encoder = MetaEncoder.fit(item_metadata(cfg.work_dir, columns, train_items), columns)
    auto, picked = cfg.batch_size == AUTO, []
    if auto:
        cfg, picked = resolve_auto(cfg, share, sources, n_outputs=task.n_outputs,
                                   meta_width=encoder.width if encoder else 0,
                                   source_kind=choose_source(phase(cfg, 0)).kind, reference=lr_batch, member=member,
                                   probe_memory=probe)
        sources = {**sources, "batch_size": "caller"}  # picked: not adapted again
    adapted, notes = adapt_to_data(cfg, share, sources)
    notes = picked + notes
    warnings = []
    if 0 < share < adapted.batch_size:
        warnings.append(f"{member.name}: {share} training images per process is less than one batch of "
                        f"{adapted.batch_size}; using batch size {share}")
        adapted = replace(adapted, batch_size=share)
    if member.fold is not None:  # each member records the one fold it trains on
        adapted = replace(adapted, folds=0, fold=member.fold)
    steps = steps_per_epoch(adapted, share)
    total = steps * (adapted.epochs - fitted_epochs(adapted))
    source = choose_source(phase(adapted, 0))  # --unfreeze-after: the frozen phase's source first
    task = task.fitted(target_tensor([it.target for it in train_items])) if train_items else task
    if cfg.balance != "none" and task.numeric:
        warnings.append(f"--balance {cfg.balance}: a {task.kind} target has no classes to balance; ignored")
    return MemberPlan(member, train_items, valid_items, adapted, share, source, steps, total, tuple(notes),
                      tuple(warnings), task, encoder, auto, fit_items=fit_items, teacher=record)


def halved(plan: MemberPlan, epoch: int) -> MemberPlan:
    """The plan with half its batch after running out of memory in ``epoch`` (--batch-size auto): the lr
    follows the batch (pipeline/train/adapt.py's rule), the steps are those of the new batch."""
    cfg = plan.config
    batch = cfg.batch_size // 2
    new = replace(cfg, batch_size=batch, lr=scaled_lr(cfg.lr, cfg.optimizer, cfg.batch_size, batch))
    steps = steps_per_epoch(new, plan.per_process)
    note = (f"batch_size {cfg.batch_size} -> {batch}: out of memory in epoch {epoch + 1}, which starts again; lr "
            f"{cfg.lr:g} -> {new.lr:.4g} ({lr_scaling(cfg.optimizer)} for {cfg.optimizer})")
    return replace(plan, config=new, steps_per_epoch=steps, total_steps=steps * (new.epochs - fitted_epochs(new)),
                   notes=(*plan.notes, note))


def plan_run(resolved: Resolved, info: dict, probe: bool = False) -> tuple[Resolved, list[MemberPlan]]:
    """Every member's plan; the resolved config gains the adaptation notes (logged once each). ``probe``:
    --batch-size auto tries its candidate batches on the device (training), else takes the budget's."""
    task = Task.of(info, competition_of(resolved.config.competition).loss)
    columns = list(info.get("metadata", ()))
    reference = lr_batch(resolved.config, resolved.recipe) if resolved.config.batch_size == AUTO else 0
    teacher = Teachers.read(resolved.config, task, info)  # read once for every member
    plans = [plan_member(resolved.config, resolved.sources, *m, task, columns, probe=probe, lr_batch=reference,
                         teacher=teacher) for m in plan_members(resolved.config, info)]
    notes = tuple(dict.fromkeys(n for p in plans for n in p.notes))
    return replace(resolved, notes=tuple(dict.fromkeys((*resolved.notes, *notes)))), plans


def log_plan_warnings(plans: list[MemberPlan]) -> None:
    """The adaptation notes and the plans' warnings, once each, through the logger (the summary lists them)."""
    for note in dict.fromkeys(n for p in plans for n in p.notes):
        log.warning("recipe adapted to the data: %s", note)
    for warning in dict.fromkeys(w for p in plans for w in p.warnings):
        log.warning(warning)


def planned(resolved: Resolved, plans: list[MemberPlan]) -> Resolved:
    """What --dry-run shows: the first member's settings, values the plan changed marked "adapted"."""
    first, given = plans[0].config.to_json(), resolved.config.to_json()
    changed = {k: "adapted" for k, v in first.items() if v != given[k] and k not in ("fold", "folds")}
    shown = replace(plans[0].config, folds=resolved.config.folds, fold=resolved.config.fold)
    return replace(resolved, config=shown, sources={**resolved.sources, **changed})
