"""Metadata fused into a model's head: its logits plus a linear term of the encoded metadata.

``MetaFusion(model, width, outputs)`` wraps any model (registered, timm, with
auxiliary heads): ``forward(x, meta)`` is ``model(x) + meta_head(meta)``. For
a linear head this is exactly a linear head on the concatenation of the
pooled features and the metadata (``W [f; m] = W_f f + W_m m``), which is what
the fitted heads (logreg, ridge) solve on cached features; for an MLP head
the metadata enters linearly beside it. ``meta_head`` starts at zero, so a
fresh model predicts what it would without metadata, and counts as a head
(it trains with the head, frozen backbone or not).
"""
from __future__ import annotations

import copy

from torch import Tensor, nn


class MetaFusion(nn.Module):
    """A model whose outputs gain a linear function of the item's metadata."""

    def __init__(self, model: nn.Module, width: int, outputs: int):
        super().__init__()
        self.model = model
        self.meta_head = nn.Linear(width, outputs)
        nn.init.zeros_(self.meta_head.weight)
        nn.init.zeros_(self.meta_head.bias)
        cfg = copy.deepcopy(getattr(model, "pretrained_cfg", {}) or {})
        classifier = cfg.get("classifier") or ()
        names = (classifier,) if isinstance(classifier, str) else tuple(classifier)
        cfg["classifier"] = tuple(f"model.{n}" for n in names) + ("meta_head",)
        cfg["aux_classifiers"] = tuple(f"model.{n}" for n in cfg.get("aux_classifiers", ()))
        self.pretrained_cfg = cfg
        self.aux_loss_weights = getattr(model, "aux_loss_weights", ())

    def forward(self, x: Tensor, meta: Tensor) -> Tensor | tuple:
        out = self.model(x)
        extra = self.meta_head(meta.to(dtype=self.meta_head.weight.dtype))
        if isinstance(out, tuple):  # (logits, [aux, ...]) in training: the metadata joins the main logits
            return out[0] + extra.to(out[0].dtype), out[1]
        return out + extra.to(out.dtype)

    # what the feature path and the fitted heads reach through the wrapper
    def forward_features(self, x: Tensor) -> Tensor:
        return self.model.forward_features(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return self.model.forward_head(x, pre_logits=pre_logits)

    def get_classifier(self) -> nn.Module:
        return self.model.get_classifier()


def with_metadata(model: nn.Module, width: int, outputs: int) -> nn.Module:
    """``model`` fused with ``width`` metadata columns, or itself when there are none."""
    return MetaFusion(model, width, outputs) if width else model


def call(net: nn.Module, x: Tensor, meta: Tensor | None) -> Tensor:
    """``net(x)``, or ``net(x, meta)`` for a batch that carries metadata."""
    return net(x) if meta is None else net(x, meta)


def batch_meta(loader, idx, device) -> Tensor | None:
    """The metadata rows of a batch: the loader's ``meta`` table (one row per position) at ``idx``."""
    table = getattr(loader, "meta", None)
    if table is None:
        return None
    return table[idx.cpu() if isinstance(idx, Tensor) else idx].to(device)
