"""The training settings, declared once: TrainConfig, recipes as partial overlays, resolution.

Every setting is a field of :class:`TrainConfig` whose metadata holds its help text, its choices and whether
it may change on ``--resume``. The ``train`` command's options are generated from these fields
(pipeline/cli/train.py), a recipe is a :class:`Recipe` naming only the settings it sets, and
:func:`resolve_config` merges the layers

    default < competition (its spec and default recipe) < --recipe NAME < weights < flags

recording which layer each value came from. The run stores the result with
those sources in RUN_DIR/config.json; ``--dry-run`` prints it.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError, check_choice, check_kind, check_views

AUGMENTS = ("pad_crop_flip", "resized_crop_flip_jitter", "letterbox", "light", "none", "trivialaugment",
            "randaugment", "d4", "erasing")  # pipeline/data/items.py and pipeline/data/presets.py build them
CACHEABLE_AUGMENTS = ("pad_crop_flip", "none")  # what the image cache augments on the device (pipeline/data/loaders.py)
MAX_CACHE_ON_SIDE = 256  # --cache on above this side would hold too much in memory
CALIBRATES = ("auto", "on", "off")  # pipeline/predict/calibrate.py: auto is on for log-loss competitions
AUTO = "auto"  # --batch-size auto: pipeline/train/autobatch.py picks it per member


def setting(default: Any, help: str, *, choices: tuple = (), movable: bool = False, flag: str | None = None,
            minimum: float | None = None, cli: bool = True) -> Any:
    """A TrainConfig field: its default and what the CLI and --resume need to know of it."""
    meta = {"help": help, "choices": choices, "movable": movable, "flag": flag, "minimum": minimum, "cli": cli}
    if isinstance(default, (list, dict, set)):
        raise TypeError("settings are immutable values")
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class TrainConfig:
    competition: str = setting("", "Competition slug or spec file.", cli=False)
    work_dir: Path = setting(Path("."), "The reorg folder.", cli=False)
    run_dir: Path = setting(Path("."), "The run folder.", cli=False)
    # model
    model: str = setting("", "Registered model (resnet18, resnet18_cifar, googlenet, fastnet, ...) or timm:<name>.")
    pretrained: bool = setting(False, "Download ImageNet weights (timm hub / torchvision).")
    weights: Path | None = setting(None, "Local weights (.safetensors/.pth/.pt) to start from, offline.")
    head: str = setting("linear", "New head: linear, mlp (Linear-ReLU-Linear), or logreg (--freeze-backbone: fitted "
                        "by logistic regression on the cached features).", choices=("linear", "mlp", "logreg"))
    head_hidden: int = setting(256, "Hidden width of the mlp head.", minimum=1)
    class_prior: str = setting("auto", "Classes named as the pretrained classifier's (ImageNet's) start the head from "
                               "its rows: auto (half the classes match) or off.", choices=("auto", "off"))
    drop_rate: float | None = setting(None, "Dropout before the classifier (default: the architecture's).")
    freeze_backbone: bool = setting(False, "Train only a new head on a frozen backbone.")
    backbone_lr_scale: float = setting(1.0, "Backbone lr = lr x this (fine-tuning).")
    layer_decay: float = setting(0.0, "Layer-wise lr decay of timm backbones: each layer's lr is this x the lr of "
                                 "the layer above, the head at --lr (e.g. 0.75; 0: off).", minimum=0)
    unfreeze_after: int = setting(0, "Fine-tune in two phases: the head alone on the frozen backbone for N epochs, "
                                  "then the whole model with a fresh optimizer and schedule (0: off).", minimum=0)
    # data
    image_size: int = setting(32, "Side of the square input, pixels.", minimum=1)
    mean: tuple[float, ...] = setting((0.5, 0.5, 0.5), "Normalisation mean (RGB, 0-1).", cli=False)
    std: tuple[float, ...] = setting((0.5, 0.5, 0.5), "Normalisation std (RGB, 0-1).", cli=False)
    augment: str = setting("pad_crop_flip", "Training augmentation preset.", choices=AUGMENTS)
    num_workers: int | None = setting(None, "DataLoader worker processes (default: from the CPU count and the "
                                      "device, see pipeline/devices.py).", movable=True, minimum=0)
    strict: bool = setting(False, "Unreadable training images are errors, not warnings.")
    cache: str = setting("auto", "Decode images once into a uint8 array: auto (side <= 64), on, off.",
                         choices=("auto", "on", "off"))
    feature_cache: bool = setting(True, "With --freeze-backbone: train the head on cached features.")
    feature_views: int = setting(1, "Augmented views per image in the feature cache (0: none).", minimum=0)
    infer_batch_size: int | None = setting(None, "Images per batch of feature extraction and validation (default: "
                                           "from a memory budget, see pipeline/devices.py).", movable=True, minimum=1)
    # optimisation (lr is per group before the schedule's multiplier)
    epochs: int = setting(10, "Training epochs.", movable=True, minimum=1)
    batch_size: int | str = setting(128, "Images per step (per process under torchrun), or auto: the largest the "
                                    "memory holds (CUDA: probed; halved on out-of-memory while training).", minimum=1)
    accum_steps: int = setting(1, "Gradient accumulation: each optimizer step sums the gradients of N batches "
                               "(one batch of N x --batch-size in the memory of one).", minimum=1)
    lr: float = setting(0.1, "Peak learning rate of the head (backbone: x --backbone-lr-scale).")
    optimizer: str = setting("sgd", "Optimizer.", choices=("sgd", "adam", "adamw"))
    momentum: float = setting(0.9, "SGD momentum.", minimum=0)
    nesterov: bool = setting(False, "Nesterov momentum (SGD).")
    weight_decay: float = setting(5e-4, "Weight decay (not on norms and biases).", minimum=0)
    schedule: str = setting("cosine", "Learning-rate schedule.", choices=("step", "cosine", "onecycle", "constant"))
    lr_period_epochs: int = setting(10, "step schedule: decay every N epochs.", flag="--lr-period", minimum=1)
    lr_decay: float = setting(0.1, "step schedule: lr factor per period.")
    warmup_epochs: float = setting(0.0, "Linear warm-up, epochs.", minimum=0)
    label_smoothing: float = setting(0.0, "Label smoothing of the loss, in [0, 1).", minimum=0)
    balance: str = setting("none", "Rare classes: sampler draws every class (multilabel: each row as its rarest "
                           "label) equally often; loss weights the loss by inverse class frequency (multilabel: "
                           "positives by negatives/positives per label); none: off, the default, since balancing "
                           "skews the probabilities that log-loss and AUC competitions score.",
                           choices=("none", "sampler", "loss"))
    data_init: bool = setting(False, "Initialise from training data where the model can (fastnet: whitened stem).")
    mixup: float = setting(0.0, "Mixup Beta alpha (0: off).", minimum=0)
    cutmix: float = setting(0.0, "CutMix Beta alpha (0: off).", minimum=0)
    clip_grad: float = setting(0.0, "Max gradient norm (0: off).", minimum=0)
    ema: float = setting(0.0, "EMA decay of the weights per step, e.g. 0.999 (0: off).", minimum=0)
    average_last: int = setting(0, "Weight averaging (SWA): predict keeps the equal-weight average of the weights "
                                "at the end of each of the last K epochs, BatchNorm statistics recomputed on the "
                                "training images (0: off).", minimum=0)
    time_limit: float = setting(0.0, "Minutes per member: training stops at the first epoch boundary where another "
                                "epoch as long as the last would pass it, leaving a finished member (0: off).",
                                movable=True, minimum=0)
    early_stop: int = setting(0, "Stop after N epochs without improvement (0: off).", movable=True, minimum=0)
    select: str = setting("last", "Weights each member keeps for predict: last (the final epoch, EMA if on: its "
                          "validation score is honest) or best (the best validation epoch: its score is optimistic).",
                          choices=("last", "best"))
    steps_per_epoch: int = setting(0, "Cap on batches per epoch (smoke tests; 0: the whole set).", minimum=0)
    # what to train: holdout (train/ vs valid/), CV folds, or train_valid
    folds: int = setting(0, "Train every fold of folds.csv (give its fold count).", movable=True, minimum=0)
    fold: int | None = setting(None, "Train one fold of folds.csv.", movable=True, minimum=0)
    full: bool = setting(False, "Train on train_valid, no validation (final retrain).", movable=True)
    soft_labels: Path | None = setting(None, "Teacher run whose predictions mix into the targets (train/teacher.py).")
    soft_weight: float = setting(0.5, "--soft-labels: target = (1 - A) x label + A x teacher.", minimum=0)
    pseudo_label: Path | None = setting(None, "Teacher run labelling the test images added to every training set.")
    pseudo_threshold: float | None = setting(None, "Hard pseudo-labels where the teacher is >= P sure.", minimum=0)
    teacher_source: str = setting("fold", "Fold k's teacher: its fold-k model (fold) or all.", choices=("fold", "all"))
    tta: str = setting("none", "Test-time views, averaged in validation, out-of-fold and test predictions: a comma "
                       "list of views (flip, rot90, shiftul, scale1.15, ...) and presets (d4, multiscale, flipshift).")
    test_size: str = setting("train", "Test images' side before the views: train (the training side), auto (the "
                             "weights' test_input_size and crop: FixRes) or pixels.")
    calibrate: str = setting("off", "Temperature + class-prior weight fitted on the OOF (scored nested), used by "
                             "predict and blend: auto (log-loss competitions), on, off.", choices=CALIBRATES,
                             movable=True)
    # hardware
    device: str = setting("auto", "auto, cpu, cuda or cuda:N.", movable=True)
    amp: str = setting("auto", "Mixed precision: auto (bf16 on GPUs with native bf16, fp16 + loss scaling on "
                       "older ones, none on CPU), none, bf16 or fp16 (explicit: also on CPU).",
                       choices=("auto", "none", "bf16", "fp16"))
    channels_last: bool | None = setting(None, "channels_last memory format for image batches (default: on for "
                                         "CUDA from Volta on; explicit: also on CPU).")
    compile: bool = setting(False, "torch.compile the model.", movable=True)
    seed: int = setting(0, "Seed of initialisation, shuffling and augmentation.")
    tensorboard: bool = setting(False, "Log scalars for TensorBoard (pip install tensorboard).", movable=True)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check_setting(f, getattr(self, f.name))
        if not self.model:
            raise PipelineError("no model: give --model NAME (the competition's recipe names none)")
        check_views(self.tta, self.test_size)  # pipeline/errors.py: one line naming the valid values
        if isinstance(self.batch_size, str) and self.batch_size != AUTO:
            raise PipelineError(f"--batch-size must be a whole number or {AUTO}, got {self.batch_size!r}")
        if self.lr <= 0:
            raise PipelineError(f"--lr must be > 0, got {self.lr}")
        if not 0 <= self.ema < 1:
            raise PipelineError(f"--ema must be in [0, 1) (a decay like 0.999), got {self.ema}")
        if self.layer_decay > 1:
            raise PipelineError(f"--layer-decay must be in (0, 1] (e.g. 0.75), got {self.layer_decay}")
        if not 0 <= self.label_smoothing < 1:
            raise PipelineError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.cache == "on" and self.augment not in CACHEABLE_AUGMENTS:
            raise PipelineError(f"--cache on needs --augment {' or '.join(CACHEABLE_AUGMENTS)} (got {self.augment}); "
                                "use --cache off")
        if self.cache == "on" and self.image_size > MAX_CACHE_ON_SIDE:
            raise PipelineError(f"--cache on at {self.image_size} px would need too much memory; use --cache off")
        if (self.folds > 0) + (self.fold is not None) + self.full > 1:
            raise PipelineError("choose one of --folds, --fold and --full")
        if self.pretrained and self.weights is not None:
            raise PipelineError("choose --pretrained (download) or --weights FILE (local), not both")
        if self.unfreeze_after and self.unfreeze_after >= self.epochs:
            raise PipelineError(f"--unfreeze-after {self.unfreeze_after} leaves no epoch to fine-tune in "
                                f"--epochs {self.epochs}; raise --epochs or lower --unfreeze-after")
        if self.head == "logreg" and not ((self.freeze_backbone or self.unfreeze_after) and self.feature_cache):
            raise PipelineError("--head logreg fits a linear head on cached backbone features: add "
                                "--freeze-backbone (and keep --feature-cache on), or use --head linear")
        if self.head == "logreg" and self.unfreeze_after > 1:
            raise PipelineError("--head logreg is fitted once: use --unfreeze-after 1")
        if self.head == "logreg" and self.ema:
            raise PipelineError("--head logreg is fitted once: an --ema average of it would be the unfitted head; "
                                "drop --ema")
        if self.average_last:
            check_averaging(self)

    @property
    def model_head(self) -> str:
        """The head module the model is built with: logreg is a linear head fitted another way."""
        return "linear" if self.head == "logreg" else self.head

    @property
    def mode(self) -> str:
        if self.full:
            return "full"
        if self.folds > 0 or self.fold is not None:
            return "folds"
        return "holdout"

    def to_json(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainConfig:
        """From ``to_json``'s dict, or a run's config.json ({"config": ..., "sources": ...})."""
        data = data.get("config", data)
        known = {f.name: f for f in dataclasses.fields(cls)}
        for k, v in data.items():
            if k in known:
                check_setting(known[k], v, f"config.{k}")
        return cls(**{k: _typed(known[k], v) for k, v in data.items() if k in known})


def check_averaging(cfg: TrainConfig) -> None:
    """--average-last K: K epochs of one trained phase to average, one kind of averaged weights, kept last."""
    if cfg.head == "logreg":
        raise PipelineError("--head logreg is fitted once: its average would be the unfitted head; drop --average-last")
    if cfg.average_last > cfg.epochs - cfg.unfreeze_after:
        raise PipelineError(f"--average-last {cfg.average_last} needs that many epochs after --unfreeze-after "
                            f"{cfg.unfreeze_after} in --epochs {cfg.epochs}; lower --average-last or raise --epochs")
    if cfg.ema or cfg.select == "best":
        raise PipelineError("--average-last keeps the average of the last epochs: not with --ema (a moving average "
                            "per step) or --select best (one epoch); drop one of them")


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def cli_fields() -> list[dataclasses.Field]:
    """The settings that are `pipeline train` options, in declaration order."""
    return [f for f in dataclasses.fields(TrainConfig) if f.metadata.get("cli")]


def check_setting(f: dataclasses.Field, value: Any, name: str | None = None) -> None:
    """The one check of a setting, whatever its source: its kind, choices and minimum (``name``: as written
    there, default the CLI flag)."""
    name = name or flag_of(f)
    check_kind(f.type, name, value)
    if f.metadata.get("choices"):
        check_choice(name, value, f.metadata["choices"])
    minimum = f.metadata.get("minimum")
    if minimum is not None and isinstance(value, (int, float)) and value < minimum:
        raise PipelineError(f"{name} must be >= {minimum}, got {value}")


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    return list(value) if isinstance(value, tuple) else value


def _typed(f: dataclasses.Field, value: Any) -> Any:
    """A JSON value back to the field's type (paths and tuples)."""
    if value is None:
        return None
    if f.name in ("work_dir", "run_dir", "weights", "soft_labels", "pseudo_label"):
        return Path(value)
    return tuple(value) if isinstance(value, list) else value


# ---------------------------------------------------------------- recipes


class Recipe(Mapping):
    """A partial overlay of TrainConfig: only the settings it names, checked against the schema."""

    def __init__(self, **settings: Any):
        fields = {f.name: f for f in dataclasses.fields(TrainConfig) if f.metadata.get("cli")}
        unknown = sorted(set(settings) - set(fields))
        if unknown:
            raise PipelineError(f"recipe setting(s) {', '.join(unknown)} unknown; valid: {', '.join(sorted(fields))}")
        for name, value in settings.items():
            check_setting(fields[name], value, name)
        self._settings = dict(settings)

    def __getitem__(self, key: str) -> Any:
        return self._settings[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._settings)

    def __len__(self) -> int:
        return len(self._settings)

    def __repr__(self) -> str:
        return f"Recipe({', '.join(f'{k}={v!r}' for k, v in self._settings.items())})"

    @property
    def model(self) -> str | None:
        return self._settings.get("model")


def recipe_of(comp, name: str) -> Recipe:
    """``--recipe``: a named recipe of the competition, or a recipe file (``NAME.toml``: one ``setting =
    value`` line per setting it sets, as `pipeline tune` writes them)."""
    if not (name.endswith(".toml") or Path(name).is_file()):
        return comp.get_recipe(name)
    import tomllib

    try:
        settings = tomllib.loads(Path(name).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"recipe file {name} not found; check the path") from None
    except (OSError, ValueError) as exc:  # tomllib.TOMLDecodeError is a ValueError
        raise PipelineError(f"recipe file {name} is not readable TOML ({exc}); fix or rewrite it") from None
    try:
        return Recipe(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()})
    except PipelineError as exc:
        raise PipelineError(f"recipe file {name}: {exc}") from None


def recipe_text(settings: Mapping[str, Any], comment: str = "") -> str:
    """A recipe file's text (TOML): ``comment`` lines, then ``setting = value`` for each setting set."""
    Recipe(**settings)  # only settings a recipe may set, with valid values
    lines = [f"# {line}" for line in comment.splitlines()]
    for name, value in settings.items():
        if value is not None:
            lines.append(f"{name} = {json.dumps(_plain(value))}")  # JSON strings, numbers, booleans, lists: TOML
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- resolution


@dataclass(frozen=True)
class Resolved:
    """A resolved configuration, where each value came from, and what resolution changed and why."""

    config: TrainConfig
    sources: dict[str, str]
    notes: tuple[str, ...] = ()
    recipe: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config.to_json(), "sources": self.sources, "notes": list(self.notes),
                "recipe": self.recipe}

    def table(self) -> str:
        """One line per setting: name, value and its source, for --dry-run and the run's log."""
        rows = [(f.name, _plain(getattr(self.config, f.name)), self.sources.get(f.name, "default"))
                for f in dataclasses.fields(TrainConfig)]
        width = max(len(r[0]) for r in rows)
        lines = [f"{name:<{width}}  {json.dumps(value)!s:<28}  {source}" for name, value, source in rows]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def resolve_config(comp, work_dir: Path, run_dir: Path, recipe_name: str | None = None,
                   flags: Mapping[str, Any] | None = None,
                   weights_config: Any = None) -> Resolved:
    """Merge default < competition < --recipe < weights < flags, recording the source of each value.

    ``flags`` holds the options the user gave (None: not given). Overriding the
    model keeps the recipe's other choices; a local --weights file replaces the
    recipe's download. ``weights_config(model) -> {image_size, mean, std}`` is
    the data config of a model's pretrained weights (injected for tests).
    """
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    notes: list[str] = []

    def layer(name: str, settings: Mapping[str, Any]) -> None:
        values.update(settings)
        sources.update({k: name for k in settings})

    layer("competition", {"image_size": comp.image_size, "mean": tuple(comp.mean), "std": tuple(comp.std),
                          **comp.recipe})
    if recipe_name not in (None, "default"):
        layer(f"recipe {recipe_name}", recipe_of(comp, recipe_name))
    if "weights" in flags and values.get("pretrained"):
        layer("flag", {"pretrained": False})
        notes.append("--weights FILE replaces the recipe's download (pretrained off)")
    model = flags.get("model", values.get("model", ""))
    if model and (flags.get("pretrained", values.get("pretrained")) or flags.get("weights")):
        if weights_config is None:  # the caller holds the model registry (pipeline.models.weights_data_config)
            raise ValueError(f"resolve_config needs weights_config to read {model}'s pretrained input settings")
        data = weights_config(model)
        layer("weights", {k: v for k, v in data.items() if k not in flags})
    layer("flag", flags)
    cfg = TrainConfig(competition=comp.slug, work_dir=absolute(work_dir), run_dir=absolute(run_dir), **values)
    return Resolved(cfg, {k: sources.get(k, "default") for k in values}, tuple(notes), recipe_name)


def resumed_config(saved: TrainConfig, flags: Mapping[str, Any], work_dir: Path, run_dir: Path) -> TrainConfig:
    """The saved settings with the movable ones the user changed; any other change is an error.

    The folders are always the ones on the command line: a config.json that
    names others cannot move writes outside RUN_DIR.
    """
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    changes: dict[str, Any] = {}
    for name, value in flags.items():
        if value is None or _typed(fields[name], _plain(value)) == getattr(saved, name):
            continue
        if not fields[name].metadata.get("movable"):
            raise PipelineError(f"{flag_of(fields[name])} {_plain(value)} differs from the run's "
                                f"{_plain(getattr(saved, name))}; a resumed run keeps its settings: drop the option, "
                                "or train into a new RUN_DIR")
        changes[name] = value
    if changes.get("full"):
        changes.update(folds=0, fold=None)
    elif "fold" in changes or "folds" in changes:
        changes.setdefault("full", False)
        if "fold" in changes:
            changes["folds"] = 0
        else:
            changes["fold"] = None
    return dataclasses.replace(saved, work_dir=absolute(work_dir), run_dir=absolute(run_dir), **changes)


def absolute(path: Path) -> Path:
    """``path`` made absolute against the current folder (links kept): stored configs work from anywhere."""
    return Path(os.path.abspath(path))


def load_resolved(path: Path) -> tuple[TrainConfig, dict]:
    """A run's or member's config.json: the config and the whole stored document."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return TrainConfig.from_json(data), data
    except FileNotFoundError:
        raise PipelineError(f"{path} not found: RUN_DIR is not a training run; run `pipeline train` first") from None
    except (ValueError, TypeError, KeyError, AttributeError, PipelineError) as exc:
        raise PipelineError(f"{path} is not a valid run config ({exc}); retrain into a new RUN_DIR") from None


