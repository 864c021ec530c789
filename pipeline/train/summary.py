"""The start-of-run summary: what a training run is about to do, before it spends any time.

:func:`format_summary` is pure: the resolved settings with their sources, the
model and its parameter counts, device, precision, channels_last and workers,
the image counts per split and per member, steps per epoch and in total, the
data source (and so the cache) each member uses, and every warning issued so
far. :func:`log_run_summary` gathers those facts the way training will compute
them, logs the text on stderr and stores it in the run (RUN_DIR/summary.txt).

Warnings are collected from the ``pipeline`` logger as they are issued
(:func:`collect_warnings` starts afresh for each command), so a warning any
stage logs before the summary is in it.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("pipeline")

FEW_STEPS = 100  # below this many optimizer steps a schedule (warm-up, decay) barely runs


@dataclass(frozen=True)
class MemberLine:
    """One member's line of the summary: its images, batch, steps and epochs (from its plan)."""

    name: str
    n_train: int
    n_valid: int
    batch_size: int
    steps_per_epoch: int
    total_steps: int
    epochs: int


@dataclass(frozen=True)
class RunFacts:
    """Everything the summary says besides the settings table."""

    run_dir: str
    model: str
    params_total: int
    params_trainable: int
    device: str
    precision: str
    channels_last: bool
    workers: int
    source_kind: str
    source_reason: str
    split_counts: dict[str, int]
    members: tuple[MemberLine, ...]
    training: str = ""  # how the epochs train when it is not plain SGD on every epoch (logreg, fine-tuning)
    task: str = ""  # the task kind, its outputs, metadata and groups when any is not plain single-label (task_line)
    teacher: str = ""  # --soft-labels / --pseudo-label: the teacher and its rows (pipeline/train/teacher.py)
    views: str = ""  # the test-time views and the sides they are decoded at, when not one plain view (view_line)


def count_parameters(model: Any) -> tuple[int, int]:
    """(total, trainable) parameter counts of a torch module."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def plan_warnings(facts: RunFacts) -> list[str]:
    """Warnings the plan itself deserves: few optimizer steps (pure).

    A small validation split is warned about by train itself (metrics.small_split_warning), and the
    summary lists it with every other warning logged so far.
    """
    found = []
    for m in facts.members:
        if m.total_steps < FEW_STEPS:
            found.append(f"{m.name}: only {m.total_steps} optimizer steps in all ({m.steps_per_epoch} per epoch); "
                         "the model barely trains: raise --epochs or lower --batch-size")
    return found


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"


def format_summary(table: str, facts: RunFacts, warnings: Sequence[str]) -> str:
    """The summary text: facts first, then warnings, then every setting with its source (pure)."""
    frozen = facts.params_total - facts.params_trainable
    lines = [f"run summary: {facts.run_dir}",
             f"  model      {facts.model}: {_millions(facts.params_total)} parameters, "
             f"{_millions(facts.params_trainable)} trainable" + (f", {_millions(frozen)} frozen" if frozen else ""),
             f"  device     {facts.device}, precision {facts.precision}, "
             f"channels_last {'on' if facts.channels_last else 'off'}, {facts.workers} DataLoader workers",
             f"  data       {facts.source_kind}: {facts.source_reason}",
             "  images     " + ", ".join(f"{k} {v}" for k, v in facts.split_counts.items())]
    for i, m in enumerate(facts.members):
        head = "  members    " if i == 0 else " " * 13
        valid = f", {m.n_valid} valid" if m.n_valid else ", no validation"
        lines.append(f"{head}{m.name}: {m.n_train} train{valid}; batch {m.batch_size}, "
                     f"{m.steps_per_epoch} steps/epoch, {m.total_steps} steps in {m.epochs} epochs")
    if facts.training:
        lines.append(f"  training   {facts.training}")
    if facts.task:
        lines.append(f"  task       {facts.task}")
    if facts.teacher:
        lines.append(f"  teacher    {facts.teacher}")
    if facts.views:
        lines.append(f"  views      {facts.views}")
    unique = list(dict.fromkeys(w.removeprefix("warning: ") for w in warnings))
    lines.append("  warnings   " + ("none" if not unique else f"{len(unique)}"))
    lines += [f"    - {w}" for w in unique]
    lines.append("settings (value, source):")
    lines += [f"  {row}" for row in table.splitlines()]
    return "\n".join(lines)


# ---------------------------------------------------------------- warnings as they are issued


class _Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.messages.append(record.getMessage())
        except Exception:  # noqa: BLE001 - a bad log call must not break the command
            self.handleError(record)


_COLLECTOR = _Collector()


def collect_warnings() -> None:
    """Start collecting the ``pipeline`` logger's warnings afresh (each command calls this once)."""
    _COLLECTOR.messages.clear()
    if _COLLECTOR not in log.handlers:
        log.addHandler(_COLLECTOR)


def warnings_so_far() -> list[str]:
    return list(_COLLECTOR.messages)


# ---------------------------------------------------------------- gathering and storing


def gather_facts(resolved: Any, plans: Sequence[Any], info: dict) -> RunFacts:
    """The facts of the members' plans (pipeline/train/plan.py) and of this process's device plan for them.

    The model is built only for its parameter counts (no download, no weights file).
    """
    import torch


    first = plans[0]
    cfg = first.config
    from pipeline.devices import resolve_device

    device = resolve_device(cfg.device)
    dplan = first.device(device)  # the decisions the members will take
    dtype = dplan.dtype
    precision = "fp32" if dtype is None else {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))
    members = tuple(MemberLine(p.name, len(p.train_items), len(p.valid_items), p.config.batch_size,
                               p.steps_per_epoch, p.total_steps, p.config.epochs) for p in plans)
    total, trainable = count_parameters(_shape_only(cfg, len(info["classes"])))
    return RunFacts(str(cfg.run_dir), cfg.model, total, trainable, str(device), precision,
                    dplan.channels_last, dplan.workers, first.source.kind, first.source.reason,
                    dict(info.get("counts", {})), members, training_plan(cfg),
                    task_line(first.task, info.get("metadata", ()), info.get("group_column", ""),
                              {p.name: p.task for p in plans}), first.teacher.get("line", ""),
                    view_line(cfg))


def view_line(cfg: Any) -> str:
    """The views validation, the out-of-fold scores and predict average, and the sides they decode the
    images at (--tta, --test-size); "" for one view at the training side."""
    from pipeline.errors import tta_views
    from pipeline.data.views import eval_geometry, eval_sizes

    views, sides = tta_views(cfg.tta), eval_sizes(cfg, cfg.tta)
    if len(views) == 1 and sides == (cfg.image_size,) and eval_geometry(cfg)[1] is None:
        return ""
    crop = eval_geometry(cfg)[1]
    return (f"{len(views)} ({cfg.tta}) at side{'s' if len(sides) > 1 else ''} {', '.join(map(str, sides))} "
            f"(training {cfg.image_size}, --test-size {cfg.test_size}" + (f", crop {crop:g})" if crop else ")"))


def task_line(task: Any, metadata: Sequence[str], group_column: str, members: dict[str, Any]) -> str:
    """'regression of Pawpularity; training range fold0 1 to 100, ...; metadata Eyes, Group; groups by
    patient_id' (pure); "" for a single-label task without metadata or groups (the summary as before kinds)."""
    parts = []
    if task.kind == "multilabel":
        parts.append(f"multilabel: {len(task.names)} labels ({', '.join(task.names[:8])}"
                     f"{', ...' if len(task.names) > 8 else ''}), a sigmoid each")
    elif task.kind in ("regression", "ordinal"):
        grades = f", {len(task.grades)} grades {task.grades[0]} .. {task.grades[-1]}" if task.grades else ""
        ranges = ", ".join(f"{n} {t.low:g} to {t.high:g}" for n, t in members.items()
                           if math.isfinite(t.low) and math.isfinite(t.high))
        parts.append(f"{task.kind} of {task.names[0]}{grades} ({task.loss} loss)"
                     + (f"; training range (predictions clipped to it) {ranges}" if ranges else ""))
    elif metadata or group_column:
        parts.append(f"single-label: {len(task.names)} classes")
    if metadata:
        parts.append(f"metadata {', '.join(metadata)}")
    if group_column:
        parts.append(f"groups by {group_column} (split whole: no group on both sides)")
    return "; ".join(parts)


def training_plan(cfg: Any) -> str:
    """One line on how the epochs train, for a logreg head or --unfreeze-after (pure); "" otherwise."""
    fit = "a logistic regression fitted once on the cached features (C by inner CV)"
    if cfg.unfreeze_after:
        first = fit if cfg.head == "logreg" else f"the {cfg.head} head alone, backbone frozen"
        span = "epoch 1" if cfg.unfreeze_after == 1 else f"epochs 1-{cfg.unfreeze_after}"
        return (f"{span}: {first}; epochs {cfg.unfreeze_after + 1}-{cfg.epochs}: the whole model, a new "
                f"optimizer and {cfg.schedule} schedule, backbone lr x {cfg.backbone_lr_scale:g}")
    return f"the head is {fit}: no SGD steps" if cfg.head == "logreg" else ""


def _shape_only(cfg: Any, num_classes: int) -> Any:
    """The model without downloading or reading weights; on the meta device when it builds there."""
    import torch

    from pipeline.models import model_from_config

    try:
        with torch.device("meta"):
            return model_from_config(cfg, num_classes, initial_weights=False)
    except Exception:  # noqa: BLE001 - some models initialise with real tensors; build them on the CPU
        return model_from_config(cfg, num_classes, initial_weights=False)


def log_run_summary(resolved: Any, plans: Sequence[Any], info: dict) -> str:
    """Log the summary (stderr, at info level), store it in the run; returns the text.

    The plan's own warnings are part of the summary, not separate log
    warnings: with --quiet stderr keeps only the warnings stages issue.
    """
    from pipeline.runs import Run

    facts = gather_facts(resolved, plans, info)
    cfg = plans[0].config
    few_steps = [] if cfg.head == "logreg" and not cfg.unfreeze_after else plan_warnings(facts)  # a fit: no steps
    from pipeline.train.plan import planned

    text = format_summary(planned(resolved, plans).table(), facts, [*warnings_so_far(), *few_steps])
    log.info(text)
    Run(resolved.config.run_dir).write_summary(text)
    return text


# ---------------------------------------------------------------- what Ctrl-C leaves behind


def saved_epochs(member: Any) -> int:
    """Epochs of a member saved in its last.pt (metrics.csv has one row per saved epoch)."""
    if not member.is_started or not member.metrics_path.is_file():
        return 0
    lines = Path(member.metrics_path).read_text(encoding="utf-8").splitlines()
    return max(0, len([line for line in lines if line.strip()]) - 1)


def interrupt_note(member: Any) -> str:
    """What an interrupted member has saved and how to go on (the Ctrl-C message)."""
    epochs = saved_epochs(member)
    if epochs == 0:
        return (f"interrupted before {member.dir} finished an epoch: nothing of it is saved; run the same command "
                "again (with --resume, members already finished are kept)")
    return (f"interrupted: {member.dir} has {epochs} finished epoch(s) saved in {member.last_path}; "
            "continue with the same command and --resume")


def cv_interrupt_note(run: Any) -> str:
    """The Ctrl-C message while the out-of-fold predictions are scored."""
    return (f"interrupted while scoring the out-of-fold predictions: every fold is saved; the same command with "
            f"--resume writes {run.oof_path} and {run.cv_path}")
