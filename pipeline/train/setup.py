"""A member set up to train: model, optimizer, precision, EMA and the data plan's loaders.

:func:`setup_member` serves both ``pipeline train`` and ``pipeline lr-find``,
from the member's :class:`~pipeline.train.plan.MemberPlan`: the same model,
the same order of memory format and ``--data-init``, the same loaders.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from pipeline import distributed as dist
from pipeline.checkpoint import load_checkpoint
from pipeline.config import TrainConfig
from pipeline.models.task import target_tensor
from pipeline.data.plan import DataPlan, plan_member
from pipeline.devices import resolve_device
from pipeline.models import model_from_config, unfreeze
from pipeline.runs import restore_parts
from pipeline.train.averaging import make_average
from pipeline.train.engine import BestTracker, EarlyStop, Runtime, build_optimizer, make_ema, make_runtime, phase
from pipeline.train.plan import MemberPlan

log = logging.getLogger("pipeline")


@dataclass
class MemberState:
    """Everything one member's epochs share."""

    plan: MemberPlan
    model: nn.Module  # the plain model: what checkpoints hold
    net: nn.Module  # what the loop calls: the model seen through the data plan, DDP, compile
    optimizer: torch.optim.Optimizer
    ema: object | None
    rt: Runtime
    criterion: nn.Module
    data: DataPlan | None
    best: BestTracker
    stopper: EarlyStop
    history: list
    first_epoch: int = 0
    reported: dict | None = None  # unreadable positions already warned about, per split
    improved: bool = False  # this epoch beat the best so far
    latest: dict | None = None  # this epoch's validation (probs, targets) per variant: live, ema
    kept: dict | None = None  # what the kept weights scored: epoch, variant, metric, and their validation
    head_fit: dict | None = None  # --head logreg: the fit's record (C, inner-CV curve), kept in the member
    average: object | None = None  # --average-last: the epochs' average (pipeline/train/averaging.py)
    prior: object | None = None  # the pretrained classifier's rows for the classes it knows by name (class_prior)

    def kept_parts(self):
        """The kept record as checkpoint state (its validation probabilities stay in memory)."""
        return _KeptState(self)

    def parts(self) -> dict:
        """The stateful parts a checkpoint holds; save and restore both use this one list."""
        return {"model": self.model, "ema": self.ema, "optimizer": self.optimizer, "scaler": self.rt.scaler,
                "best": self.best, "early_stop": self.stopper, "kept": self.kept_parts(), "average": self.average}


class _KeptState:
    """Saves and restores MemberState.kept (epoch, variant, metric, interval) in last.pt."""

    def __init__(self, st: MemberState):
        self.st = st

    def state_dict(self) -> dict:
        return {k: v for k, v in (self.st.kept or {}).items() if k != "valid"}

    def load_state_dict(self, state: dict) -> None:
        self.st.kept = dict(state) or None


def setup_member(plan: MemberPlan, metric: str, resume: bool = False) -> MemberState:
    """Model, optimizer, precision, EMA, data for ``plan``; restored from last.pt when resuming.

    A resumed run is set up in the phase (see :func:`pipeline.train.engine.phase`)
    of its next epoch; an optimizer saved at the end of the previous phase is
    not restored, since that phase's optimizer ends with it.
    """
    cfg, member = plan.config, plan.member
    device = resolve_device(cfg.device)
    saved = load_checkpoint(member.last_path) if resume and member.is_started else None
    first_epoch = int(saved["epoch"]) if saved else 0
    pcfg = phase(cfg, first_epoch)
    dplan = plan.device(device, first_epoch)  # every device decision (pipeline/devices.py), for this phase
    torch.backends.cudnn.benchmark = dplan.cudnn_benchmark
    for warning in dplan.warnings:
        log.warning(warning)
    torch.manual_seed(cfg.seed)
    width = plan.metadata.width if plan.metadata is not None else 0
    model = model_from_config(pcfg, plan.task.n_outputs, meta_width=width).to(device)
    prior = start_from_prior(model, cfg, plan.task) if not saved else None
    optimizer = build_optimizer(model, pcfg)
    rt = make_runtime(pcfg, device, plan.steps_per_epoch, dplan, first_epoch)
    weights = None
    if cfg.balance == "loss":
        weights = plan.task.balance_weights(target_tensor([it.target for it in plan.train_items]))
    criterion = plan.task.criterion(cfg.label_smoothing, weights)
    st = MemberState(plan, model, model, optimizer, make_ema(model, cfg.ema), rt, criterion, None,
                     BestTracker(metric), EarlyStop(cfg.early_stop), [], first_epoch=first_epoch, prior=prior,
                     average=make_average(model, cfg.average_last))
    if saved:
        parts = st.parts()
        if first_epoch == rt.first_epoch:  # a phase starts here: its optimizer is new
            parts.pop("optimizer")
        restore_parts(saved, parts)
        for group in optimizer.param_groups:  # base lrs come from this config, not the file
            group.setdefault("base_lr", group["lr"])
        st.history = list(saved["history"])
        log.info("resuming %s after epoch %d", member.dir, st.first_epoch)
    plan_data(st, pcfg, dplan)
    return st


def start_from_prior(model: nn.Module, cfg: TrainConfig, task):
    """--class-prior: the pretrained classifier's rows for the classes it knows by name; a trainable Linear
    head starts from them, the logreg head is fitted around them (pipeline/train/prior_fit.py)."""
    if task.kind != "single" or cfg.head == "mlp":
        return None
    from pipeline.models.class_prior import class_prior, start_head_from

    prior = class_prior(model, task.names, cfg.class_prior)
    if prior is not None and cfg.head == "linear":
        start_head_from(model, prior)
    return prior


def plan_data(st: MemberState, pcfg: TrainConfig, dplan, initial: bool = True) -> None:
    """The member's loaders for this phase and the network the loop calls (data plan, DDP, compile);
    ``initial``: the member's first setup, where --data-init may initialise it (never at a phase switch)."""
    model = st.model
    weights = None
    if pcfg.balance == "sampler":
        weights = st.plan.task.sample_weights(target_tensor([it.target for it in st.plan.train_items]))
    st.data = plan_member(pcfg, model, st.plan.training_rows, st.plan.valid_items, st.rt.device, dplan,
                          st.plan.meta if st.plan.metadata is not None else None, weights)
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


def unfreeze_member(st: MemberState, epoch: int) -> None:
    """--unfreeze-after: the whole model trains from ``epoch`` on, with a new optimizer and schedule."""
    cfg = st.plan.config
    log.info("epoch %d: backbone unfrozen; the whole model trains for %d epochs (backbone lr x %g)",
             epoch + 1, cfg.epochs - epoch, cfg.backbone_lr_scale)
    pcfg = phase(cfg, epoch)
    unfreeze(st.model)
    dplan = st.plan.device(st.rt.device, epoch)  # the whole model reads images now
    st.optimizer = build_optimizer(st.model, pcfg)
    st.rt = make_runtime(pcfg, st.rt.device, st.plan.steps_per_epoch, dplan, epoch)
    plan_data(st, pcfg, dplan, initial=False)
