"""The training engine: schedule, optimizer, one epoch, precision, EMA and the trackers.

Everything here is per step or per epoch and knows nothing of runs or files:
the learning rate is a pure function of the step (:func:`lr_multiplier`), every
epoch re-seeds its randomness from (seed, epoch), and the best-epoch and
early-stop trackers carry their own state, so a resumed run replays exactly
what an uninterrupted one does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from pipeline import distributed as dist
from pipeline.config import TrainConfig
from pipeline.models.task import bad_mask
from pipeline.devices import DevicePlan, autocast
from pipeline.errors import PipelineError
from pipeline.metrics import better, valid_key
from pipeline.models import compute_loss, param_groups, set_train_mode
from pipeline.models.fusion import batch_meta, call
from pipeline.progress import deferred, track


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


def phase(cfg: TrainConfig, epoch: int) -> TrainConfig:
    """The settings epoch ``epoch`` (0-based) trains with.

    With --unfreeze-after N (fastai's fine_tune) the first N epochs train the
    head on the frozen backbone (a logreg head is fitted there), the others the
    whole model with a linear head; without it every epoch uses ``cfg``.
    """
    if not cfg.unfreeze_after:
        return cfg
    if epoch < cfg.unfreeze_after:
        return replace(cfg, freeze_backbone=True)
    return replace(cfg, freeze_backbone=False, head=cfg.model_head)


def phase_span(cfg: TrainConfig, epoch: int) -> tuple[int, int]:
    """The first epoch and the epoch count of the phase holding ``epoch``: each phase has its own schedule."""
    n = cfg.unfreeze_after
    if not n:
        return 0, cfg.epochs
    return (0, n) if epoch < n else (n, cfg.epochs - n)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD/Adam/AdamW over the model's groups (no weight decay on norms and biases)."""
    if cfg.layer_decay:
        from pipeline.models.layer_decay import layer_decay_groups

        groups = layer_decay_groups(model, cfg.lr, cfg.weight_decay, cfg.layer_decay, cfg.backbone_lr_scale)
    else:
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
    total_steps: int  # in this phase (see :func:`phase_span`): the schedule's length
    step: int = 0  # within the phase
    first_epoch: int = 0  # the phase's first epoch
    channels_last: bool = False  # from the device plan: image batches only
    non_blocking: bool = False  # async host-to-device copies (CUDA)

    def autocast(self):
        return autocast(self.device, self.amp_dtype)


def train_one_epoch(model: nn.Module, loader, optimizer, criterion, cfg: TrainConfig, rt: Runtime,
                    ema, epoch: int, gen: torch.Generator) -> tuple[float, int, set[int]]:
    """One pass; returns the mean training loss, the optimizer steps taken and unreadable positions."""
    set_train_mode(model, True)
    aux_weights = getattr(dist.unwrap(model), "aux_loss_weights", ())
    loss_sum = torch.zeros((), device=rt.device)  # summed on device: no host sync per step
    seen, first_step = 0, rt.step
    unreadable = []  # dataset positions whose image could not be decoded (file loaders only)
    images = rt.steps_per_epoch * cfg.batch_size * cfg.accum_steps
    bar = track(loader, f"epoch {epoch + 1}/{cfg.epochs}", total=images,
                enabled=dist.is_main())
    bar.set_postfix(loss=lambda: f"{loss_sum.item() / max(seen, 1):.4f}")  # read only when a line is drawn
    accum = cfg.accum_steps  # micro-batches summed into each optimizer step
    for i, (x, y, idx) in enumerate(bar):
        if i >= rt.steps_per_epoch * accum:
            break
        meta = batch_meta(loader, idx, rt.device)  # the batch's metadata rows, when the member has metadata
        if y.device.type == "cpu":  # checked before the copy: no host sync
            unreadable.append(idx[bad_mask(y)])
        x = x.to(rt.device, non_blocking=rt.non_blocking)
        y = y.to(rt.device, non_blocking=rt.non_blocking)
        if rt.channels_last and x.ndim == 4:  # the data plan decides; feature batches are 2-D
            x = x.contiguous(memory_format=torch.channels_last)
        if i % accum == 0:
            set_lr(optimizer, lr_multiplier(rt.step, rt.total_steps, rt.steps_per_epoch, cfg))
            optimizer.zero_grad(set_to_none=True)
        x, y_a, y_b, lam = mix_batch(x, y, cfg, gen)
        with rt.autocast():
            out = call(model, x, meta)  # mixup/cutmix mix the images; each row keeps its own metadata
            loss = lam * compute_loss(out, y_a, criterion, aux_weights)
            if lam < 1:
                loss = loss + (1 - lam) * compute_loss(out, y_b, criterion, aux_weights)
        backward(loss / accum, rt)  # equal micro-batches (drop_last): the mean over the big batch
        if i % accum == accum - 1:
            optimizer_step(optimizer, model, cfg, rt)
            if ema is not None:
                ema.update_parameters(dist.unwrap(model))
            rt.step += 1
        loss_sum += loss.detach() * x.shape[0]
        seen += x.shape[0]
    total = dist.all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(seen), device=rt.device)]))
    if not torch.isfinite(total[0]):
        raise PipelineError(f"the training loss became {float(total[0])} in epoch {epoch + 1}: training diverged; "
                            "lower --lr or add --clip-grad 1")
    bad = {int(i) for part in unreadable for i in part}
    return float(total[0] / max(total[1], 1)), rt.step - first_step, bad


def backward(loss: torch.Tensor, rt: Runtime) -> None:
    """Gradients of ``loss`` added to the parameters' (GradScaler for fp16)."""
    if rt.scaler is not None:
        rt.scaler.scale(loss).backward()
    else:
        loss.backward()


def backward_step(loss: torch.Tensor, optimizer, model: nn.Module, cfg: TrainConfig, rt: Runtime) -> None:
    """Backward and the optimizer step of one batch (no accumulation)."""
    backward(loss, rt)
    optimizer_step(optimizer, model, cfg, rt)


def optimizer_step(optimizer, model: nn.Module, cfg: TrainConfig, rt: Runtime) -> None:
    """Optional gradient clipping (of the unscaled gradients), then the optimizer step.

    No host sync here: a non-finite loss is caught once per epoch, from the sum.
    """
    if rt.scaler is not None:
        rt.scaler.unscale_(optimizer)
    if cfg.clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
    if rt.scaler is not None:
        rt.scaler.step(optimizer)
        rt.scaler.update()
    else:
        optimizer.step()


def make_runtime(cfg: TrainConfig, device: torch.device, steps: int, plan: DevicePlan, epoch: int = 0) -> Runtime:
    """The runtime of the phase holding ``epoch``: ``steps`` per epoch (the member plan's), precision and
    memory format as the member's device plan (pipeline/devices.py) decided."""
    scaler = torch.amp.GradScaler(device.type) if plan.grad_scaler else None
    first, epochs = phase_span(cfg, epoch)
    return Runtime(device, plan.dtype, scaler, steps, steps * epochs, first_epoch=first,
                   channels_last=plan.channels_last, non_blocking=plan.non_blocking)


def make_ema(model: nn.Module, decay: float):
    """An exponential moving average of the weights (and BN buffers), or None."""
    if not decay:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def deferred_interrupt():
    """Hold Ctrl-C, SIGTERM and SIGHUP back until the block ends, then raise: an epoch's files are all or none."""
    return deferred()


@dataclass
class BestTracker:
    """The best epoch so far by the competition's metric, of the live or the EMA weights."""

    metric_name: str
    epoch: int = 0
    metric: float = math.nan
    variant: str = "live"

    def update(self, row: dict, has_ema: bool, validated: bool) -> bool:
        """Record the epoch if it improved (always, without validation); True when it did."""
        live = row.get(valid_key(self.metric_name), math.nan)
        variant, metric = "live", live
        if has_ema and better(self.metric_name, row.get(valid_key(self.metric_name, "ema"), math.nan), live):
            variant, metric = "ema", row[valid_key(self.metric_name, "ema")]
        if validated and not better(self.metric_name, metric, self.metric):
            return False
        self.epoch, self.metric, self.variant = row["epoch"], metric, variant
        return True

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "metric": self.metric, "variant": self.variant}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.metric, self.variant = int(state["epoch"]), float(state["metric"]), state["variant"]


@dataclass
class EarlyStop:
    """Stop after ``patience`` epochs without improvement (0: never)."""

    patience: int
    stale: int = 0

    def step(self, improved: bool) -> bool:
        self.stale = 0 if improved else self.stale + 1
        return bool(self.patience) and self.stale >= self.patience

    def state_dict(self) -> dict:
        return {"stale": self.stale}

    def load_state_dict(self, state: dict) -> None:
        self.stale = int(state["stale"])
