"""Training: one model on a holdout split, one per CV fold, or one on train_valid.

``train(resolved)`` is the entry point. Each trained model (a *member*, see
pipeline/runs.py) is set up from the config (model, optimizer, precision,
EMA, the data plan's loaders), trained epoch by epoch by pipeline/train/engine.py,
and saved every epoch through the run layout's symmetric save/restore, so
``--resume`` continues exactly where an uninterrupted run would be.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from pipeline import distributed as dist, shm
from pipeline.train.adapt import adapt_to_data
from pipeline.checkpoint import load_checkpoint
from pipeline.competition import Competition, get_competition
from pipeline.config import Resolved, TrainConfig
from pipeline.data.items import BAD_TARGET, Item, load_reorg, training_fingerprint, unreadable_message
from pipeline.data.plan import DataPlan, plan_for, plan_member
from pipeline.train.engine import (BestTracker, EarlyStop, Runtime, build_optimizer, deferred_interrupt, make_ema,
                             make_runtime, phase, train_one_epoch)
from pipeline.errors import PipelineError
from pipeline.models.inference import infer, unreadable_positions
from pipeline.io import atomic_write_json
from pipeline.train.members import MemberResult, already_done, check_members, plan_members
from pipeline.metrics import bootstrap_interval, score
from pipeline.models import create_model, freeze_backbone, unfreeze
from pipeline.progress import epoch_line, log_scalars, stage, tensorboard_writer
from pipeline.runs import Member, Run, restore_parts, save_epoch
from pipeline.predict.submission import positive_index, submission_clip
from pipeline.train.summary import cv_interrupt_note, interrupt_note, log_run_summary

log = logging.getLogger("pipeline")


def kept_variant(cfg: TrainConfig, st) -> str | None:
    """Which weights of this epoch predict keeps, or None to keep the earlier ones.

    last: every epoch replaces them (EMA weights when EMA is on): no selection on
    the validation data, so its score is honest. best: only an improving epoch.
    """
    if cfg.select == "last":
        return "ema" if st.ema is not None else "live"
    return st.best.variant if st.improved else None


def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    model = create_model(cfg.model, num_classes, pretrained=cfg.pretrained, weights=cfg.weights,
                         head=cfg.model_head, head_hidden=cfg.head_hidden, drop_rate=cfg.drop_rate)
    if cfg.freeze_backbone:
        freeze_backbone(model)
    return model


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
    best: BestTracker
    stopper: EarlyStop
    history: list
    first_epoch: int = 0
    reported: dict | None = None  # unreadable positions already warned about, per split
    improved: bool = False  # this epoch beat the best so far
    latest: dict | None = None  # this epoch's validation (probs, targets) per variant: live, ema
    kept: dict | None = None  # what the kept weights scored: epoch, variant, metric, and their validation

    def kept_parts(self):
        """The kept record as checkpoint state (its validation probabilities stay in memory)."""
        return _KeptState(self)

    def parts(self) -> dict:
        """The stateful parts a checkpoint holds; save and restore both use this one list."""
        return {"model": self.model, "ema": self.ema, "optimizer": self.optimizer, "scaler": self.rt.scaler,
                "best": self.best, "early_stop": self.stopper, "kept": self.kept_parts()}


class _KeptState:
    """Saves and restores MemberState.kept (epoch, variant, metric, interval) in last.pt."""

    def __init__(self, st: MemberState):
        self.st = st

    def state_dict(self) -> dict:
        return {k: v for k, v in (self.st.kept or {}).items() if k != "valid"}

    def load_state_dict(self, state: dict) -> None:
        self.st.kept = dict(state) or None


def _setup_member(cfg: TrainConfig, comp: Competition, n_classes: int, member: Member, train_items: list[Item],
                  valid_items: list[Item], resume: bool) -> MemberState:
    """Model, optimizer, precision, EMA, data; restored from last.pt when resuming.

    A resumed run is set up in the phase (see :func:`pipeline.train.engine.phase`)
    of its next epoch; an optimizer saved at the end of the previous phase is
    not restored, since that phase's optimizer ends with it.
    """
    device = dist.resolve_device(cfg.device)
    dplan = plan_for(cfg, device)  # every device decision (pipeline/devices.py), recorded with the member
    torch.backends.cudnn.benchmark = dplan.cudnn_benchmark
    for warning in dplan.warnings:
        log.warning(warning)
    saved = load_checkpoint(member.last_path) if resume and member.is_started else None
    first_epoch = int(saved["epoch"]) if saved else 0
    pcfg = phase(cfg, first_epoch)
    torch.manual_seed(cfg.seed)
    model = build_model(pcfg, n_classes).to(device)
    optimizer = build_optimizer(model, pcfg)
    rt = make_runtime(pcfg, device, len(train_items), dplan, first_epoch)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing, ignore_index=BAD_TARGET)
    st = MemberState(model, model, optimizer, make_ema(model, cfg.ema), rt, criterion, None, BestTracker(comp.metric),
                     EarlyStop(cfg.early_stop), [], first_epoch=first_epoch)
    if saved:
        parts = st.parts()
        if first_epoch == rt.first_epoch:  # a phase starts here: its optimizer is new
            parts.pop("optimizer")
        restore_parts(saved, parts)
        for group in optimizer.param_groups:  # base lrs come from this config, not the file
            group.setdefault("base_lr", group["lr"])
        st.history = list(saved["history"])
        log.info("resuming %s after epoch %d", member.dir, st.first_epoch)
    _plan_data(st, pcfg, train_items, valid_items, dplan)
    return st


def _plan_data(st: MemberState, pcfg: TrainConfig, train_items: list[Item], valid_items: list[Item],
               dplan, initial: bool = True) -> None:
    """The member's loaders for this phase and the network the loop calls (data plan, DDP, compile);
    ``initial``: the member's first setup, where --data-init may initialise it (never at a phase switch)."""
    model = st.model
    st.data = plan_member(pcfg, model, train_items, valid_items, st.rt.device, dplan)
    if st.rt.channels_last:
        model.to(memory_format=torch.channels_last)  # in place: the optimizer keeps its parameters
    if initial and st.first_epoch == 0:
        initialise_from_data(model, pcfg, st.data)
    st.net = dist.wrap(st.data.view(model), st.rt.device, find_unused=st.data.find_unused)
    if pcfg.compile:
        st.net = torch.compile(st.net)
    st.reported = st.reported or {"train": set(), "valid": set()}
    st.reported["train"] |= set(st.data.unreadable_train)


def initialise_from_data(model: nn.Module, cfg: TrainConfig, data: DataPlan) -> None:
    """--data-init: the model initialises itself from a training image batch where it can (fastnet: a
    whitening first layer); not on cached features, which the backbone as built already produced."""
    if not (cfg.data_init and hasattr(model, "init_from_data")):
        return
    if data.source.kind == "features":
        log.warning("--data-init skipped: the backbone is frozen, its features are cached as initialised")
        return
    model.init_from_data(next(iter(data.train))[0])


def _unfreeze_member(st: MemberState, cfg: TrainConfig, epoch: int, train_items: list[Item],
                     valid_items: list[Item]) -> None:
    """--unfreeze-after: the whole model trains from ``epoch`` on, with a new optimizer and schedule."""
    log.info("epoch %d: backbone unfrozen; the whole model trains for %d epochs (backbone lr x %g)",
             epoch + 1, cfg.epochs - epoch, cfg.backbone_lr_scale)
    pcfg = phase(cfg, epoch)
    unfreeze(st.model)
    st.optimizer = build_optimizer(st.model, pcfg)
    st.rt = make_runtime(pcfg, st.rt.device, len(train_items), st.data.device, epoch)
    _plan_data(st, pcfg, train_items, valid_items, st.data.device, initial=False)


def _warn_unreadable(st: MemberState, split: str, bad: set[int], items: list[Item], verb: str) -> None:
    """One warning per run for the unreadable images of a split (not one per epoch)."""
    if bad - st.reported[split]:
        noun = {"train": "training images", "valid": "validation images"}[split]
        log.warning("%s %s", verb, unreadable_message(items, bad, noun))
        st.reported[split] |= bad


def _validate(st: MemberState, cfg: TrainConfig, comp: Competition, n_classes: int) -> tuple[dict, set[int]]:
    """Scores of the live weights and, with --ema, of the averaged ones, through :func:`infer`.

    Scored as the submission will be (the run's TTA, the submission's
    probability floor). Unreadable images (target BAD_TARGET) are left out of
    the scores; their positions come back for the caller to report.
    """
    rt, st.latest, row = st.rt, {}, {}
    names = tuple(dict.fromkeys(("accuracy", "log_loss", comp.metric)))  # the competition's metric too
    views = {"live": st.net, "ema": st.ema is not None and st.data.view(st.ema.module)}
    for variant, net in views.items():
        if net is False:
            continue
        p, t, pos = infer(net, st.data.valid, rt.device, tta=cfg.tta, amp_dtype=rt.amp_dtype,
                          channels_last=rt.channels_last)
        if not np.isfinite(p).all():
            raise PipelineError("the model's validation outputs are NaN or infinite: training diverged; "
                                "lower --lr, add --clip-grad 1, or raise --batch-size")
        keep = t != BAD_TARGET
        st.latest[variant] = (p[keep], t[keep])
        suffix = "_ema" if variant == "ema" else ""
        scores = score(p[keep], t[keep], n_classes, names, clip=submission_clip(comp), positive=positive_index(comp))
        row.update({f"valid_{k}{suffix}": v for k, v in scores.items()})
    return {"valid_loss": row["valid_log_loss"], **row}, unreadable_positions(t, pos)


def _run_epoch(cfg: TrainConfig, comp: Competition, st: MemberState, epoch: int, train_items: list[Item],
               valid_items: list[Item], n_classes: int) -> dict:
    """Train one epoch and score it; the metrics.csv row."""
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed * 1000 + epoch)  # dropout etc.: the same stream on resume
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    st.rt.step = (epoch - st.rt.first_epoch) * st.rt.steps_per_epoch  # each phase has its own schedule
    st.data.train.sampler.set_epoch(epoch)
    if cfg.head == "logreg":  # a convex fit on the cached features instead of an epoch of SGD
        from pipeline.train.logreg import fit_feature_head
        loss, steps, bad = fit_feature_head(st.model, st.data.train, n_classes, cfg.seed), 0, set()
    else:
        loss, steps, bad = train_one_epoch(st.net, st.data.train, st.optimizer, st.criterion, cfg, st.rt, st.ema, epoch, gen)
    _warn_unreadable(st, "train", bad, train_items, "skipping")
    row = {"epoch": epoch + 1, "train_loss": loss, "lr": st.optimizer.param_groups[-1]["lr"], "steps": steps}
    if st.data.valid is not None:
        scores, bad = _validate(st, cfg, comp, n_classes)
        row.update(scores)
        _warn_unreadable(st, "valid", bad, valid_items, "not scoring")
    row["seconds"] = round(time.perf_counter() - t0, 3)
    return row


def _keep(st: MemberState, cfg: TrainConfig, comp: Competition, row: dict) -> str | None:
    """Record the kept weights' epoch and score when this epoch's weights are kept; their variant."""
    variant = kept_variant(cfg, st)
    if variant is not None:
        suffix = "_ema" if variant == "ema" else ""
        st.kept = {"epoch": row["epoch"], "variant": variant, "metric": row.get(f"valid_{comp.metric}{suffix}"),
                   "selection": cfg.select, "valid": (st.latest or {}).get(variant)}
    return variant


def _save(member: Member, st: MemberState, cfg: TrainConfig, data: dict, variant: str | None) -> None:
    """The epoch's files through the run layout; Ctrl-C waits until all are written.

    best.pt holds the weights predict uses (see :func:`kept_variant`), the
    config, the class names and the fingerprint of the training data.
    """
    meta = {"epoch": len(st.history), "history": st.history, "config": cfg.to_json(), **data}
    kept = None
    if variant is not None:
        weights = st.ema.module if variant == "ema" else st.model
        kept = {"model": weights.state_dict(), "config": meta["config"], **data,
                "epoch": meta["epoch"], "best": st.best.state_dict(), "kept": st.kept_parts().state_dict()}
    with deferred_interrupt():
        save_epoch(member, st.parts(), meta, kept, st.history)


def fit_member(cfg: TrainConfig, comp: Competition, data: dict, member: Member,
               train_items: list[Item], valid_items: list[Item], resume: bool) -> MemberResult:
    """Train one model; checkpoints in the member's folder; returns what its kept weights scored.

    ``data`` holds the class names and the training data's fingerprint, stored
    with the weights so predict can match them by name.
    """
    start, n_classes = time.perf_counter(), len(data["classes"])
    st = _setup_member(cfg, comp, n_classes, member, train_items, valid_items, resume)
    if dist.is_main():
        member.write_config(replace(cfg, head=cfg.model_head).to_json(), st.data.device.to_json())
    board = tensorboard_writer(member.tensorboard_dir) if cfg.tensorboard and dist.is_main() else None
    stopped = False
    for epoch in range(st.first_epoch, cfg.epochs):
        if epoch == cfg.unfreeze_after and epoch > st.first_epoch:
            _unfreeze_member(st, cfg, epoch, train_items, valid_items)
        pcfg = phase(cfg, epoch)
        saved_cfg = replace(pcfg, head=pcfg.model_head)  # logreg: an ordinary linear head for predict
        row = _run_epoch(pcfg, comp, st, epoch, train_items, valid_items, n_classes)
        st.history.append(row)
        st.improved = st.best.update(row, st.ema is not None, validated=st.data.valid is not None)
        stopped = st.stopper.step(st.improved)
        variant = _keep(st, cfg, comp, row)
        if dist.is_main():
            _save(member, st, saved_cfg, data, variant)
            log_scalars(board, row)
        log.info(epoch_line(row, comp.metric, cfg.epochs))
        if stopped:
            log.info("early stop: no improvement of %s for %d epochs", comp.metric, st.stopper.stale)
            break
    kept = finish_kept(st, comp, n_classes)
    if dist.is_main():
        member.mark_done({"epochs": len(st.history), "best": st.best.state_dict(), "kept": kept,
                          "stopped_early": stopped})
    return MemberResult(member.name, member.dir, len(st.history), st.best.epoch, st.best.metric,
                        time.perf_counter() - start, kept=kept)


def finish_kept(st: MemberState, comp: Competition, n_classes: int) -> dict:
    """The kept weights' record with its validation size and a bootstrap 95% interval of the score."""
    kept = {k: v for k, v in (st.kept or {}).items() if k != "valid"}
    valid = (st.kept or {}).get("valid")
    if valid is not None:  # after a resume the kept epoch's probabilities are gone: no new interval
        probs, targets = valid
        lo, hi = bootstrap_interval(probs, targets, n_classes, comp.metric, clip=submission_clip(comp))
        kept.update(valid_images=int(len(targets)), interval=[lo, hi])
    return kept


# ---------------------------------------------------------------- the stage


def train(resolved: Resolved | TrainConfig, resume: bool = False, force: bool = False) -> list[MemberResult]:
    """Train every member the config asks for; writes the run's files into cfg.run_dir.

    One writer per run: a second `pipeline train` on the same RUN_DIR is
    refused while this one holds the run's lock.
    """
    if isinstance(resolved, TrainConfig):  # a caller's own config: every value is theirs, none adapted
        resolved = Resolved(resolved, {f: "caller" for f in resolved.to_json()})
    cfg = resolved.config
    with Run(cfg.run_dir).lock(enabled=dist.is_main()):
        return _train_locked(resolved, resume, force)


def _train_locked(resolved: Resolved, resume: bool, force: bool) -> list[MemberResult]:
    cfg = resolved.config
    comp = get_competition(cfg.competition)
    info = load_reorg(cfg.work_dir)
    if info["competition"] != comp.slug:
        raise PipelineError(f"{cfg.work_dir} was reorganised for {info['competition']!r}, not {comp.slug!r}")
    data = {"classes": info["classes"], "competition": comp.slug,
            "fingerprint": training_fingerprint(cfg.work_dir, info)}
    members = plan_members(cfg, info)
    resolved, configs = _adapted(resolved, members)
    check_members(cfg, members, len(info["classes"]), resume, force)
    if dist.is_main():
        Run(cfg.run_dir).unmark_done()
        atomic_write_json(Run(cfg.run_dir).config_path, {**resolved.to_json(), "data": data})
        shown = replace(resolved, config=configs[0])  # the adapted plan: what the members will run
        log_run_summary(shown, members, info, lambda c: build_model(c, len(info["classes"])))
    results = []
    for (member, train_items, valid_items), member_cfg in zip(members, configs):
        member_cfg = replace(member_cfg, batch_size=min(member_cfg.batch_size, dist.per_process(len(train_items))))
        if member.fold is not None:  # each member records the one fold it trained on
            member_cfg = replace(member_cfg, folds=0, fold=member.fold)
        done = already_done(member, member_cfg) if resume else None
        if done is not None:
            log.info("%s: finished (%d epochs); skipped", member.dir, done.epochs)
            results.append(done)
            continue
        with stage(lambda m=member: interrupt_note(m)), shm.guard("; then the same command with --resume"):
            results.append(fit_member(member_cfg, comp, data, member, train_items, valid_items, resume))
        dist.barrier()
    if cfg.mode == "folds" and dist.is_main():
        from pipeline.predict.cv import write_cv

        with stage(lambda: cv_interrupt_note(Run(cfg.run_dir))):
            write_cv(cfg, comp, info)
    if dist.is_main():
        Run(cfg.run_dir).mark_done({"members": [r.name for r in results]})
    return results


def planned(resolved: Resolved) -> Resolved:
    """What --dry-run shows: the first member's settings adapted to the work folder's images, changes
    marked with their source "adapted"."""
    info = load_reorg(resolved.config.work_dir)
    resolved, configs = _adapted(resolved, plan_members(resolved.config, info))
    changed = {k: "adapted" for k, v in configs[0].to_json().items() if v != resolved.config.to_json()[k]}
    return replace(resolved, config=configs[0], sources={**resolved.sources, **changed})


def _adapted(resolved: Resolved, members: list) -> tuple[Resolved, list[TrainConfig]]:
    """Each member's config adapted to its training images; the changes logged and kept in the run's notes."""
    pairs = [adapt_to_data(resolved.config, dist.per_process(len(tr)), resolved.sources) for _, tr, _ in members]
    notes = tuple(dict.fromkeys(note for _, member_notes in pairs for note in member_notes))
    for note in notes:
        log.warning("recipe adapted to the data: %s", note)
    return replace(resolved, notes=tuple(dict.fromkeys((*resolved.notes, *notes)))), [c for c, _ in pairs]
