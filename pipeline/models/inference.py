"""Inference: the one loop that turns batches into softmax probabilities.

Validation during training, the out-of-fold predictions, ``predict`` and
``predict-image`` all call :func:`infer`; only what they feed it differs (a
data plan's loader of images or of backbone features). Test-time
augmentation is a list of tiny named functions of an image batch
(pipeline/models/views.py); for feature batches the views were computed by
the backbone beforehand and arrive stacked as (V, B, F).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from pipeline import distributed as dist
from pipeline.models.task import bad_mask
from pipeline.devices import autocast, non_blocking, probe
from pipeline.models.fusion import batch_meta, call
from pipeline.models.views import image_views
from pipeline.progress import track


def views_of(x: torch.Tensor | list[torch.Tensor], tta: str) -> list[torch.Tensor]:
    """The inputs to average over: TTA views of an image batch (or of its scales: a list, one batch per scale;
    pipeline/models/views.py), or precomputed feature views."""
    if isinstance(x, (list, tuple)) or x.ndim == 4:
        return image_views(x, tta)
    if x.ndim == 3:  # (V, B, F): one feature batch per view, computed by the backbone
        return list(x)
    return [x]  # (B, F): one view of features


def forward_batches(fn: Callable[[torch.Tensor], torch.Tensor], loader: Iterable, device: torch.device, *,
                    amp_dtype: torch.dtype | None = None, channels_last: bool = False, progress: str = "inference",
                    total: int | None = None) -> Iterator[tuple[torch.Tensor, object, object]]:
    """The one inference loop: each batch to the device (in channels_last where asked), ``fn`` under the
    run's autocast, without gradients; yields (outputs, targets, positions) batch by batch.

    Inference (:func:`infer`) and feature extraction (pipeline/data/features.py)
    differ only in ``fn`` and in what they keep of its outputs.
    """
    copy_async = non_blocking(probe(device))
    for x, y, idx in track(loader, progress, total, enabled=dist.is_main()):
        x = [_to(t, device, copy_async, channels_last) for t in x] if isinstance(x, list) else \
            _to(x, device, copy_async, channels_last)  # a list: the batch at each scale of the views
        meta = batch_meta(loader, idx, device)  # a loader with metadata: fn takes its rows too
        with torch.no_grad(), autocast(device, amp_dtype):
            out = fn(x) if meta is None else fn(x, meta)
        yield out, y, idx


def _to(x: torch.Tensor, device: torch.device, copy_async: bool, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=copy_async)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.ndim == 4 else x


def infer(net: nn.Module, loader: Iterable, device: torch.device, *, tta: str = "none",
          amp_dtype: torch.dtype | None = None, channels_last: bool = False,
          progress: str | None = None, gather: bool = True,
          activation: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Predictions (N, K) float64, targets (N,) or (N, K) and dataset positions (N,) over ``loader``.

    ``activation`` maps the model's raw outputs to predictions (the task's:
    pipeline/models/task.py); by default a softmax, giving class probabilities.

    The probabilities of the views are averaged in float32 and not
    renormalised (callers that write them use :func:`normalise_rows`). Under
    DDP each rank sees a shard; the shards are gathered and the padding
    repeats of the sampler are dropped by position. ``gather=False`` for a
    loader that is not sharded (predict, which rank 0 runs alone: a collective
    there would wait forever for the other ranks).
    """
    net.eval()  # callers put the model back in training mode (frozen parts stay in eval)
    act = activation or (lambda out: torch.softmax(out, dim=1))

    def averaged(x: torch.Tensor, meta: torch.Tensor | None = None) -> torch.Tensor:
        views = views_of(x, tta)
        return sum(act(call(net, v, meta).float()) for v in views) / len(views)

    probs, targets, positions = [], [], []
    for p, y, idx in forward_batches(averaged, loader, device, amp_dtype=amp_dtype, channels_last=channels_last,
                                     progress=progress or "inference"):
        probs.append(p)
        targets.append(torch.as_tensor(y).to(device))
        positions.append(torch.as_tensor(idx).to(device))
    cat = dist.gather_cat if gather else (lambda t: t)
    p = cat(torch.cat(probs)).cpu().double().numpy()
    t = cat(torch.cat(targets)).cpu().numpy()
    i = cat(torch.cat(positions)).cpu().numpy()
    i, first = np.unique(i, return_index=True)
    return p[first], t[first], i


def normalise_rows(probs: np.ndarray) -> np.ndarray:
    """Rows that sum to 1 in float64 (float32 softmax rows are 1 only to ~1e-7)."""
    return probs / probs.sum(axis=1, keepdims=True)


def unreadable_positions(targets: np.ndarray, positions: np.ndarray) -> set[int]:
    """Dataset positions whose image could not be decoded (the loader marked their target)."""
    return {int(i) for i in positions[bad_mask(targets)]}
