"""TrainConfig: every training setting in one frozen, validated dataclass.

The CLI fills it from the competition's recipe plus the user's options
(:func:`config_from_recipe`); every run writes it to RUN_DIR/config.json and
every checkpoint carries it, so a run can be re-created from its files.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.competition import Competition
from pipeline.errors import PipelineError, check_choice

CHOICES = {
    "optimizer": ("sgd", "adam", "adamw"),
    "schedule": ("step", "cosine", "onecycle", "constant"),
    "amp": ("auto", "none", "bf16", "fp16"),
    "device": ("auto", "cpu", "cuda"),
    "head": ("linear", "mlp"),
    "augment": ("pad_crop_flip", "resized_crop_flip_jitter", "none"),
    "tta": ("none", "flip"),
    "cache": ("auto", "on", "off"),
}


@dataclass(frozen=True)
class TrainConfig:
    competition: str
    work_dir: Path
    run_dir: Path
    # model
    model: str
    pretrained: bool = False
    weights: Path | None = None
    head: str = "linear"
    head_hidden: int = 256
    drop_rate: float | None = None  # None: the architecture's default (googlenet 0.4)
    freeze_backbone: bool = False
    backbone_lr_scale: float = 1.0
    # data
    image_size: int = 32
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    augment: str = "pad_crop_flip"
    num_workers: int = 0
    strict: bool = False  # an unreadable training image is an error, not a warning
    cache: str = "auto"  # decode small images once into a uint8 array (auto: side <= 64)
    feature_cache: bool = True  # with freeze_backbone: train the head on cached features
    feature_views: int = 1  # augmented views per image in the feature cache (0: un-augmented only)
    # optimisation (lr is per group before the schedule's multiplier)
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    lr_period_epochs: int = 10
    lr_decay: float = 0.1
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    data_init: bool = False  # initialise from training data where the model can (FastNet: whitened stem)
    mixup: float = 0.0  # Beta(alpha, alpha) for mixup; 0 is off
    cutmix: float = 0.0  # Beta(alpha, alpha) for cutmix; 0 is off
    clip_grad: float = 0.0  # max grad norm; 0 is off
    ema: float = 0.0  # EMA decay per step, e.g. 0.999; 0 is off
    early_stop: int = 0  # stop after this many epochs without improvement; 0 is off
    steps_per_epoch: int = 0  # cap on batches per epoch (smoke tests); 0 is the whole set
    # what to train: holdout (train/ vs valid/), CV folds, or train_valid
    folds: int = 0  # > 0: train every fold of folds.csv (the value must match it)
    fold: int | None = None
    full: bool = False
    tta: str = "none"  # for the out-of-fold predictions
    # hardware
    device: str = "auto"
    amp: str = "auto"
    channels_last: bool = True
    compile: bool = False
    seed: int = 0
    tensorboard: bool = False

    def __post_init__(self) -> None:
        for name, allowed in CHOICES.items():
            check_choice(f"--{name.replace('_', '-')}", getattr(self, name), allowed)
        for name in ("epochs", "batch_size", "image_size", "head_hidden"):
            if getattr(self, name) < 1:
                raise PipelineError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise PipelineError(f"--lr must be > 0, got {self.lr}")
        if not 0 <= self.ema < 1:
            raise PipelineError(f"--ema must be in [0, 1) (a decay like 0.999), got {self.ema}")
        if not 0 <= self.label_smoothing < 1:
            raise PipelineError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        modes = (self.folds > 0) + (self.fold is not None) + self.full
        if modes > 1:
            raise PipelineError("choose one of --folds, --fold and --full")
        if self.pretrained and self.weights is not None:
            raise PipelineError("choose --pretrained (download) or --weights FILE (local), not both")

    @property
    def mode(self) -> str:
        if self.full:
            return "full"
        if self.folds > 0 or self.fold is not None:
            return "folds"
        return "holdout"

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, Path):
                out[key] = str(value)
            elif isinstance(value, tuple):
                out[key] = list(value)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        for key in ("work_dir", "run_dir"):
            data[key] = Path(data[key])
        if data.get("weights"):
            data["weights"] = Path(data["weights"])
        for key in ("mean", "std"):
            data[key] = tuple(data[key])
        return cls(**data)


def load_config(run_dir: Path) -> TrainConfig:
    path = Path(run_dir) / "config.json"
    try:
        return TrainConfig.from_json(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise PipelineError(f"{path} not found: RUN_DIR is not a training run; run `pipeline train` first") from None
    except (ValueError, TypeError, KeyError) as exc:
        raise PipelineError(f"{path} is not a valid run config ({exc}); retrain into a new RUN_DIR") from None


def config_from_recipe(comp: Competition, work_dir: Path, run_dir: Path, recipe_name: str | None = None,
                       **options: Any) -> TrainConfig:
    """The competition's recipe (default or named), with every option the user gave (not None) on top."""
    chosen = comp.get_recipe(recipe_name)
    recipe = dataclasses.asdict(chosen)
    recipe.update(image_size=comp.image_size, mean=comp.mean, std=comp.std)
    given = {k: v for k, v in options.items() if v is not None}
    if "model" in given and given["model"] != chosen.model:
        # The recipe's transfer-learning choices belong to its own model: with
        # another model the user states them (--pretrained, --freeze-backbone, --head).
        for key in ("pretrained", "freeze_backbone", "head"):
            recipe[key] = _default(key)
    if given.get("weights") is not None:
        recipe["pretrained"] = False  # a local file replaces the download
    merged = {**recipe, **given}
    if merged.get("pretrained") or merged.get("weights") is not None:
        merged.update({k: v for k, v in weights_data_config(merged["model"]).items() if k not in given})
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(competition=comp.slug, work_dir=Path(work_dir), run_dir=Path(run_dir),
                       **{k: v for k, v in merged.items() if k in known})


def weights_data_config(model_name: str) -> dict[str, Any]:
    """Input size and normalisation that a model's pretrained weights expect."""
    from pipeline.models import create_model, model_data_config

    skeleton = create_model(model_name, num_classes=2)  # random init; only its config is read
    data = model_data_config(skeleton, pretrained=True)
    return {"image_size": int(data["input_size"][-1]), "mean": tuple(data["mean"]), "std": tuple(data["std"])}


def _default(name: str) -> Any:
    return next(f.default for f in dataclasses.fields(TrainConfig) if f.name == name)
