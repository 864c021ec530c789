"""Layer-wise learning-rate decay for timm backbones (issue 23, point 5): the BEiT / fine-tuning trick.

The head learns at the full lr and every block below it at ``layer_decay``
times the lr of the block above, so the early, general layers of a pretrained
network move least. The grouping of parameters into layers is timm's own
(``group_matcher`` of each architecture, through
``timm.optim.param_groups_layer_decay``); this module turns its groups into
the optimizer groups of pipeline/models/weights.py (``base_lr`` for the
schedule, --backbone-lr-scale still applied below the head).
"""
from __future__ import annotations

from torch import nn

from pipeline.errors import PipelineError
from pipeline.models.weights import head_names, in_head, unwrap


def layer_decay_groups(model: nn.Module, lr: float, weight_decay: float, layer_decay: float,
                       backbone_lr_scale: float = 1.0) -> list[dict]:
    """Optimizer groups with lr = ``lr`` x layer_decay^(layers above) (x backbone_lr_scale below the head).

    No weight decay on biases and norms (ndim <= 1), as timm does; frozen
    parameters are left out. Refuses models without timm's layer grouping.
    """
    from timm.optim import param_groups_layer_decay  # lazily: timm.optim imports many optimizers

    model = unwrap(model)
    if not hasattr(model, "group_matcher"):
        raise PipelineError(f"--layer-decay needs a timm model (--model timm:NAME): {type(model).__name__} has no "
                            "layer grouping; drop --layer-decay")
    heads = head_names(model)
    head_ids = {id(p) for name, p in model.named_parameters() if in_head(name, heads)}
    groups = []
    for i, group in enumerate(param_groups_layer_decay(model, weight_decay=weight_decay, layer_decay=layer_decay)):
        is_head = all(id(p) in head_ids for p in group["params"])
        group_lr = lr * group["lr_scale"] * (1.0 if is_head else backbone_lr_scale)
        groups.append({"name": f"layer{i}{'_head' if is_head else ''}", "params": group["params"], "lr": group_lr,
                       "base_lr": group_lr, "weight_decay": group["weight_decay"]})
    return groups
