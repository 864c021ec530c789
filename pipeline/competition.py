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

# Settings more than one place starts from: FastNet from scratch on small images, after the published CIFAR-10
# speed runs (Nesterov SGD, a one-cycle lr, label smoothing, the stem whitened from the data, flip TTA), stated
# at full data size (pipeline/train/adapt.py fits batch, lr and epochs to a smaller set). A registered
# competition's named recipe and `pipeline init`'s guess for a download of small images both take it from here.
SPEED_RUN = {"model": "fastnet", "epochs": 10, "batch_size": 512, "lr": 0.4, "optimizer": "sgd", "momentum": 0.85,
             "nesterov": True, "weight_decay": 5e-4, "schedule": "onecycle", "label_smoothing": 0.2,
             "augment": "pad_crop_flip", "tta": "flip", "data_init": True}

SubmissionKind = Literal["label", "probs", "binary", "tags", "value", "grade"]
SUBMISSIONS = ("label", "probs", "binary", "tags", "value", "grade")
Metric = str  # a name of pipeline/metrics.py METRICS
Layout = Literal["csv", "folders", "names"]
TASKS = ("single", "multilabel", "regression", "ordinal")  # pipeline/models/task.py: what each implies
# which submissions each task can write (pipeline/predict/submission.py)
TASK_SUBMISSIONS = {"single": ("label", "probs", "binary"), "multilabel": ("tags", "probs"),
                    "regression": ("value",), "ordinal": ("grade", "value")}


@dataclass(frozen=True, kw_only=True)
class Competition:
    """Where a competition's files are, what it scores and how it is submitted.

    Paths are relative to the unzipped Kaggle download (RAW_DIR), "/"-separated
    ("." is RAW_DIR itself). Columns are found by name, never by position.

    Where the images are (see pipeline/download/layout.py):

    - ``layout="csv"``: ``labels_file`` has one row per training image, its id
      in ``id_column`` and class in ``label_column``; the image is
      ``<train_dir>/<id><image_ext>``, or ``<train_dir>/<path>`` when
      ``path_column`` names a column of paths (``images/x.jpg``, or ``x.jpg``
      when it is the id column itself).
    - ``layout="folders"``: ``<train_dir>/<class>/<name><image_ext>``, the id is
      the name; no labels file. ``valid_dir`` (same form) is a given
      validation split, used instead of a random one.

    Test ids are those of the ``<test_dir>/*<image_ext>`` files, or, with
    ``test_file``, the ids (and ``path_column`` paths) that CSV lists; they
    must be exactly the sample submission's ids. ``train_dir`` may equal
    ``test_dir`` (one image folder) when ``test_file`` says which are test.
    """

    # Each spec-file field with what it means (``help``), in the order a spec file lists them
    # (pipeline/download/specfile.py writes them with this help).
    slug: str = field(metadata={"help": "the CLI name; the Kaggle slug, which `pipeline submit` submits to"})
    title: str = field(metadata={"help": "free text"})
    task: str = field(default="single", metadata={
        "help": "single: one class per image (softmax); multilabel: any set of labels per image (one sigmoid each); "
                "regression: a number per image; ordinal: an integer grade, predicted as a number cut by thresholds"})
    layout: Layout = field(default="csv", metadata={
        "help": "csv: a labels CSV lists the training images; folders: train_dir/<class>/<image>; "
                "names: the label is in each training file's name (label_pattern)"})
    labels_file: str = field(default="", metadata={"help": "layout csv: the CSV with one row per training image"})
    id_column: str = field(metadata={"help": "the id column of every CSV (labels, test file, sample submission)"})
    label_column: str = field(default="", metadata={
        "help": "layout csv: the target column of labels_file (a class, tags, a number or a grade)"})
    label_columns: tuple[str, ...] = field(default=(), metadata={
        "help": "layout csv: one 0/1 column per class or label (one-hot or multi-hot), instead of label_column"})
    label_separator: str = field(default="", metadata={
        "help": "task multilabel with label_column: what separates the labels of one row (e.g. \" \")"})
    label_pattern: str = field(default="", metadata={
        "help": "layout names: a regex matched against each training file's name, whose group (?P<label>...) is "
                "the label"})
    metadata: tuple[str, ...] = field(default=(), metadata={
        "help": "numeric or categorical columns of labels_file (and test_file) fed to the model beside the image"})
    group_column: str = field(default="", metadata={
        "help": "a column of labels_file naming a group (patient, scene): a group never spans train and valid"})
    path_column: str = field(default="", metadata={
        "help": "a column of image paths (x.jpg, images/x.jpg); unset: <id><image_ext>"})
    train_dir: str = field(default="train", metadata={
        "help": "the folder of the training images, relative to this download"})
    valid_dir: str = field(default="", metadata={
        "help": "layout folders: a given validation split, <valid_dir>/<class>/<image>"})
    test_dir: str = field(default="test", metadata={"help": "the folder of the test images"})
    test_file: str = field(default="", metadata={
        "help": "a CSV listing the test ids (may be the sample submission); unset: every test_dir image"})
    image_ext: str = field(default=".png", metadata={"help": "how image file names end"})
    sample_submission: str = field(metadata={
        "help": "Kaggle's example submission: its ids, columns and order are the submission's"})
    submission: SubmissionKind = field(metadata={
        "help": "label: one class-name column; probs: one probability column per class; "
                "binary: one probability column for the positive class"})
    submission_label_column: str = field(default="label", metadata={
        "help": "submission label: the class-name column"})
    positive_label: str = field(default="", metadata={
        "help": "submission binary: the label whose probability is submitted (unset: 1 or true)"})
    metric: Metric = field(metadata={
        "help": "the competition's Evaluation page: accuracy, log_loss, roc_auc, qwk, macro_f1, f_beta_samples, "
                "f_beta_micro, f_beta_macro, mean_auc, rmse or mae"})
    beta: float = field(default=1.0, metadata={"help": "metric f_beta_*: the beta (2 for F2)"})
    loss: str = field(default="", metadata={
        "help": "task regression or ordinal: the training loss on the standardised target, mse (unset) or huber"})
    image_size: int = field(metadata={"help": "the side of the square the model sees"})
    mean: tuple[float, float, float] = field(metadata={"help": "normalisation mean (RGB, 0-1)"})
    std: tuple[float, float, float] = field(metadata={"help": "normalisation std (RGB, 0-1)"})
    recipe: Recipe  # the default training settings ([recipe] in a spec file)
    # The spec file this competition was read from ("" for a registered module)
    spec_file: str = field(default="", compare=False)
    # Named alternatives to ``recipe`` (`pipeline train --recipe NAME`)
    recipes: dict[str, Recipe] = field(default_factory=dict, compare=False)
    # Writes a Kaggle-layout download into the given folder, for competitions
    # whose data ships with a dependency (the demo); None means "use kaggle".
    make_raw: Callable[[Path], None] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.image_ext.startswith(".") or len(self.image_ext) < 2:
            raise PipelineError(f"competition {self.slug}: image_ext must start with '.', got {self.image_ext!r}")
        if self.task not in TASKS:
            raise PipelineError(f"competition {self.slug}: task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.submission not in TASK_SUBMISSIONS[self.task]:
            raise PipelineError(f"competition {self.slug}: task {self.task!r} submits "
                                f"{' or '.join(map(repr, TASK_SUBMISSIONS[self.task]))}, not {self.submission!r}")
        if self.positive_label and self.submission != "binary":
            raise PipelineError(f"competition {self.slug}: positive_label needs submission 'binary'")
        from pipeline.metrics import check_metric  # sklearn loads only when a competition is built

        check_metric(self.metric, self.task)
        if self.loss not in ("", "mse", "huber"):
            raise PipelineError(f"competition {self.slug}: loss must be 'mse' or 'huber', got {self.loss!r}")
        if self.loss and self.task not in ("regression", "ordinal"):
            raise PipelineError(f"competition {self.slug}: loss is for task 'regression' or 'ordinal'")
        if not self.beta > 0:
            raise PipelineError(f"competition {self.slug}: beta must be > 0, got {self.beta}")
        self._check_layout()

    def _check_layout(self) -> None:
        """The layout fields agree with each other; each error says which field to set."""
        def fail(what: str) -> None:
            raise PipelineError(f"competition {self.slug}: {what}")

        if self.layout not in ("csv", "folders", "names"):
            fail(f"layout must be 'csv', 'folders' or 'names', got {self.layout!r}")
        if not self.id_column:
            fail("id_column is empty; name the id column of the CSV files")
        if self.layout == "csv" and not (self.labels_file and (self.label_column or self.label_columns)):
            fail("layout 'csv' needs labels_file and label_column (or label_columns)")
        if self.label_column and self.label_columns:
            fail("set label_column (one target column) or label_columns (one 0/1 column each), not both")
        if self.label_columns and self.task not in ("single", "multilabel"):
            fail("label_columns (0/1 columns) need task 'single' (one-hot) or 'multilabel' (multi-hot)")
        if self.label_separator and self.task != "multilabel":
            fail("label_separator needs task 'multilabel'")
        if self.layout != "csv" and (self.labels_file or self.label_column or self.label_columns):
            fail(f"layout {self.layout!r} reads labels from the files' folders or names; "
                 "leave labels_file, label_column and label_columns empty")
        if self.layout == "names":
            self._check_pattern(fail)
        elif self.label_pattern:
            fail("label_pattern needs layout 'names'")
        if self.layout != "csv" and self.task != "single":
            fail(f"task {self.task!r} reads its targets from a labels CSV: layout 'csv'")
        if (self.metadata or self.group_column) and self.layout != "csv":
            fail("metadata and group_column are columns of labels_file: layout 'csv'")
        if self.metadata and not self.test_file:
            fail("metadata needs test_file: the CSV giving the test images' metadata columns")
        named = {self.id_column, self.label_column, *self.label_columns, self.path_column, self.group_column} - {""}
        clash = [c for c in self.metadata if c in named]
        if clash:
            fail(f"metadata column {clash[0]!r} is the id, target, path or group column; leave it out of metadata")
        if self.valid_dir and self.layout != "folders":
            fail("valid_dir needs layout 'folders'")
        if self.train_dir == self.test_dir and not self.test_file:
            fail(f"train_dir and test_dir are both {self.train_dir!r}; set test_file to the CSV listing the test ids")
        if self.path_column and self.layout != "csv" and not self.test_file:
            fail("path_column needs a CSV that lists images: layout 'csv' or a test_file")
        for name in ("labels_file", "train_dir", "valid_dir", "test_dir", "test_file", "sample_submission"):
            value = getattr(self, name)
            if value.startswith("/") or ".." in value.split("/") or "\\" in value:
                fail(f"{name} {value!r} must be a relative '/' path inside the download")

    def _check_pattern(self, fail) -> None:
        import re

        if not self.label_pattern:
            fail("layout 'names' needs label_pattern: a regex with a group (?P<label>...) matched on file names")
        try:
            compiled = re.compile(self.label_pattern)
        except re.error as exc:
            fail(f"label_pattern {self.label_pattern!r} is not a valid regex ({exc})")
        if "label" not in compiled.groupindex:
            fail(f"label_pattern {self.label_pattern!r} has no group (?P<label>...) for the label")

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
        choices = ", ".join(c.slug for c in list_competitions()) or "(none registered)"
        raise PipelineError(f"unknown competition {slug!r}; known: {choices}") from None


def list_competitions() -> list[Competition]:
    """Every competition once, by slug (a loaded spec file is also registered under its path)."""
    return [_REGISTRY[k] for k in sorted(_REGISTRY) if _REGISTRY[k].slug == k]
