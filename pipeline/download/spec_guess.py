"""`pipeline init`: read a Kaggle download and guess its competition spec file.

:func:`survey` is the only part that reads the download (CSV headers and first
rows, which folders hold images and with which extensions, archives, a few
image sizes); :func:`infer` turns a survey into spec fields, each with the
reason it was chosen, plus the fields it could not decide; pipeline/init_toml
writes them as a commented TOML file (pipeline/download/specfile.py reads it back).
"""
from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.download import guess_kinds as kinds
from pipeline.download.archives import MANIFEST_NAME, UNPACK_HINT, archive_kind, not_unpacked
from pipeline.download.guess_kinds import IMAGE_EXTS, LABEL_NAMES
from pipeline.errors import PipelineError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HEAD_ROWS = 5000  # rows read of each CSV: enough to see the labels, cheap on any download


@dataclass
class Survey:
    """What init saw in a download."""

    raw_dir: Path
    csvs: dict[str, pd.DataFrame]  # name relative to RAW_DIR -> first rows, as strings
    direct: dict[str, Counter]  # folder -> extensions of the images directly in it
    nested: dict[str, dict[str, int]]  # top folder -> {sub-folder: images directly in it}
    archives: list[str]  # those not unpacked yet (pipeline/download/archives.py's manifest says which were)
    image_sides: list[int]  # the longer side of a few training images
    train_stems: list[str] = field(default_factory=list)  # layout names: the training file names, less image_ext


@dataclass
class Guess:
    """Spec fields with why each was chosen, and the fields left for the user."""

    fields: dict[str, Any] = field(default_factory=dict)
    why: dict[str, str] = field(default_factory=dict)
    undecided: dict[str, str] = field(default_factory=dict)  # field -> what to set it to
    recipe: dict[str, Any] = field(default_factory=dict)
    recipes: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def set(self, name: str, value: Any, why: str) -> None:
        self.fields[name], self.why[name] = value, why

    def ask(self, name: str, value: Any, what: str) -> None:
        """A placeholder ``value`` that the user must check: ``what`` says how."""
        self.fields[name], self.undecided[name] = value, what


# ---------------------------------------------------------------- reading the download


def survey(raw_dir: Path, max_depth: int = 3) -> Survey:
    """Read what init needs from ``raw_dir``: CSV heads, image folders, archives, a few image sizes."""
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise PipelineError(f"{raw_dir} is not a folder; give the folder of the unzipped Kaggle download")
    csvs, direct, archives = {}, {}, []
    for folder, dirs, files in os.walk(raw_dir):
        rel = Path(folder).relative_to(raw_dir).as_posix()
        depth = 0 if rel == "." else rel.count("/") + 1
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if depth < max_depth else []
        exts = Counter(os.path.splitext(f)[1].lower() for f in files if not f.startswith("."))
        images = Counter({e: n for e, n in exts.items() if e in IMAGE_EXTS})
        if images:
            direct[rel] = images
        for name in sorted(files):
            path = name if rel == "." else f"{rel}/{name}"
            if name.lower().endswith(".csv") and depth <= 1:
                csvs[path] = _head(raw_dir / path)
            elif archive_kind(name) and name != MANIFEST_NAME:
                archives.append(path)
    nested: dict[str, dict[str, int]] = {}
    for rel, exts in direct.items():
        if rel.count("/") == 1:
            top, sub = rel.split("/")
            nested.setdefault(top, {})[sub] = sum(exts.values())
    return Survey(raw_dir, csvs, direct, nested, not_unpacked(raw_dir, archives), [])


def _head(path: Path) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, dtype=str, nrows=HEAD_ROWS, keep_default_na=False)
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path} cannot be read as CSV ({exc}); repair or remove it and run init again") from None
    return frame.rename(columns=str.strip).apply(lambda col: col.str.strip())


def image_sides(raw_dir: Path, folder: str, limit: int = 5) -> list[int]:
    """The longer side of up to ``limit`` images under ``folder`` (header reads only; an unreadable
    image, a decompression bomb among them, is skipped)."""
    from pipeline.imagefile import UnreadableImage, open_image

    sides = []
    for root, _, files in os.walk(raw_dir / folder):
        for name in sorted(files):
            if os.path.splitext(name)[1].lower() in IMAGE_EXTS:
                try:
                    with open_image(Path(root) / name) as im:
                        sides.append(max(im.size))
                except UnreadableImage:
                    continue
                if len(sides) >= limit:
                    return sides
    return sides


# ---------------------------------------------------------------- inference


def guess(s: Survey, slug: str) -> Guess:
    """Every spec field that the survey decides, with the reason; the rest as questions."""
    g = Guess()
    g.set("slug", slug, "from the folder name (or --slug)")
    g.fields["title"] = slug
    if s.archives:
        state = "and no images yet" if not s.direct else "that may hold what is not unpacked yet"
        g.notes.append(f"the download holds archives {state} ({', '.join(s.archives[:4])}): {UNPACK_HINT}")
    sample = _sample_name(s, g)
    frame = s.csvs.get(sample, pd.DataFrame())
    id_column = frame.columns[0] if len(frame.columns) else ""
    if id_column:
        g.set("id_column", id_column, f"the first column of {sample}")
    else:
        g.ask("id_column", "", "the id column of the CSV files")
    others = [c for c in frame.columns if c != id_column]
    _folders(s, g, id_column, sample)
    labels = _labels_file(s, g, id_column, sample)
    decided = g.fields.get("layout") == "csv" and kinds.target(g, labels, frame, others)  # not one class column
    kind = g.fields["submission"] if decided else _submission_kind(s, g, frame, others, labels)
    if g.fields.get("layout") == "csv":
        if not decided:
            _label_column(s, g, labels, kind, others)
        _paths(s, g, labels, id_column)
        if g.fields.get("path_column") == id_column and "test_file" not in g.fields and sample:
            g.set("test_file", sample, "the ids are file names: the sample submission lists the test images")
        _beside_the_target(s, g, labels, others)
    counts, rows = kinds.target_counts(s, g, labels)
    if kind == "binary":
        _positive(g, others[0], sorted(counts))
    if "metric" not in g.fields:
        g.set("metric", {"probs": "log_loss", "binary": "roc_auc"}.get(kind, "accuracy"),
              "the usual metric of this submission kind: check the competition's Evaluation page")
    kinds.rare_note(g, counts, rows, truncated=len(labels) >= HEAD_ROWS)
    _size_and_recipe(s, g)
    return g


def _beside_the_target(s: Survey, g: Guess, labels: pd.DataFrame, others: list[str]) -> None:
    """group_column and metadata: the labels CSV's other columns that group rows or describe an image."""
    taken = {g.fields.get(k, "") for k in ("id_column", "label_column", "path_column")}
    taken |= {*g.fields.get("label_columns", ()), *others}
    kinds.group_column(g, labels, taken)
    test = g.fields.get("test_file", "")
    if test and test != g.fields.get("sample_submission"):
        kinds.metadata(g, labels, s.csvs[test], taken | {g.fields.get("group_column", "")})


def _sample_name(s: Survey, g: Guess) -> str:
    names = [n for n in s.csvs if re.search(r"sample|submission", n, re.I)]
    if not names:
        g.ask("sample_submission", "", "the CSV Kaggle gives as an example submission (id + prediction columns)")
        return ""
    g.set("sample_submission", names[0], "its name says sample/submission")
    if len(names) > 1:
        g.notes.append(f"several sample submissions ({', '.join(names)}); took {names[0]}")
    return names[0]


def _named(names: list[str], *starts: str) -> str:
    """The first of ``names`` whose last part starts with one of ``starts`` (case-insensitively)."""
    return next((n for n in names if n.rsplit("/", 1)[-1].lower().startswith(starts)), "")


def _folders(s: Survey, g: Guess, id_column: str, sample: str) -> None:
    """train_dir, test_dir, valid_dir and the folders layout when train/ holds class folders.

    The folders holding the labels CSV's and the test listing's ids win over folder names: images
    nested under a common folder (images/train, images/test) are found so, and never class folders.
    """
    tops = sorted({rel.split("/")[0] for rel in s.direct if rel != "."} | set(s.nested))
    if len(tops) == 1 and _named(sorted(s.nested.get(tops[0], {})), "train"):  # images/train, images/test
        tops = [f"{tops[0]}/{sub}" for sub in sorted(s.nested[tops[0]])]
    train, test = _named(tops, "train"), _named(tops, "test")
    valid = _named(tops, "val")
    if not train and not test and len(tops) == 1:  # one shared image folder: the CSVs say which is which
        train = test = tops[0]
    (by_ids, why_train), (test_by_ids, why_test) = kinds.locate(s, id_column, (train, test), sample,
                                                                       *_candidates(s, id_column, sample))
    train, why_train = (by_ids, f": {why_train}") if by_ids and by_ids != train else (train, "")
    test, why_test = (test_by_ids, f": {why_test}") if test_by_ids and test_by_ids != test else (test, "")
    if train:
        g.set("train_dir", train, f"the folder of training images{why_train}")
    else:
        g.ask("train_dir", "train", "the folder of the training images, relative to RAW_DIR")
    if test:
        shared = " (shared with train)" if test == train else ""
        g.set("test_dir", test, f"the folder of test images{why_test or shared}")
    else:
        g.ask("test_dir", "test", "the folder of the test images, relative to RAW_DIR")
    classes = s.nested.get(train, {})
    if train and not by_ids and len(classes) >= 2 and not s.direct.get(train):
        g.set("layout", "folders", f"{train}/ holds {len(classes)} class folders of images")
        if valid and len(s.nested.get(valid, {})) >= 2:
            g.set("valid_dir", valid, "a validation split in class folders, used instead of a random one")
    ext_count = Counter()
    for rel, exts in s.direct.items():
        if rel == train or rel.startswith(f"{train}/"):
            ext_count.update(exts)
    if ext_count:
        ext = ext_count.most_common(1)[0][0]
        g.set("image_ext", ext, f"{ext_count[ext]} training images end with it")
        s.image_sides = image_sides(s.raw_dir, train)


def _candidates(s: Survey, id_column: str, sample: str) -> tuple[str, list[str]]:
    """(the test CSV or "", the CSVs that may list the training images, likeliest first)."""
    names = [n for n in s.csvs if n != sample]
    test = _named(names, "test")
    candidates = [n for n in names if n != test and len(s.csvs[n].columns) >= 2]
    candidates.sort(key=lambda n: (not re.search(r"label|train", n, re.I), id_column not in s.csvs[n].columns))
    return test, candidates


def _labels_file(s: Survey, g: Guess, id_column: str, sample: str) -> pd.DataFrame:
    """labels_file and test_file of the csv layout; the labels CSV's head (empty for folders and names)."""
    test, candidates = _candidates(s, id_column, sample)
    if test and id_column in s.csvs[test].columns:
        g.set("test_file", test, f"it lists the test ids in {id_column!r}")
    elif g.fields.get("train_dir") and g.fields.get("train_dir") == g.fields.get("test_dir") and sample:
        g.set("test_file", sample, "train and test share a folder: the sample submission lists the test ids")
    if g.fields.get("layout") == "folders":
        return pd.DataFrame()
    if not candidates and g.fields.get("train_dir") != g.fields.get("test_dir") and kinds.names_layout(s, g):
        return pd.DataFrame()
    if not candidates:
        g.ask("labels_file", "", "the CSV that gives each training image's label (or set layout = \"folders\")")
        g.set("layout", "csv", "training images are listed by a labels CSV")
        return pd.DataFrame()
    g.set("layout", "csv", f"{candidates[0]} lists the training images")
    g.set("labels_file", candidates[0], "a CSV of training ids and labels")
    if len(candidates) > 1:
        g.notes.append(f"other CSVs not used: {', '.join(candidates[1:])}")
    return s.csvs[candidates[0]]


def _submission_kind(s: Survey, g: Guess, frame: pd.DataFrame, others: list[str], labels: pd.DataFrame) -> str:
    """label, probs or binary, from the sample submission's columns and values."""
    if len(others) > 1:
        g.set("submission", "probs", f"the sample submission has {len(others)} probability columns, one per class")
        return "probs"
    if not others:
        g.ask("submission", "label", "label (one class name column), probs (one column per class) or binary")
        return "label"
    col = others[0]
    values = pd.to_numeric(frame[col], errors="coerce")
    numeric = bool(len(values)) and values.notna().all() and values.between(0, 1).all()
    fractional = numeric and (values != values.round()).any()
    if fractional or (numeric and col not in labels.columns and col.lower() not in LABEL_NAMES):
        g.set("submission", "binary", f"{col!r} holds one probability (values in [0, 1]) for a two-class competition")
        g.set("submission_label_column", col, "the sample submission's prediction column")
        return "binary"
    g.set("submission_label_column", col, "the sample submission's prediction column")
    target = next((c for c in labels.columns if c.lower() == col.lower()), "")
    if numeric and target and labels[target].nunique() > 2:
        g.set("submission", "label", f"{target!r} holds {labels[target].nunique()} classes: one per image, "
                                     "not a two-class probability")
    elif numeric and target and set(labels[target].unique()) in ({"0", "1"}, {"0.0", "1.0"}):
        g.set("submission", "binary", f"{target!r} holds 0 and 1 and the sample a number in [0, 1]: the probability "
                                      "of 1, Kaggle's usual two-class submission (set \"label\" if the class itself "
                                      "is scored)")
        return "binary"
    elif numeric:
        g.ask("submission", "label", f"'label' if {col!r} takes the class, or 'binary' (and metric 'roc_auc') if the "
                                     "competition scores a probability of the positive class")
    else:
        g.set("submission", "label", f"{col!r} holds class names")
    return g.fields["submission"]


def _label_column(s: Survey, g: Guess, labels: pd.DataFrame, kind: str, others: list[str]) -> None:
    idc = g.fields.get("id_column", "")
    columns = [c for c in labels.columns if c != idc]
    if kind == "probs":
        fits = [c for c in columns if len(labels) and labels[c].isin(others).all()]
        why = "its values are the sample submission's class columns"
    else:
        fits = [c for c in columns if c in others or c.lower() in LABEL_NAMES]
        why = "its name says label"
        if kind == "binary":
            fits = [c for c in fits if labels[c].nunique() == 2] or [c for c in columns if labels[c].nunique() == 2]
            why = "it holds two values"
    if fits:
        g.set("label_column", fits[0], why)
    else:
        g.ask("label_column", "", f"the class column of {g.fields.get('labels_file')} (columns: {', '.join(columns)})")


def _paths(s: Survey, g: Guess, labels: pd.DataFrame, id_column: str) -> None:
    """path_column when the CSV names files (x.jpg, images/x.jpg) rather than ids."""
    if labels.empty:
        return
    for col in [id_column, *[c for c in labels.columns if c != id_column]]:
        values = labels[col].str.lower()
        if len(values) and values.str.endswith(IMAGE_EXTS).all():
            g.set("path_column", col, "its values are image file names or paths")
            return


def _positive(g: Guess, column: str, values: list[str]) -> None:
    """positive_label: the label (of the sorted ``values``) whose probability the binary column holds."""
    if {v.lower() for v in values} in ({"0", "1"}, {"false", "true"}):
        g.notes.append(f"positive class: the label {'1' if '1' in values else 'true'} (the default of positive_label)")
        return
    named = [v for v in values if v.lower() in column.lower()]
    if len(named) == 1:
        g.set("positive_label", named[0], f"the probability column {column!r} names it")
    else:
        g.ask("positive_label", values[-1] if values else "", f"the label (one of {values[:5]}) whose probability "
                                                              f"{column!r} holds")


def _size_and_recipe(s: Survey, g: Guess) -> None:
    """image_size, mean/std and a default recipe from the images' size."""
    side = max(s.image_sides) if s.image_sides else 0
    small = 0 < side <= 64
    if not side:
        g.ask("image_size", 224, "the side the model sees: 32 for small images, 224 for photos (no image was read)")
    else:
        g.set("image_size", 32 if small else 224, f"the images are about {side} px")
    if small:
        g.set("mean", [0.5, 0.5, 0.5], "scratch training: a neutral normalisation")
        g.set("std", [0.25, 0.25, 0.25], "scratch training: a neutral normalisation")
        g.recipe = {"model": "fastnet", "epochs": 10, "batch_size": 512, "lr": 0.4, "optimizer": "sgd",
                    "momentum": 0.85, "nesterov": True, "weight_decay": 5e-4, "schedule": "onecycle",
                    "label_smoothing": 0.2, "augment": "pad_crop_flip", "tta": "flip", "data_init": True}
        g.notes.append("recipe: fastnet from scratch (small images; the CIFAR-10 speed-run recipe)")
        if g.fields.get("metric") == "log_loss" or g.fields.get("task", "single") != "single":
            del g.recipe["label_smoothing"]  # smoothed targets cap the probabilities log loss scores
            g.notes.append("recipe: no label smoothing (it keeps probabilities from the confidence log loss "
                           "rewards, and applies to one class per image only)")
        return
    g.set("mean", list(IMAGENET_MEAN), "ImageNet's: the pretrained backbone saw these")
    g.set("std", list(IMAGENET_STD), "ImageNet's: the pretrained backbone saw these")
    # a logistic regression on the frozen features: it beat an SGD-trained mlp head on the dog data
    # (benchmarks/bench_quality.py) and is fitted in seconds
    g.recipe = {"model": "resnet34", "pretrained": True, "freeze_backbone": True, "head": "logreg",
                "epochs": 10, "batch_size": 128, "lr": 0.03, "optimizer": "sgd", "momentum": 0.9,
                "weight_decay": 1e-4, "schedule": "cosine", "augment": "resized_crop_flip_jitter"}
    g.recipes["scratch"] = {"model": "fastnet", "pretrained": False, "freeze_backbone": False, "image_size": 64,
                            "epochs": 15, "batch_size": 256, "lr": 0.2, "schedule": "onecycle",
                            "augment": "pad_crop_flip", "label_smoothing": 0.1}
    g.notes.append("recipe: ImageNet ResNet-34, frozen, a logistic-regression head on its features (needs the weights: "
                   "internet once, or --weights FILE); `--recipe scratch` trains a small net from scratch instead")


# ---------------------------------------------------------------- the command


@dataclass
class InitResult:
    """What `pipeline init` wrote and found."""

    path: Path
    guess: Guess
    check: str  # what a dry read of the download with the spec found, or why it failed


def slug_of(raw_dir: Path) -> str:
    """A slug from the download folder's name: lower-case letters, digits and dashes."""
    return re.sub(r"[^a-z0-9]+", "-", Path(raw_dir).resolve().name.lower()).strip("-") or "my-competition"


def init_spec(raw_dir: Path, out: Path, *, slug: str | None = None, force: bool = False,
              unpack: bool = False) -> InitResult:
    """Survey ``raw_dir``, write the spec file ``out`` and read the download with it once."""
    from datetime import date

    from pipeline.io import atomic_write_text
    from pipeline.download.specfile import render_spec

    out = Path(out)
    if out.exists() and not force:
        raise PipelineError(f"{out} already exists; pass --force to overwrite it or choose another name")
    if unpack:
        from pipeline.download.archives import unpack_all

        unpack_all(Path(raw_dir))
    proposal = guess(survey(raw_dir), slug or slug_of(raw_dir))
    header = [f"Competition spec written by `pipeline init {raw_dir}` on {date.today()}.",
              "Edit it freely; every command takes its path in place of a competition slug, e.g.",
              f"  pipeline reorg {out} {raw_dir} WORK_DIR",
              "Each value says why init chose it; 'TODO check' marks what it could not decide."]
    atomic_write_text(out, render_spec(proposal.fields, proposal.why, proposal.undecided, proposal.recipe,
                                       proposal.recipes, header))
    return InitResult(out, proposal, check_spec(out, Path(raw_dir)))


def check_spec(spec: Path, raw_dir: Path) -> str:
    """Read the download with the spec as reorg would, writing nothing: counts, or the first problem."""
    from pipeline.download.layout import read_download
    from pipeline.download.scan import scan_download
    from pipeline.download.specfile import load_spec

    try:
        comp = load_spec(spec)
        found = read_download(comp, raw_dir, scan_download(comp, raw_dir))
    except PipelineError as exc:
        return f"the spec does not read the download yet: {exc}"
    targets = {"single": "classes", "multilabel": "labels", "ordinal": "grades"}.get(comp.task)
    return (f"the spec reads the download: {len(found.train_paths)} training images, {len(found.test_paths)} "
            f"test images" + (f", {len(found.task.grades if comp.task == 'ordinal' else found.classes)} {targets}" if targets else ""))
