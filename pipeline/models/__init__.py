"""The model zoo: ``create_model(name, num_classes, ...)`` over a registry of builders.

Registered here: resnet18/34/50/101/152 (torchvision-compatible), resnet18_cifar
and resnet34_cifar (32x32 stem), googlenet (with auxiliary heads), fastnet and
fastnet_s (small all-conv speed-run networks for small images). Any timm
model is ``timm:<name>``.
"""

from pipeline.models import fastnet as _fastnet  # noqa: F401  (registers its builders)
from pipeline.models import googlenet as _googlenet  # noqa: F401  (registers its builder)
from pipeline.models import resnet as _resnet  # noqa: F401  (registers its builders)
from pipeline.models.registry import create_model, list_models, register_model
from pipeline.models.weights import (
    LoadReport,
    compute_loss,
    freeze_backbone,
    load_weights,
    model_data_config,
    param_groups,
    set_train_mode,
    unfreeze,
)



def model_from_config(cfg, num_classes: int, *, initial_weights: bool = True):
    """The model a config (a TrainConfig) describes, backbone frozen when it says so.

    ``initial_weights``: load the pretrained or --weights file weights (train);
    predict passes False and loads the member's own state dict instead.
    """
    model = create_model(cfg.model, num_classes, pretrained=cfg.pretrained and initial_weights,
                         weights=cfg.weights if initial_weights else None, head=cfg.model_head,
                         head_hidden=cfg.head_hidden, drop_rate=cfg.drop_rate)
    if cfg.freeze_backbone:
        freeze_backbone(model)
    return model


__all__ = [
    "LoadReport",
    "compute_loss",
    "create_model",
    "freeze_backbone",
    "list_models",
    "load_weights",
    "model_data_config",
    "model_from_config",
    "param_groups",
    "register_model",
    "set_train_mode",
    "unfreeze",
]
