"""The model registry and the one factory, ``create_model``.

Our own architectures register a builder with ``@register_model``; any timm
architecture is reached as ``timm:<name>``. Whatever the source, the model that
comes back has the same surface (timm's conventions): ``forward_features``,
``forward_head``, ``num_features``, ``get_classifier``, ``reset_classifier`` and
a ``pretrained_cfg`` dict, so nothing downstream needs to name a model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.errors import PipelineError
from pipeline.models.heads import build_head, check_head
from pipeline.models.timm_models import TIMM_PREFIX, create_timm_model
from pipeline.models.weights import load_pretrained_url, load_weights, replace_head

log = logging.getLogger("pipeline")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Builder = Callable[..., nn.Module]
_REGISTRY: dict[str, Builder] = {}


def register_model(builder: Builder) -> Builder:
    """Register ``builder`` under its function name; a second use of a name is an error."""
    name = builder.__name__
    if name in _REGISTRY:
        raise PipelineError(
            f"model name {name!r} is registered twice ({_REGISTRY[name].__module__} and "
            f"{builder.__module__}); rename one of the builders"
        )
    _REGISTRY[name] = builder
    return builder


def make_cfg(architecture: str, *, input_size: tuple[int, int, int] = (3, 224, 224),
             mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
             **extra: object) -> dict:
    """A timm-style ``pretrained_cfg`` for one of our architectures."""
    return {
        "architecture": architecture, "input_size": input_size, "mean": mean, "std": std,
        "interpolation": "bilinear", "crop_pct": 0.875, "num_classes": 1000,
        "classifier": "fc", "first_conv": "conv1", **extra,
    }


def classifier_layer(in_features: int, num_classes: int) -> nn.Module:
    """A zero-started Linear layer, or Identity for num_classes=0 (timm's "features only"
    convention); see ``heads.build_head``."""
    return build_head("linear", in_features, num_classes)


class ClassifierBase(nn.Module):
    """timm's model surface for our architectures.

    Subclasses define ``forward_features`` (unpooled map) and call ``_init_head``;
    the head is global average pooling -> dropout -> ``self.fc``.
    """

    pretrained_cfg: dict

    def _init_head(self, num_features: int, num_classes: int, drop_rate: float) -> None:
        self.num_features = num_features
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = classifier_layer(num_features, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """(B, C, H, W) map -> (B, num_features) pooled vector, or (B, num_classes) logits."""
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.logits_from_pooled(x)

    def logits_from_pooled(self, x: Tensor) -> Tensor:
        """(B, num_features) pooled vector -> (B, num_classes) logits: what a feature cache's head runs."""
        if self.drop_rate > 0:
            x = F.dropout(x, self.drop_rate, self.training)
        return self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh Linear head with ``num_classes`` outputs (0: none, pooled features out)."""
        self.num_classes = num_classes
        self.fc = classifier_layer(self.num_features, num_classes)


def list_models() -> list[str]:
    """Sorted names of the registered (non-timm) models."""
    return sorted(_REGISTRY)


def _get_builder(name: str) -> Builder:
    if name not in _REGISTRY:
        raise PipelineError(
            f"unknown model {name!r}; choose one of {', '.join(list_models())}, "
            f"or any timm model as {TIMM_PREFIX}<name> (e.g. {TIMM_PREFIX}resnet50)"
        )
    return _REGISTRY[name]


def _build(name: str, num_classes: int, *, pretrained: bool, drop_rate: float | None,
           zero_init_residual: bool, in_chans: int) -> nn.Module:
    """Build the bare architecture; ``pretrained`` is honoured here only for timm."""
    if name.startswith(TIMM_PREFIX):
        return create_timm_model(
            name[len(TIMM_PREFIX):], num_classes, pretrained=pretrained, drop_rate=drop_rate,
            zero_init_residual=zero_init_residual, in_chans=in_chans,
        )
    options: dict[str, object] = {"in_chans": in_chans}
    # None means "the architecture's own default" (GoogLeNet's is the paper's 0.4).
    if drop_rate is not None:
        options["drop_rate"] = drop_rate
    if zero_init_residual:
        options["zero_init_residual"] = True
    return _get_builder(name)(num_classes=num_classes, **options)


def create_model(
    name: str,
    num_classes: int,
    *,
    pretrained: bool = False,
    weights: Path | None = None,
    head: str = "linear",
    head_hidden: int = 256,
    drop_rate: float | None = None,
    zero_init_residual: bool = False,
    in_chans: int = 3,
) -> nn.Module:
    """Build model ``name`` with a ``num_classes``-way head, optionally with weights.

    ``weights`` (a local file) wins over ``pretrained`` (a download), so a user
    offline can pass both and still get the same network. Every head not
    loaded from weights (new, or whose tensors do not fit ``num_classes``)
    starts with its final layer at zero, i.e. uniform predictions (see
    ``heads``); the loader logs what it did. ``head="mlp"`` swaps the classifier
    for Linear -> ReLU -> Dropout -> Linear before any weights are loaded.
    """
    check_head(head)
    download = pretrained and weights is None
    is_timm = name.startswith(TIMM_PREFIX)
    if not is_timm:
        _get_builder(name)  # fail on a bad name before any work
    model = _build(name, num_classes, pretrained=download and is_timm, drop_rate=drop_rate,
                   zero_init_residual=zero_init_residual, in_chans=in_chans)
    replace_head(model, head, num_classes, hidden=head_hidden, drop_rate=drop_rate or 0.0)
    if weights is not None:
        report = load_weights(model, Path(weights))
        log.info(report.summary())
    elif download and not is_timm:
        report = load_pretrained_url(model)
        log.info(report.summary())
    return model
