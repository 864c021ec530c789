"""What training needs of a model: freezing and unfreezing the backbone, train/eval modes, the optimizer's
parameter groups and the loss (with auxiliary heads)."""
from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from pipeline.distributed import unwrap
from pipeline.errors import PipelineError
from pipeline.models.weights import architecture, head_names, in_head


def freeze_backbone(model: nn.Module) -> list[nn.Parameter]:
    """Train only the head(s): everything else gets requires_grad=False.

    Returns the head parameters (for the optimizer) and marks the model so that
    ``set_train_mode`` keeps the frozen BatchNorm statistics fixed.
    """
    model = unwrap(model)
    heads = head_names(model)
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad = in_head(name, heads)
        if param.requires_grad:
            trainable.append(param)
    if not trainable:
        raise PipelineError(f"model {architecture(model)} has no head parameters to train "
                            "(num_classes 0?); do not freeze its backbone")
    model._frozen_backbone = True
    return trainable


def unfreeze(model: nn.Module) -> None:
    """Undo :func:`freeze_backbone`: every parameter trains and BatchNorm statistics move again."""
    model = unwrap(model)
    for param in model.parameters():
        param.requires_grad = True
    model._frozen_backbone = False


def set_train_mode(model: nn.Module, train: bool) -> None:
    """``model.train(train)``, but a frozen backbone's BatchNorm layers stay in eval.

    Frozen weights with drifting running statistics would change the features
    under the head's feet, so the statistics are frozen along with the weights.
    """
    model.train(train)
    model = unwrap(model)
    if not (train and getattr(model, "_frozen_backbone", False)):
        return
    heads = head_names(model)
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) and not in_head(name, heads):
            module.eval()


def param_groups(model: nn.Module, lr: float, weight_decay: float,
                 backbone_lr_scale: float = 1.0) -> list[dict]:
    """Optimizer groups: backbone at ``lr * backbone_lr_scale``, head at ``lr``;
    no weight decay on biases and norm parameters (ndim <= 1). Frozen
    parameters are left out. Each group keeps its ``base_lr`` for schedulers.
    """
    model = unwrap(model)
    heads = head_names(model)
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault((in_head(name, heads), param.ndim <= 1), []).append(param)
    result = []
    for (is_head, no_decay), params in sorted(groups.items()):
        group_lr = lr if is_head else lr * backbone_lr_scale
        result.append({
            "name": f"{'head' if is_head else 'backbone'}{'_no_decay' if no_decay else ''}",
            "params": params, "lr": group_lr, "base_lr": group_lr,
            "weight_decay": 0.0 if no_decay else weight_decay,
        })
    return result


def compute_loss(output: Tensor | tuple[Tensor, Sequence[Tensor]], target: Tensor,
                 criterion: Callable[[Tensor, Tensor], Tensor],
                 aux_loss_weights: Sequence[float] = ()) -> Tensor:
    """Main loss plus ``sum(w * criterion(aux, target))`` when ``output`` has aux logits.

    Models with auxiliary classifiers return ``(logits, [aux, ...])`` in training
    mode and plain logits in eval mode; this takes either.
    """
    if isinstance(output, Tensor):
        return criterion(output, target)
    logits, aux_logits = output
    if len(aux_logits) != len(aux_loss_weights):
        raise ValueError(f"{len(aux_logits)} auxiliary outputs but {len(aux_loss_weights)} "
                         "aux_loss_weights; pass the model's aux_loss_weights")
    loss = criterion(logits, target)
    for weight, aux in zip(aux_loss_weights, aux_logits):
        loss = loss + weight * criterion(aux, target)
    return loss
