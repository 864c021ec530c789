"""The learning-rate range test (Leslie Smith's; fastai's ``lr_find``): `pipeline lr-find`.

The model the config describes trains for a few hundred steps while the
learning rate grows geometrically from ``start`` to ``end``; the loss of each
step is recorded, smoothed, and the test stops early once the loss has blown
up. The pure part (:func:`lr_schedule`, :func:`smooth`, :func:`suggest`)
turns the curve into a suggestion; :func:`find_lr` runs the steps through the
same model, optimizer and data plan as `pipeline train`, and
:func:`plot_lr_find` draws the curve. Nothing is written to a run: the model
is thrown away.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import Resolved, TrainConfig
from pipeline.errors import PipelineError
from pipeline.models.fusion import batch_meta, call

log = logging.getLogger("pipeline")

DIVERGED = 4.0  # stop once the smoothed loss is this many times its minimum so far
SMOOTHING = 0.9  # the debiased running average of the step losses that decides when to stop
SKIP = 0.05  # the first share of the curve is the average warming up: no suggestion there


@dataclass(frozen=True)
class LRFind:
    """The recorded curve and what it suggests."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    steepest: float  # the lr where the smoothed loss (centred average) falls fastest (per decade of lr)
    minimum: float  # the lr of the lowest smoothed loss
    suggested: float
    stopped_early: bool

    def to_json(self) -> dict:
        return {"suggested": self.suggested, "steepest": self.steepest, "minimum": self.minimum,
                "minimum_over_10": self.minimum / 10, "steps": len(self.lrs), "stopped_early": self.stopped_early}


def lr_schedule(start: float, end: float, steps: int) -> np.ndarray:
    """``steps`` learning rates growing geometrically from ``start`` to ``end`` (pure)."""
    if not 0 < start < end:
        raise PipelineError(f"lr-find needs 0 < --start-lr < --end-lr, got {start:g} and {end:g}")
    if steps < 10:
        raise PipelineError(f"lr-find needs at least 10 steps to draw a curve, got --steps {steps}")
    return np.geomspace(start, end, steps)


def smooth(losses: list[float], beta: float = SMOOTHING) -> np.ndarray:
    """The debiased exponential moving average of ``losses``: early values are not pulled towards 0 (pure)."""
    out, avg = np.empty(len(losses)), 0.0
    for i, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * loss
        out[i] = avg / (1 - beta ** (i + 1))
    return out


def centred(losses: list[float] | np.ndarray, share: float = SKIP) -> np.ndarray:
    """A centred moving average over ``share`` of the curve (odd width >= 3): smooth without the lag (pure).

    A causal average trails the loss by its window, which on a geometric lr
    axis shifts the curve, and so the suggestion, towards larger rates; the
    centred one does not. The ends average over the part of the window inside.
    """
    values = np.asarray(losses, float)
    width = max(3, int(len(values) * share) | 1)
    kernel = np.ones(width)
    return np.convolve(values, kernel, mode="same") / np.convolve(np.ones(len(values)), kernel, mode="same")


def suggest(lrs: np.ndarray, smoothed: np.ndarray) -> tuple[float, float, float]:
    """(steepest, minimum, suggested) learning rates of a recorded curve (pure).

    The suggestion is the steepest descent of the smoothed loss against
    log10(lr), looked for before the minimum (past it the loss is blowing up)
    and after the first SKIP of the curve; it is capped at a tenth of the
    minimum's lr, Smith's rule of thumb, so a noisy curve cannot suggest the
    edge of divergence.
    """
    lrs, smoothed = np.asarray(lrs, float), np.asarray(smoothed, float)
    lowest = int(np.nanargmin(smoothed))
    first = min(int(len(lrs) * SKIP), max(lowest - 1, 0))
    window = slice(first, max(lowest, first + 2))
    slope = np.gradient(smoothed[window], np.log10(lrs[window])) if lowest - first >= 2 else np.zeros(1)
    steepest = float(lrs[first + int(np.argmin(slope))])
    minimum = float(lrs[lowest])
    return steepest, minimum, min(steepest, minimum / 10)


def blown_up(smoothed: float, best: float, step: int, steps: int) -> bool:
    """The test stops: the loss is not finite, or far above its best after the first SKIP of the steps."""
    return not math.isfinite(smoothed) or (step > steps * SKIP and smoothed > DIVERGED * best)


def find_lr(resolved: Resolved | TrainConfig, steps: int = 100, start: float = 1e-7, end: float = 10.0) -> LRFind:
    """Run the range test on the config's first member, set up exactly as train sets it up (its plan: the
    batch adapted to the data, the data source; the model, optimizer, memory format and --data-init)."""
    import torch

    from pipeline.competition import get_competition
    from pipeline.data.items import load_reorg
    from pipeline.models import compute_loss, set_train_mode
    from pipeline.train.engine import backward_step, phase
    from pipeline.train.plan import plan_run
    from pipeline.train.setup import setup_member

    if isinstance(resolved, TrainConfig):  # a caller's own config: every value is theirs, none adapted
        resolved = Resolved(resolved, {f: "caller" for f in resolved.to_json()})
    if phase(resolved.config, 0).head == "logreg":  # with --unfreeze-after: the first phase's head
        raise PipelineError("--head logreg is fitted, not stepped: lr-find needs --head linear or mlp")
    lrs = lr_schedule(start, end, steps)
    info = load_reorg(resolved.config.work_dir)
    _, plans = plan_run(resolved, info)
    plan = plans[0]
    st = setup_member(plan, get_competition(plan.config.competition).metric)
    cfg, model, net, optimizer, rt, criterion = phase(plan.config, 0), st.model, st.net, st.optimizer, st.rt, st.criterion
    device = rt.device
    scales = [g["base_lr"] / cfg.lr for g in optimizer.param_groups]  # the backbone keeps its lr scale
    data = st.data
    aux_weights = getattr(model, "aux_loss_weights", ())
    set_train_mode(net, True)
    losses: list[float] = []
    best, stopped = math.inf, False
    for step, (x, y, idx) in enumerate(_batches(data.train, steps)):
        for group, scale in zip(optimizer.param_groups, scales):
            group["lr"] = lrs[step] * scale
        x, y = x.to(device), y.to(device)
        if rt.channels_last and x.ndim == 4:  # as training does: image batches only
            x = x.contiguous(memory_format=torch.channels_last)
        with rt.autocast():
            loss = compute_loss(call(net, x, batch_meta(data.train, idx, device)), y, criterion, aux_weights)
        optimizer.zero_grad(set_to_none=True)
        backward_step(loss, optimizer, net, cfg, rt)
        losses.append(float(loss.detach()))
        current = smooth(losses)[-1]
        best = min(best, current)
        if blown_up(current, best, step, steps):
            stopped = True
            break
    return _result(lrs[:len(losses)], losses, stopped)


def _batches(loader, steps: int):
    """``steps`` training batches (x, y, positions), cycling through the loader's epochs as needed."""
    epoch, taken = 0, 0
    while taken < steps:
        if hasattr(loader, "sampler"):  # a new shuffle each pass, as training does
            loader.sampler.set_epoch(epoch)
        before = taken
        for x, y, idx in loader:
            if taken == steps:
                return
            taken += 1
            yield x, y, idx
        if taken == before:
            raise PipelineError("lr-find found no full training batch: lower --batch-size")
        epoch += 1


def _result(lrs: np.ndarray, losses: list[float], stopped: bool) -> LRFind:
    if len(losses) < 3:
        raise PipelineError(f"the loss blew up within {len(losses)} steps of lr-find: lower --start-lr")
    smoothed = centred(np.where(np.isfinite(losses), losses, np.nan))
    finite = np.where(np.isfinite(smoothed), smoothed, np.inf)
    steepest, minimum, suggested = suggest(lrs, finite)
    return LRFind([float(v) for v in lrs], losses, [float(v) for v in smoothed], steepest, minimum, suggested,
                  stopped)


def plot_lr_find(result: LRFind, path: Path) -> None:
    """The smoothed loss against the learning rate (log axis), the suggestion marked; a PNG at ``path``."""
    from matplotlib.figure import Figure

    from pipeline.io import atomic_save

    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot()
    ax.plot(result.lrs, result.losses, color="0.8", linewidth=0.8, label="loss per step")
    ax.plot(result.lrs, result.smoothed, color="C0", label="smoothed")
    ax.axvline(result.suggested, color="C3", linestyle="--", label=f"suggested lr {result.suggested:.2g}")
    ax.axvline(result.minimum, color="0.4", linestyle=":", label=f"minimum {result.minimum:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    finite = [v for v in result.smoothed if math.isfinite(v)]
    ax.set_ylim(min(finite) * 0.9, min(max(finite), 3 * min(finite) + 1e-9) * 1.1)
    ax.legend(loc="upper left")
    ax.set_title("learning-rate range test")
    atomic_save(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
