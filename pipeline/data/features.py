"""Frozen-backbone features: pooled (pre-logits) vectors of every image and view, through the one inference loop.

Computed once per image and view and kept by the data plan in the feature
cache (pipeline/data/plan.py decides the key, pipeline/data/cache.py stores
it); the head then trains, validates and predicts on the vectors.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial

import torch
from torch import nn
from torch.utils.data import Dataset

from pipeline.models.task import bad_mask
from pipeline.data.loaders import make_loader
from pipeline.models.inference import forward_batches
from pipeline.models.views import image_views


def extract_features(model: nn.Module, loader: Iterable, device: torch.device, n: int,
                     views: Callable[[torch.Tensor], list[torch.Tensor]] | None = None,
                     amp_dtype: torch.dtype | None = None, channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features (n, F) of the loader's images and targets (n,); with ``views`` (a batch -> its TTA
    views, pipeline/models/views.py), the features of every view, (V, n, F), in one pass over the loader.

    ``amp_dtype`` is the run's autocast dtype (None: fp32): the cache, training,
    validation and predict all compute features at the one precision of the run.
    ``channels_last``: the device plan's memory format for image batches (the model is converted in place).
    """
    def pooled(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([model.forward_head(model.forward_features(v), pre_logits=True)
                            for v in (views(x) if views is not None else [x])])

    if channels_last:
        model.to(memory_format=torch.channels_last)
    out = targets = None
    for f, y, idx in forward_batches(pooled, loader, device, amp_dtype=amp_dtype, channels_last=channels_last,
                                     progress="backbone features", total=n):
        f, y = f.float().cpu(), torch.as_tensor(y)
        if out is None:  # targets: class indices (n,) or float rows (n, K), as the task has them
            out, targets = torch.empty((len(f), n, f.shape[2])), torch.zeros((n, *y.shape[1:]), dtype=y.dtype)
        out[:, idx] = f
        targets[idx] = y
    return (out if views is not None else out[0]), targets


def feature_bank(model: nn.Module, eval_set: Dataset, train_set: Dataset, views: int, *, batch_size: int,
                 workers: int, pin_memory: bool, seed: int, device: torch.device,
                 amp_dtype: torch.dtype | None = None, channels_last: bool = False) -> dict[str, torch.Tensor]:
    """Pooled features of a pool of images, given as two datasets over it in one order (the eval transform
    and the training one): 'eval' (N, F), 'views' (V, N, F) of ``views`` augmented passes (pass v draws its
    augmentation from seed + v; the eval features when there are none), and 'bad', the positions of images
    that could not be decoded (their rows are zeros)."""
    def loader(dataset: Dataset, view: int):
        dl = make_loader(dataset, batch_size, False, workers, seed + view, pin_memory=pin_memory)
        dl.sampler.set_epoch(view)
        return dl

    n = len(eval_set)
    was_training = model.training
    model.eval()
    extract = partial(extract_features, model, device=device, n=n, amp_dtype=amp_dtype, channels_last=channels_last)
    feats, targets = extract(loader(eval_set, 0))
    bank = {"eval": feats, "bad": torch.nonzero(bad_mask(targets)).flatten()}  # unreadable images
    bank["views"] = torch.stack([extract(loader(train_set, v))[0] for v in range(views)]) if views else \
        bank["eval"][None]
    model.train(was_training)
    return bank


def backbone_views(model: nn.Module, loader: Iterable, device: torch.device, n: int, tta: str,
                   amp_dtype: torch.dtype | None = None, channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features (V, N, F) of every TTA view of the loader's images, and the targets (N,).

    The loader is an evaluation loader of the views' scales (pipeline/data/views.py);
    ``amp_dtype`` is the run's precision: the head then sees features computed
    exactly as the ones it was trained on.
    """
    return extract_features(model, loader, device, n, views=lambda x: image_views(x, tta), amp_dtype=amp_dtype,
                            channels_last=channels_last)
