"""What a competition's task kind implies, in one place: targets, the model's outputs, the loss, the decision.

Four kinds (the spec's ``task``):

- ``single``: one class per image. Targets are class indices (N,); the model has
  one output per class, read through a softmax; cross-entropy; the decision is
  the argmax.
- ``multilabel``: any set of labels per image. Targets are (N, L) 0/1; one
  output per label, each read through a sigmoid; binary cross-entropy (with
  optional positive weights); the decision keeps the labels whose probability
  passes that label's threshold (0.5, or fitted out of fold).
- ``regression``: a number per image. Targets (N, 1); one output, trained on
  the target standardised with the member's training mean and std and mapped
  back (``center + scale * output``), clipped to the training range; MSE or
  Huber; the decision is the number.
- ``ordinal``: an integer grade. Trained and read as a regression on the grade
  index; the decision cuts the number into grades by thresholds (half-way
  between grades, or fitted out of fold).

Every stage moves the same currency: an (N, K) float array of outputs whose
columns are named by :attr:`Task.names` (classes, labels, or the target), and
targets in the shape above. Unreadable images carry :data:`BAD_TARGET` (single)
or a row of NaN (the others): :func:`bad_mask` finds both.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.errors import PipelineError
from pipeline.workdir import BAD_TARGET, LABEL_JOIN

KINDS = ("single", "multilabel", "regression", "ordinal")
LOSSES = ("mse", "huber")


def bad_mask(targets) -> np.ndarray | Tensor:
    """Rows whose image could not be decoded: BAD_TARGET (class indices) or any NaN (float targets)."""
    if targets.ndim == 1:
        return targets == BAD_TARGET
    return targets.isnan().any(dim=1) if isinstance(targets, Tensor) else np.isnan(targets).any(axis=1)


def bad_target(target):
    """The target an unreadable image carries, shaped like ``target``."""
    return BAD_TARGET if isinstance(target, int) else (math.nan,) * len(target)


def target_tensor(targets: list) -> Tensor:
    """Item targets as one tensor: class indices (N,) long, float targets (N, K) float32."""
    if not targets or isinstance(targets[0], int):
        return torch.tensor(targets, dtype=torch.long)
    return torch.tensor(targets, dtype=torch.float32)


@dataclass(frozen=True)
class Task:
    """A member's task: its kind, the names of its output columns, and what maps its outputs to predictions.

    ``center``/``scale``/``low``/``high`` (regression, ordinal) come from the
    member's own training targets (:meth:`fitted`), so nothing about the
    validation rows enters training; they travel in the checkpoint.
    """

    kind: str
    names: tuple[str, ...]  # output columns: classes, labels, or (the target column,)
    grades: tuple[str, ...] = ()  # ordinal: the grades in order (a grade index is a position here)
    loss: str = "mse"  # regression, ordinal: mse or huber
    center: float = 0.0
    scale: float = 1.0
    low: float = -math.inf
    high: float = math.inf
    thresholds: tuple[float, ...] = field(default=())  # fitted decision (multilabel: per label; ordinal: cuts)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise PipelineError(f"task {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.loss not in LOSSES:
            raise PipelineError(f"loss {self.loss!r} is not one of {', '.join(LOSSES)}")

    @property
    def n_outputs(self) -> int:
        return len(self.names) if self.kind in ("single", "multilabel") else 1

    @property
    def numeric(self) -> bool:
        return self.kind in ("regression", "ordinal")

    # ------------------------------------------------------------ from the work folder, to a checkpoint

    @classmethod
    def of(cls, info: dict, loss: str = "") -> Task:
        """The task of a work folder (reorg.json): kind and output names; not yet fitted to training rows.
        ``loss``: the spec's (regression, ordinal), mse when unset."""
        kind = info.get("task", "single")
        grades = tuple(info.get("grades", ())) if kind == "ordinal" else ()
        return cls(kind, tuple(info["classes"]), grades, loss=loss or "mse")

    def fitted(self, targets: Tensor) -> Task:
        """This task with the standardisation and range of ``targets`` (a member's training rows)."""
        if not self.numeric:
            return self
        values = targets.reshape(-1).double()
        values = values[~values.isnan()]
        if not len(values):
            raise PipelineError("no readable training image has a target: nothing to fit")
        scale = float(values.std()) if len(values) > 1 else 1.0
        return _replace(self, center=float(values.mean()), scale=scale if scale > 0 else 1.0,
                        low=float(values.min()), high=float(values.max()))

    def to_json(self) -> dict:
        data = asdict(self)
        data["names"], data["grades"], data["thresholds"] = list(self.names), list(self.grades), list(self.thresholds)
        for key in ("low", "high"):
            data[key] = None if math.isinf(data[key]) else data[key]
        return data

    @classmethod
    def from_json(cls, data: dict | None, classes: list[str]) -> Task:
        """A checkpoint's task; a checkpoint from before tasks existed is single-label over ``classes``."""
        if not data:
            return cls("single", tuple(classes))
        data = dict(data)
        data["low"] = -math.inf if data.get("low") is None else data["low"]
        data["high"] = math.inf if data.get("high") is None else data["high"]
        for key in ("names", "grades", "thresholds"):
            data[key] = tuple(data.get(key, ()))
        return cls(**data)

    def with_thresholds(self, thresholds) -> Task:
        return _replace(self, thresholds=tuple(float(t) for t in thresholds))

    # ------------------------------------------------------------ training

    def balance_weights(self, targets: Tensor) -> Tensor | None:
        """Loss weights for --balance loss: inverse class frequency (mean 1 over the classes present), or
        negatives/positives per label (capped at 100); None for the numeric kinds."""
        if self.kind == "single":
            counts = torch.bincount(targets[targets >= 0], minlength=len(self.names)).double()
            weights = torch.where(counts > 0, counts.sum() / (counts.clamp(min=1) * (counts > 0).sum()), 0.0)
            return weights.float()
        if self.kind == "multilabel":
            rows = targets[~targets.isnan().any(dim=1)].double()
            pos = rows.sum(dim=0)
            return ((len(rows) - pos) / pos.clamp(min=1)).clamp(max=100.0).float()
        return None

    def sample_weights(self, targets: Tensor) -> Tensor | None:
        """--balance sampler: a weight per training row so each class is drawn equally often (multilabel: a
        row counts as its rarest label, a row without labels as one more class); None for the numeric kinds."""
        if self.kind == "single":
            keys = targets
        elif self.kind == "multilabel":
            rows = torch.nan_to_num(targets, nan=0.0) > 0.5
            rarity = torch.where(rows, rows.sum(dim=0)[None, :].double(), torch.tensor(math.inf, dtype=torch.double))
            keys = torch.where(rows.any(dim=1), rarity.argmin(dim=1), torch.tensor(-1))
        else:
            return None
        _, inverse, counts = torch.unique(keys, return_inverse=True, return_counts=True)
        return 1.0 / counts[inverse].double()

    def criterion(self, label_smoothing: float = 0.0, class_weights: Tensor | None = None) -> nn.Module:
        """The training loss over the model's raw outputs; unreadable rows are left out."""
        if self.kind == "single":
            return ClassLoss(weight=class_weights, label_smoothing=label_smoothing, ignore_index=BAD_TARGET)
        if self.kind == "multilabel":
            return MaskedLoss("bce", pos_weight=class_weights)
        return MaskedLoss(self.loss, center=self.center, scale=self.scale)

    def activation(self, outputs: Tensor) -> Tensor:
        """Raw outputs -> predictions: softmax probabilities, sigmoid probabilities, or numbers in target units."""
        outputs = outputs.float()
        if self.kind == "single":
            return torch.softmax(outputs, dim=1)
        if self.kind == "multilabel":
            return torch.sigmoid(outputs)
        return (outputs * self.scale + self.center).clamp(self.low, self.high)

    # ------------------------------------------------------------ the decision

    def default_thresholds(self) -> tuple[float, ...]:
        if self.kind == "multilabel":
            return (0.5,) * len(self.names)
        if self.kind == "ordinal":
            return tuple(k + 0.5 for k in range(len(self.grades) - 1))
        return ()

    def decide(self, outputs: np.ndarray, thresholds=None) -> np.ndarray:
        """Predictions the metric or the submission needs: class indices, 0/1 label sets, grade indices,
        or the numbers themselves."""
        outputs = np.asarray(outputs, dtype=np.float64)
        cuts = np.asarray(self.thresholds or self.default_thresholds() if thresholds is None else thresholds)
        if self.kind == "single":
            return outputs.argmax(axis=1)
        if self.kind == "multilabel":
            return (outputs >= cuts[None, :]).astype(np.int64)
        if self.kind == "ordinal":
            return np.searchsorted(np.sort(cuts), outputs.reshape(-1), side="right").reshape(-1, 1)
        return outputs

    # ------------------------------------------------------------ targets as text (oof.csv's label column)

    def target_text(self, target) -> str:
        """One target as oof.csv's ``label`` cell: a class name, labels joined by LABEL_JOIN, a number, a grade."""
        if self.kind == "single":
            return self.names[int(target)]
        if self.kind == "multilabel":
            return LABEL_JOIN.join(n for n, v in zip(self.names, target) if v > 0.5)
        if self.kind == "ordinal":
            return self.grades[int(round(float(target[0])))]
        return repr(float(target[0]))

    def targets_from_text(self, cells) -> np.ndarray:
        """oof.csv's ``label`` column back to targets (inverse of :meth:`target_text`)."""
        cells = [str(c) for c in cells]
        if self.kind == "single":
            index = {c: i for i, c in enumerate(self.names)}
            return np.array([index[c] for c in cells], dtype=np.int64)
        if self.kind == "multilabel":
            index = {c: i for i, c in enumerate(self.names)}
            out = np.zeros((len(cells), len(self.names)))
            for r, cell in enumerate(cells):
                for name in filter(None, cell.split(LABEL_JOIN)):
                    out[r, index[name]] = 1.0
            return out
        if self.kind == "ordinal":
            index = {c: i for i, c in enumerate(self.grades)}
            return np.array([[float(index[c])] for c in cells])
        return np.array([[float(c)] for c in cells])


def _replace(task: Task, **changes) -> Task:
    from dataclasses import replace

    return replace(task, **changes)


class MaskedLoss(nn.Module):
    """BCE-with-logits summed over the labels (multilabel) or MSE/Huber on standardised targets (regression),
    averaged over the images; NaN rows (unreadable images) left out."""

    def __init__(self, kind: str, pos_weight: Tensor | None = None, center: float = 0.0, scale: float = 1.0):
        super().__init__()
        self.kind, self.center, self.scale = kind, center, scale
        self.register_buffer("pos_weight", pos_weight if pos_weight is not None else None)

    def forward(self, outputs: Tensor, targets: Tensor) -> Tensor:
        keep = ~targets.isnan().any(dim=1)
        outputs, targets = outputs[keep].float(), targets[keep].float()
        if not len(targets):
            return outputs.sum() * 0.0
        if self.kind == "bce":
            weight = self.pos_weight.to(outputs.device) if self.pos_weight is not None else None
            # summed over the labels, averaged over the images: each label's gradient as large as a class's
            # under cross-entropy, so a recipe's learning rate means the same for both kinds
            return nn.functional.binary_cross_entropy_with_logits(outputs, targets, pos_weight=weight,
                                                                  reduction="none").sum(dim=1).mean()
        standard = (targets - self.center) / self.scale
        if self.kind == "huber":
            return nn.functional.huber_loss(outputs, standard)
        return nn.functional.mse_loss(outputs, standard)


class ClassLoss(nn.CrossEntropyLoss):
    """Cross-entropy over class indices (unreadable rows: ignore_index) or over probability rows (a teacher's
    soft targets, pipeline/train/teacher.py; unreadable rows: NaN, left out). With class weights, probability
    rows are averaged over the rows, not over their weights (torch's rule for probability targets)."""

    def forward(self, outputs: Tensor, targets: Tensor) -> Tensor:
        if targets.ndim == 1:
            return super().forward(outputs, targets)
        keep = ~targets.isnan().any(dim=1)
        if not bool(keep.all()):
            outputs, targets = outputs[keep], targets[keep]
        if not len(targets):
            return outputs.sum() * 0.0
        return nn.functional.cross_entropy(outputs, targets, weight=self.weight, label_smoothing=self.label_smoothing)
