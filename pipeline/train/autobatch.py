"""--batch-size auto: the batch each member trains with, and halving it when CUDA runs out of memory.

The candidates are a pure decision of pipeline/devices.py
(:func:`~pipeline.devices.train_batch_candidates`): on CPU one batch from the
memory budget, on CUDA a descending list that :func:`first_that_fits` probes with
a few real training steps of the member's model. While training, an
out-of-memory error halves the batch (the lr follows it, as
pipeline/train/adapt.py scales it) and the member restarts the epoch from its
last saved one (last.pt), as ``--resume`` would; its config.json records the
batch it used.
"""
from __future__ import annotations

import gc
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import replace

import torch

from pipeline.config import TrainConfig, recipe_of
from pipeline.devices import available_memory, item_bytes, probe, resolve_device, train_batch_candidates
from pipeline.errors import PipelineError
from pipeline.train.adapt import FIXED_SOURCES, MIN_BATCH, adapted_batch, lr_scaling, scaled_lr

log = logging.getLogger("pipeline")

PROBE_STEPS = 3  # training steps a candidate batch must complete
DEFAULT_BATCH = 128  # the schema's batch (pipeline/config.py): the lr's batch when no recipe names one


def lr_batch(cfg: TrainConfig, recipe: str | None) -> int:
    """The batch the run's lr was set for: the named recipe's, else the competition's, else the schema's."""
    from pipeline.download.specfile import competition_of

    comp = competition_of(cfg.competition)
    layers = [comp.recipe, *([recipe_of(comp, recipe)] if recipe not in (None, "default") else [])]
    given = [layer["batch_size"] for layer in layers if isinstance(layer.get("batch_size"), int)]
    return given[-1] if given else DEFAULT_BATCH


def first_that_fits(candidates: tuple[int, ...], try_batch: Callable[[int], None]) -> int:
    """The first candidate whose ``try_batch`` runs without running out of memory."""
    for batch in candidates:
        try:
            try_batch(batch)
            return batch
        except torch.OutOfMemoryError:
            log.info("--batch-size auto: %d images per step ran out of memory; trying fewer", batch)
        finally:
            free_memory()
    raise PipelineError(f"--batch-size auto: even {candidates[-1]} image(s) per step ran out of memory; use a "
                        "smaller --model or --image-size")


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def probe_steps(cfg: TrainConfig, n_outputs: int, meta_width: int, device: torch.device, dplan, batch: int) -> None:
    """PROBE_STEPS training steps of the member's model on random images of ``batch`` (forward, backward,
    optimizer step, at the member's precision and memory format)."""
    from pipeline.models import model_from_config
    from pipeline.models.fusion import call
    from pipeline.train.engine import build_optimizer

    model = model_from_config(replace(cfg, batch_size=batch), n_outputs, meta_width=meta_width).to(device)
    optimizer = build_optimizer(model, replace(cfg, batch_size=batch))
    x = torch.randn(batch, 3, cfg.image_size, cfg.image_size, device=device)
    if dplan.channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    meta = torch.zeros(batch, meta_width, device=device) if meta_width else None
    model.train()
    for _ in range(PROBE_STEPS):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dplan.dtype, enabled=dplan.dtype is not None):
            out = call(model, x, meta)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        sum(o.float().mean() for o in outs).backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_auto(cfg: TrainConfig, share: int, sources: Mapping[str, str], *, n_outputs: int, meta_width: int,
                 source_kind: str, reference: int, member, probe_memory: bool) -> tuple[TrainConfig, list[str]]:
    """The member's config with --batch-size auto made a number, and the note saying how (its lr scaled
    from the ``reference`` batch it was set for, unless --lr was given). A member with a recorded batch
    (a --resume) keeps the batch and lr it trained with."""
    from pipeline import distributed as dist

    recorded = member.recorded_plan() if member.is_started else None
    if recorded and isinstance(recorded.get("batch_size"), int):
        lr = json.loads(member.config_path.read_text(encoding="utf-8"))["config"].get("lr", cfg.lr)
        return replace(cfg, batch_size=recorded["batch_size"], lr=lr), [
            f"batch_size auto -> {recorded['batch_size']}: the batch {member.name} trained with (lr {lr:g})"]
    if dist.is_distributed():
        raise PipelineError("--batch-size auto picks a batch per process; under torchrun give --batch-size N")
    device = resolve_device(cfg.device)
    acc = probe(device)
    dplan = dist.plan_for(replace(cfg, batch_size=1), device, source_kind)
    # what the data allows: an optimizer step takes batch x --accum-steps images (pipeline/train/adapt.py)
    limit = max(1, adapted_batch(share or MIN_BATCH, share or MIN_BATCH, cfg.epochs) // cfg.accum_steps)
    per_item = item_bytes(acc, cfg.image_size, half_precision=dplan.dtype is not None, workers=dplan.workers)
    candidates = train_batch_candidates(acc, available_memory(device), per_item, cfg.image_size, limit)
    if len(candidates) == 1 or not probe_memory or source_kind == "features":
        batch, how = candidates[0], f"from the memory budget of {acc.name}" + (
            "" if acc.type != "cuda" or source_kind == "features" else " (probed when training starts)")
    else:
        batch = first_that_fits(candidates, lambda b: probe_steps(cfg, n_outputs, meta_width, device, dplan, b))
        how = f"the largest of {', '.join(map(str, candidates))} that completes {PROBE_STEPS} steps on {acc.name}"
    notes = [f"batch_size auto -> {batch}: {how} (at most {limit} for {share} training images)"]
    step = batch * cfg.accum_steps  # images per optimizer step
    if sources.get("lr") not in FIXED_SOURCES and step != reference:
        lr = scaled_lr(cfg.lr, cfg.optimizer, reference, step)
        notes.append(f"lr {cfg.lr:g} -> {lr:.4g}: scaled from the batch of {reference} it was set for to "
                     f"{step} images a step ({lr_scaling(cfg.optimizer)} for {cfg.optimizer}; --lr keeps yours)")
        cfg = replace(cfg, lr=lr)
    return replace(cfg, batch_size=batch), notes
