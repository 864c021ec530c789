"""The Competition spec: every per-competition fact, in one frozen dataclass.

Nothing else in ``pipeline/`` names a competition. A competition is a module in
``competitions/`` that builds one :class:`Competition` and passes it to
:func:`register`; the CLI imports that package so the registry is filled.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

from pipeline.config import Recipe
from pipeline.errors import PipelineError

__all__ = ["Competition", "Recipe", "register", "get_competition", "list_competitions"]

SubmissionKind = Literal["label", "probs"]
Metric = Literal["accuracy", "log_loss", "roc_auc", "qwk", "macro_f1"]  # pipeline/metrics.py METRICS


@dataclass(frozen=True)
class Competition:
    """Where a competition's files are, what it scores and how it is submitted.

    Paths are relative to the unzipped Kaggle download (RAW_DIR).
    """

    slug: str  # the Kaggle slug, also the CLI name
    title: str
    labels_file: str  # CSV with one row per training image
    id_column: str
    label_column: str
    sample_submission: str
    submission: SubmissionKind  # one class-name column, or one probability column per class
    metric: Metric
    image_size: int  # side of the square the model sees by default
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    recipe: Recipe
    train_dir: str = "train"
    test_dir: str = "test"
    image_ext: str = ".png"
    submission_label_column: str = "label"  # for submission == "label"
    # Named alternatives to ``recipe`` (`pipeline train --recipe NAME`)
    recipes: dict[str, Recipe] = field(default_factory=dict, compare=False)
    # Writes a Kaggle-layout download into the given folder, for competitions
    # whose data ships with a dependency (the demo); None means "use kaggle".
    make_raw: Callable[[Path], None] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.image_ext.startswith("."):
            raise PipelineError(f"competition {self.slug}: image_ext must start with '.', got {self.image_ext!r}")
        if self.submission not in ("label", "probs"):
            raise PipelineError(f"competition {self.slug}: submission must be 'label' or 'probs'")
        from pipeline.metrics import check_metric  # sklearn loads only when a competition is built

        check_metric(self.metric)

    def get_recipe(self, name: str | None) -> Recipe:
        """The default recipe (None or "default"), or a named one; an unknown name lists the choices."""
        if name in (None, "default"):
            return self.recipe
        if name not in self.recipes:
            choices = ", ".join(["default", *sorted(self.recipes)])
            raise PipelineError(f"competition {self.slug} has no recipe {name!r}; choose one of: {choices}")
        return self.recipes[name]

    @property
    def higher_is_better(self) -> bool:
        from pipeline.metrics import METRICS

        return METRICS[self.metric].greater_is_better


_REGISTRY: dict[str, Competition] = {}


def register(comp: Competition) -> Competition:
    """Add a competition to the registry; a second one with the same slug is an error."""
    if comp.slug in _REGISTRY:
        raise PipelineError(f"competition {comp.slug!r} is registered twice")
    _REGISTRY[comp.slug] = comp
    return comp


def get_competition(slug: str) -> Competition:
    """The registered competition called ``slug``, or an error listing the choices."""
    try:
        return _REGISTRY[slug]
    except KeyError:
        choices = ", ".join(sorted(_REGISTRY)) or "(none registered)"
        raise PipelineError(f"unknown competition {slug!r}; known: {choices}") from None


def list_competitions() -> list[Competition]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]
