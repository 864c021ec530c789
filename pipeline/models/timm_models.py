"""The ``timm:<name>`` route: every timm architecture, built through timm's own factory.

timm models already follow the conventions the rest of the pipeline relies on
(``forward_features``, ``forward_head``, ``reset_classifier``, ``pretrained_cfg``),
so this module only validates the name, maps our option names onto timm's and
turns download failures into a message the user can act on.
"""

from __future__ import annotations

import difflib

import timm
from torch import nn

from pipeline.errors import PipelineError
from pipeline.models.heads import init_new_heads
from pipeline.models.weights import head_names

TIMM_PREFIX = "timm:"


def _suggest(name: str) -> str:
    """Up to five timm names close to ``name``, for the error message."""
    base = name.split(".")[0]
    # timm's wildcard search catches substrings ("lite0" -> tf_efficientnet_lite0);
    # difflib catches typos ("resnet5" -> resnet50).
    close = timm.list_models(f"*{base}*")[:5] or difflib.get_close_matches(base, timm.list_models(), n=5)
    return ", ".join(TIMM_PREFIX + c for c in close) if close else "none close; see timm.list_models()"


def create_timm_model(
    name: str,
    num_classes: int,
    *,
    pretrained: bool = False,
    drop_rate: float | None = None,
    zero_init_residual: bool = False,
    in_chans: int = 3,
) -> nn.Module:
    """``timm.create_model(name, ...)`` with our argument names and our errors.

    ``name`` may carry a pretrained tag (``resnet50.a1_in1k``). ``drop_rate`` None
    keeps timm's default; ``zero_init_residual`` maps to timm's ``zero_init_last``,
    which only residual families accept. A classifier not loaded from the
    pretrained weights starts at zero (see ``heads.init_head_small``).
    """
    if not timm.is_model(name):
        raise PipelineError(f"unknown timm model {name!r}; close matches: {_suggest(name)}")
    options: dict[str, object] = {"num_classes": num_classes, "in_chans": in_chans}
    if drop_rate is not None:
        options["drop_rate"] = drop_rate
    if zero_init_residual:
        options["zero_init_last"] = True
    if pretrained:  # built with the pretrained classes first, so their classifier is kept as a prior
        options.pop("num_classes")
    try:
        model = timm.create_model(name, pretrained=pretrained, **options)
    except TypeError as err:  # an option this architecture's constructor lacks
        raise PipelineError(f"timm model {name!r} does not accept these options ({err}); "
                            "drop zero_init_residual/drop_rate for it") from err
    except (OSError, RuntimeError) as err:  # hub / URL failures (no network, no file)
        if not pretrained:
            raise
        raise PipelineError(
            f"could not download pretrained weights for {TIMM_PREFIX}{name} ({err}); "
            "for offline use pass --weights FILE with a local .safetensors/.pth file"
        ) from err
    if pretrained and model.num_classes != num_classes:  # a new head on pretrained weights
        keep_classifier(model)
        model.reset_classifier(num_classes)
    if pretrained and not _head_loaded(model, num_classes, pretrained):
        init_new_heads(model, head_names(model))
    return model


def keep_classifier(model: nn.Module) -> None:
    """Keep the pretrained classifier (about to be replaced) as ``model.pretrained_head``: a prior for the
    competition's classes that share its class names (pipeline/models/class_prior.py)."""
    from pipeline.models.class_prior import pretrained_head

    layer = model.get_classifier()
    if isinstance(layer, nn.Linear):
        head = pretrained_head(layer.weight, layer.bias)
        if head is not None:
            model.pretrained_head = head


def _head_loaded(model: nn.Module, num_classes: int, pretrained: bool) -> bool:
    """Whether timm filled the classifier from the pretrained weights: it keeps
    them only when the class counts agree, and otherwise leaves timm's own
    random init, which ``init_new_heads`` replaces by a zero start."""
    return pretrained and num_classes == model.pretrained_cfg.get("num_classes")
