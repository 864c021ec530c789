"""What a pretrained classifier already knows about the competition's classes, matched by name.

ImageNet weights come with a classifier over ImageNet's classes; the
pipeline drops it and starts a head for the competition's classes. Where a
competition's class is one of ImageNet's (its name equals one of the
synonyms of an ImageNet class, e.g. ``boston_bull`` and "Boston bull,
Boston terrier"), that dropped row is a strong prior for the new head: a
trainable linear head starts from it, and the logistic-regression head is
fitted as a correction of it (pipeline/train/prior_fit.py).

Classes are matched by name only, never by position; a name matching two
ImageNet classes (``crane``: the bird and the machine) is left unmatched,
and the prior is used only when at least half the classes match, so a few
coincidental names never tilt a head.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

log = logging.getLogger("pipeline")

MIN_MATCHED_SHARE = 0.5  # fewer matched classes than this share: no prior


@dataclass
class PretrainedHead:
    """The classifier the weights came with and the pretrained network's label descriptions (or None)."""

    weight: Tensor  # (R, F)
    bias: Tensor  # (R,)
    labels: tuple[str, ...] | None
    dataset: str | None = None  # e.g. "imagenet-1k"


@dataclass
class ClassPrior:
    """Rows of the pretrained classifier for the competition's classes: (K, F) and (K,), zero where unmatched."""

    weight: Tensor
    bias: Tensor
    matched: Tensor  # (K,) bool
    dataset: str

    def describe(self) -> str:
        return (f"{int(self.matched.sum())} of {len(self.matched)} classes match the pretrained head's "
                f"{self.dataset} labels by name")


def normalise(name: str) -> str:
    """Lower case, '_' and '-' as spaces, single spaces: 'Boston_bull' and 'boston bull' are one name."""
    return " ".join(name.lower().replace("_", " ").replace("-", " ").split())


def match_names(classes: Sequence[str], labels: Sequence[str]) -> dict[int, int]:
    """Class position -> label row, for classes whose name equals exactly one label's synonym (labels are
    comma-separated synonym lists, ImageNet's descriptions); a row claimed by two classes matches neither."""
    rows_of: dict[str, set[int]] = {}
    for row, description in enumerate(labels):
        for synonym in description.split(","):
            rows_of.setdefault(normalise(synonym), set()).add(row)
    found = {k: next(iter(rows_of[normalise(c)])) for k, c in enumerate(classes)
             if len(rows_of.get(normalise(c), ())) == 1}
    claimed: dict[int, int] = {}
    for row in found.values():
        claimed[row] = claimed.get(row, 0) + 1
    return {k: row for k, row in found.items() if claimed[row] == 1}


def label_descriptions(rows: int) -> tuple[tuple[str, ...], str] | None:
    """ImageNet's class descriptions for a classifier of ``rows`` outputs (1000: ImageNet-1k; timm knows the
    others), or None for any other count; timm ships them, so this works offline."""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset({"num_classes": rows})
    if subset is None:
        return None
    info = ImageNetInfo(subset)
    return tuple(info.index_to_description(i) for i in range(rows)), subset


def pretrained_head(weight: Tensor, bias: Tensor | None) -> PretrainedHead | None:
    """The record of a dropped pretrained classifier (a Linear's weight and bias), with its labels."""
    if weight.ndim != 2 or (bias is not None and bias.shape != weight.shape[:1]):
        return None
    described = label_descriptions(weight.shape[0])
    labels, dataset = described if described else (None, None)
    bias = torch.zeros(weight.shape[0]) if bias is None else bias
    return PretrainedHead(weight.detach().float().cpu().clone(), bias.detach().float().cpu().clone(),
                          labels, dataset)


def class_prior(model: nn.Module, classes: Sequence[str], mode: str = "auto") -> ClassPrior | None:
    """The prior for ``classes`` from the pretrained head ``model`` was loaded with, or None (logged why)."""
    head: PretrainedHead | None = getattr(model, "pretrained_head", None)
    if mode == "off" or head is None:
        return None
    if head.labels is None:
        log.info("class prior: the pretrained head's %d classes have no known names; not used", len(head.bias))
        return None
    net = getattr(model, "model", model)  # MetaFusion wraps the network
    classifier = net.get_classifier()
    if not isinstance(classifier, nn.Linear) or classifier.in_features != head.weight.shape[1]:
        log.info("class prior: the model's head is not a Linear on the pretrained features; not used")
        return None
    matched = match_names(classes, head.labels)
    if len(matched) < MIN_MATCHED_SHARE * len(classes):
        if matched:
            log.info("class prior: only %d of %d classes match the pretrained head's %s labels by name; "
                     "not used", len(matched), len(classes), head.dataset)
        return None
    scale = float(getattr(net, "logit_scale", 1.0))  # the pretrained logits: scale * (W x + b)
    weight, bias = torch.zeros(len(classes), head.weight.shape[1]), torch.zeros(len(classes))
    mask = torch.zeros(len(classes), dtype=torch.bool)
    for k, row in matched.items():
        weight[k], bias[k], mask[k] = head.weight[row] * scale, head.bias[row] * scale, True
    prior = ClassPrior(weight, bias, mask, head.dataset or "pretrained")
    log.info("class prior: %s; the head starts from those rows (--class-prior off: without)", prior.describe())
    return prior


def start_head_from(model: nn.Module, prior: ClassPrior) -> None:
    """A trainable Linear head starts from the prior's rows for the matched classes (the others as they are):
    its logits for them are the pretrained network's."""
    net = getattr(model, "model", model)
    layer, scale = net.get_classifier(), float(getattr(net, "logit_scale", 1.0))
    with torch.no_grad():
        rows = prior.matched.nonzero().flatten()
        layer.weight[rows] = (prior.weight[rows] / scale).to(layer.weight.dtype)
        layer.bias[rows] = (prior.bias[rows] / scale).to(layer.bias.dtype)
