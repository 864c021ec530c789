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
from dataclasses import replace

import numpy as np
import torch

from pipeline import distributed as dist
from pipeline.data import shm
from pipeline.competition import Competition, get_competition
from pipeline.config import Resolved, TrainConfig
from pipeline.models.task import bad_mask
from pipeline.data.items import Item, load_reorg, training_fingerprint, unreadable_message
from pipeline.errors import PipelineError
from pipeline.metrics import LOSS_METRICS, bootstrap_interval, reported_metrics, score, valid_key
from pipeline.models.inference import infer, unreadable_positions
from pipeline.predict.submission import positive_index, submission_clip
from pipeline.progress import epoch_line, log_scalars, stage, tensorboard_writer
from pipeline.runs import Member, Run, save_epoch
from pipeline.train.oom import restart_halved
from pipeline.train.averaging import update_average, warn_unaveraged
from pipeline.train.budget import time_is_up
from pipeline.train.engine import deferred_interrupt, phase, train_one_epoch
from pipeline.train.members import MemberResult, already_done, check_members
from pipeline.train.parallel import mark_run_done, member_locks, write_run_config
from pipeline.train.plan import MemberPlan, log_plan_warnings, plan_run
from pipeline.train.setup import MemberState, setup_member, unfreeze_member
from pipeline.train.summary import cv_interrupt_note, interrupt_note, log_run_summary

log = logging.getLogger("pipeline")


def kept_variant(cfg: TrainConfig, st) -> str | None:
    """Which weights of this epoch predict keeps, or None to keep the earlier ones.

    last: every epoch replaces them (EMA weights when EMA is on): no selection on
    the validation data, so its score is honest. best: only an improving epoch.
    """
    if cfg.select == "last":
        if st.average is not None and st.average.epochs:  # --average-last: the average once it holds an epoch
            return "average"
        return "ema" if st.ema is not None else "live"
    return st.best.variant if st.improved else None


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
    rt, st.latest, row, task = st.rt, {}, {}, st.plan.task
    names = reported_metrics(comp.metric, task.kind)
    views = {"live": st.net, "ema": st.ema is not None and st.data.view(st.ema.module),
             "average": st.average is not None and bool(st.average.epochs) and st.data.view(st.average.module)}
    for variant, net in views.items():
        if net is False:
            continue
        p, t, pos = infer(net, st.data.valid, rt.device, tta=cfg.tta, amp_dtype=rt.amp_dtype,
                          channels_last=rt.channels_last, activation=task.activation)
        if not np.isfinite(p).all():
            raise PipelineError("the model's validation outputs are NaN or infinite: training diverged; "
                                "lower --lr, add --clip-grad 1, or raise --batch-size")
        keep = ~bad_mask(t)
        st.latest[variant] = (p[keep], t[keep])
        scores = score(p[keep], t[keep], n_classes, names, clip=submission_clip(comp), positive=positive_index(comp),
                       task=task, beta=comp.beta)
        row.update({valid_key(k, variant): v for k, v in scores.items()})
    return {"valid_loss": row[valid_key(LOSS_METRICS[task.kind])], **row}, unreadable_positions(t, pos)


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
        (loss, st.head_fit), steps, bad = fit_feature_head(st.model, st.data.train, st.plan.task, cfg.seed,
                                                           st.prior), 0, set()
    else:
        loss, steps, bad = train_one_epoch(st.net, st.data.train, st.optimizer, st.criterion, cfg, st.rt, st.ema, epoch, gen)
        update_average(st, st.model, epoch, cfg.epochs)
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
        st.kept = {"epoch": row["epoch"], "variant": variant, "metric": row.get(valid_key(comp.metric, variant)),
                   "selection": cfg.select, "valid": (st.latest or {}).get(variant)}
        if variant == "average":
            st.kept["averaged_epochs"] = [e + 1 for e in st.average.epochs]
    return variant


def _save(member: Member, st: MemberState, cfg: TrainConfig, data: dict, variant: str | None) -> None:
    """The epoch's files through the run layout; Ctrl-C waits until all are written.

    best.pt holds the weights predict uses (see :func:`kept_variant`), the
    config, the class names and the fingerprint of the training data.
    """
    meta = {"epoch": len(st.history), "history": st.history, "config": cfg.to_json(), **data}
    kept = None
    if variant is not None:
        weights = {"ema": st.ema and st.ema.module, "average": st.average and st.average.module}.get(variant) or st.model
        kept = {"model": weights.state_dict(), "config": meta["config"], **data,
                "epoch": meta["epoch"], "best": st.best.state_dict(), "kept": st.kept_parts().state_dict()}
    with deferred_interrupt():
        save_epoch(member, st.parts(), meta, kept, st.history)
        if st.head_fit is not None:
            member.write_head_fit(st.head_fit)


def fit_member(plan: MemberPlan, comp: Competition, data: dict, resume: bool) -> MemberResult:
    """Train one model; checkpoints in the member's folder; returns what its kept weights scored.

    ``data`` holds the class names and the training data's fingerprint, stored
    with the weights so predict can match them by name.
    """
    cfg, member, train_items, valid_items = plan.config, plan.member, plan.train_items, plan.valid_items
    start, n_classes = time.perf_counter(), plan.task.n_outputs
    if plan.task.kind != "single":  # the member's own standardisation and range travel with its weights
        data = {**data, "task": plan.task.to_json()}
    if plan.metadata is not None:  # and the encoding of its metadata columns
        data = {**data, "metadata": plan.metadata.to_json()}
    st = setup_member(plan, comp.metric, resume)
    if dist.is_main():
        member.write_config(replace(cfg, head=cfg.model_head).to_json(), st.data.device.to_json(), plan.to_json())
    board = tensorboard_writer(member.tensorboard_dir) if cfg.tensorboard and dist.is_main() else None
    stopped = out_of_time = False
    epoch = st.first_epoch
    while epoch < cfg.epochs:
        if epoch == cfg.unfreeze_after and epoch > st.first_epoch:
            unfreeze_member(st, epoch)
        pcfg = phase(cfg, epoch)
        saved_cfg = replace(pcfg, head=pcfg.model_head)  # logreg: an ordinary linear head for predict
        try:
            row = _run_epoch(pcfg, comp, st, epoch, train_items, valid_items, n_classes)
        except torch.OutOfMemoryError as exc:  # --batch-size auto: half the batch, this epoch again
            st = None  # its memory goes before the member is set up again
            plan, st = restart_halved(plan, comp.metric, epoch, exc)
            cfg = plan.config
            continue
        epoch += 1
        st.history.append(row)
        st.improved = st.best.update(row, st.ema is not None, validated=st.data.valid is not None)
        stopped = st.stopper.step(st.improved)
        out_of_time = not dist.all_true(not time_is_up(time.perf_counter() - start, row["seconds"], cfg.time_limit))
        variant = _keep(st, cfg, comp, row)
        if dist.is_main():
            _save(member, st, saved_cfg, data, variant)
            log_scalars(board, row)
        log.info(epoch_line(row, comp.metric, cfg.epochs))
        if stopped:
            log.info("early stop: no improvement of %s for %d epochs", comp.metric, st.stopper.stale)
            break
        if out_of_time and epoch < cfg.epochs:
            log.warning("--time-limit %g min: %s stops after epoch %d of %d (another would pass the limit)",
                        cfg.time_limit, member.name, epoch, cfg.epochs)
            break
    warn_unaveraged(st, cfg)
    kept = finish_kept(st, comp, n_classes)
    if dist.is_main():
        member.mark_done({"epochs": len(st.history), "best": st.best.state_dict(), "kept": kept,
                          "stopped_early": stopped, "time_limit_hit": out_of_time and len(st.history) < cfg.epochs})
    return MemberResult(member.name, member.dir, len(st.history), st.best.epoch, st.best.metric,
                        time.perf_counter() - start, kept=kept)


def finish_kept(st: MemberState, comp: Competition, n_classes: int) -> dict:
    """The kept weights' record with its validation size and a bootstrap 95% interval of the score."""
    kept = {k: v for k, v in (st.kept or {}).items() if k != "valid"}
    valid = (st.kept or {}).get("valid")
    if valid is not None:  # after a resume the kept epoch's probabilities are gone: no new interval
        probs, targets = valid
        lo, hi = bootstrap_interval(probs, targets, n_classes, comp.metric, clip=submission_clip(comp),
                                    task=st.plan.task, beta=comp.beta)
        kept.update(valid_images=int(len(targets)), interval=[lo, hi])
    return kept


# ---------------------------------------------------------------- the stage


def train(resolved: Resolved | TrainConfig, resume: bool = False, force: bool = False) -> list[MemberResult]:
    """Train every member the config asks for; writes the run's files into cfg.run_dir.

    One writer per member: a second `pipeline train` of the same member is
    refused while this one holds its lock; other members (``--fold K``) may
    train at once, and the last to finish assembles the CV.
    """
    if isinstance(resolved, TrainConfig):  # a caller's own config: every value is theirs, none adapted
        resolved = Resolved(resolved, {f: "caller" for f in resolved.to_json()})
    cfg = resolved.config
    with member_locks(cfg, enabled=dist.is_main()):  # other members may train at once (train/parallel.py)
        return _train_locked(resolved, resume, force)


def _train_locked(resolved: Resolved, resume: bool, force: bool) -> list[MemberResult]:
    cfg = resolved.config
    comp = get_competition(cfg.competition)
    info = load_reorg(cfg.work_dir, comp.slug)
    data = {"classes": info["classes"], "competition": comp.slug,
            "fingerprint": training_fingerprint(cfg.work_dir, info)}
    resolved, plans = plan_run(resolved, info, probe=True)
    log_plan_warnings(plans)
    check_members(cfg, plans, len(info["classes"]), resume, force)
    if dist.is_main():
        Run(cfg.run_dir).unmark_done()
        write_run_config(resolved, data)  # the run's settings, also when this process trains one fold
        log_run_summary(resolved, plans, info)
    results = []
    for plan in plans:
        done = already_done(plan.member, plan.config) if resume else None
        if done is not None:
            log.info("%s: finished (%d epochs); skipped", plan.member.dir, done.epochs)
            results.append(done)
            continue
        # Ctrl-C says what of this member is saved; a worker out of shared memory, how to go on
        with stage(lambda m=plan.member: interrupt_note(m)), shm.guard("; then the same command with --resume"):
            results.append(fit_member(plan, comp, data, resume))
        dist.barrier()
    if cfg.mode == "folds" and dist.is_main():
        from pipeline.predict.cv import assemble_cv

        with stage(lambda: cv_interrupt_note(Run(cfg.run_dir))):
            assemble_cv(cfg, comp, info)  # once, by whichever process finishes the last fold
    if dist.is_main():
        mark_run_done(cfg)  # every finished member of the run, whichever process ends last
    return results


def planned(resolved: Resolved) -> Resolved:
    """What --dry-run shows: the first member's plan (see :func:`pipeline.train.plan.planned`)."""
    from pipeline.train.plan import planned as shown

    adapted, plans = plan_run(resolved, load_reorg(resolved.config.work_dir))
    log_plan_warnings(plans)
    return shown(adapted, plans)
