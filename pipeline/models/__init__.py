"""The model zoo: ``create_model(name, num_classes, ...)`` over a registry of builders.

Registered here: resnet18/34/50/101/152 (torchvision-compatible), resnet18_cifar
and resnet34_cifar (32x32 stem), googlenet (with auxiliary heads), fastnet and
fastnet_s (small all-conv speed-run networks for small images). Any timm
model is ``timm:<name>``.
"""

import functools

from pipeline.models import fastnet as _fastnet  # noqa: F401  (registers its builders)
from pipeline.models import googlenet as _googlenet  # noqa: F401  (registers its builder)
from pipeline.models import resnet as _resnet  # noqa: F401  (registers its builders)
from pipeline.models.registry import create_model, list_models, register_model
from pipeline.models.training import compute_loss, freeze_backbone, param_groups, set_train_mode, unfreeze
from pipeline.models.weights import LoadReport, load_weights, model_data_config



def model_from_config(cfg, num_classes: int, *, initial_weights: bool = True, meta_width: int = 0):
    """The model a config (a TrainConfig) describes, backbone frozen when it says so.

    ``initial_weights``: load the pretrained or --weights file weights (train);
    predict passes False and loads the member's own state dict instead.
    ``meta_width``: encoded metadata columns fused into the head (pipeline/models/fusion.py).
    """
    from pipeline.models.fusion import with_metadata

    model = create_model(cfg.model, num_classes, pretrained=cfg.pretrained and initial_weights,
                         weights=cfg.weights if initial_weights else None, head=cfg.model_head,
                         head_hidden=cfg.head_hidden, drop_rate=cfg.drop_rate)
    model = with_metadata(model, meta_width, num_classes)
    if cfg.freeze_backbone:
        freeze_backbone(model)
    return model


def weights_data_config(model_name: str) -> dict:
    """Input size and normalisation that a model's pretrained weights expect (the config's weights layer)."""
    skeleton = create_model(model_name, num_classes=2)  # random init; only its config is read
    data = model_data_config(skeleton, pretrained=True)
    return {"image_size": int(data["input_size"][-1]), "mean": tuple(data["mean"]), "std": tuple(data["std"])}


@functools.lru_cache(maxsize=16)
def weights_test_config(model_name: str) -> dict:
    """What a model's pretrained config says of evaluation (timm's ``pretrained_cfg``: input_size,
    test_input_size, crop_pct, test_crop_pct), for ``--test-size auto`` (pipeline/data/views.py test_geometry)."""
    cfg = create_model(model_name, num_classes=2).pretrained_cfg  # random init; only its config is read
    return {k: cfg.get(k) for k in ("input_size", "test_input_size", "crop_pct", "test_crop_pct")}


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
    "weights_data_config",
    "weights_test_config",
]
