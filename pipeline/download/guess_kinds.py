"""`pipeline init`'s guesses beyond one class column: where the images are by their ids, labels in file
names, one-hot / multi-hot columns, tags, regression, ordinal grades, groups, metadata, rare classes.

Each function reads the survey of pipeline/download/spec_guess.py (CSV heads as strings) and sets spec
fields on its Guess with the reason; a function that cannot decide leaves the fields to the
single-label rules of spec_guess.py, which name what the user must set.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from typing import TYPE_CHECKING

import pandas as pd

from pipeline.competition import SPEED_RUN

if TYPE_CHECKING:  # spec_guess imports this module
    from pipeline.download.spec_guess import Guess, Survey

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # what init proposes for photos
LABEL_NAMES = ("label", "labels", "class", "target", "category", "breed", "species", "diagnosis", "y")
TAG_NAMES = ("tags", "tag", "attribute_ids", "attributes", "finding_labels")
# a name that says a grade (an ordered integer), a grouping (rows of one patient, one scene), a class id
GRADE_WORDS = ("diagnosis", "grade", "severity", "level", "rating", "score", "stage")
GROUP_WORDS = ("patient", "study", "subject", "scene", "source", "group", "individual", "case", "series",
               "user", "person", "participant", "donor", "session", "video", "owner", "specimen")
CLASS_NAMES = ("label", "labels", "class", "category", "species", "breed")
SEPARATORS = ("|", ";", ",", " ")  # tried in this order: "No Finding|Mass" holds a space inside a label
PROBE = 50  # ids tried against each image folder
NAMES_SEEN = 20000  # training file names read for a label pattern
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp")
MANY_VALUES = 20  # an integer column with more distinct values is a number, not classes or grades
RARE = 0.02  # a class or label under this share of the rows is noted
PROBABILITY_METRICS = ("log_loss", "roc_auc", "mean_auc")  # balancing the loss would skew what they score


def words(name: str) -> list[str]:
    """A column name's words, lower-case: "PatientID" and "patient_id" -> ["patient", "id"]."""
    return re.findall(r"[a-z]+|\d+", re.sub(r"([a-z])([A-Z])", r"\1 \2", name).lower())


def _says(name: str, vocabulary: tuple[str, ...]) -> str:
    """The first word of ``vocabulary`` that begins one of ``name``'s words ("" if none)."""
    found = words(name)
    return next((v for v in vocabulary if any(w.startswith(v) for w in found)), "")


def numbers(values: pd.Series) -> pd.Series | None:
    """The non-empty values as floats, or None when one of them is not a number (or none is left)."""
    values = values[values != ""]
    parsed = pd.to_numeric(values, errors="coerce")
    return parsed if len(parsed) and parsed.notna().all() else None


# ---------------------------------------------------------------- where the images are


def folder_of(s: Survey, values: list[str], named: str) -> tuple[str, str]:
    """(the image folder holding nearly all of ``values`` as ``<id><ext>`` or as a file name/path, why):
    ``named`` (the folder whose name says train or test) when it does, else the one holding the most;
    ("", "") when none does."""
    probe = [v for v in values[:PROBE] if v]
    if not probe:
        return "", ""
    roots = set(s.direct) | ({"."} | {r.split("/")[0] for r in s.direct} if any("/" in v for v in probe) else set())
    scores = []
    for rel in sorted(roots, key=lambda r: (r != named, r.count("/"), len(r), r)):
        base = s.raw_dir if rel == "." else s.raw_dir / rel
        exts = list(s.direct.get(rel, {}))
        hits = sum((base / v).is_file() or any((base / f"{v}{e}").is_file() for e in exts) for v in probe)
        if hits == len(probe) or (rel == named and hits >= 0.9 * len(probe)):
            return rel, f"it holds the images of the first {len(probe)} ids"
        scores.append((hits, rel))
    hits, rel = max(scores, key=lambda x: x[0], default=(0, ""))  # the first of the most, in the order above
    if hits < 0.9 * len(probe):
        return "", ""
    return rel, f"it holds the images of {hits} of the first {len(probe)} ids"


def locate(s: Survey, id_column: str, named: tuple[str, str], sample: str, test: str,
           candidates: list[str]) -> tuple[tuple[str, str], ...]:
    """((train folder, why), (test folder, why)) found from the ids that the likeliest labels CSV and
    the test listing (the test CSV, else the sample) name; ("", "") where no folder holds them.
    ``named``: the (train, test) folders by name, kept when they hold the ids. A column of image file
    names stands for the ids when the id column is absent."""
    def ids(name: str) -> list[str]:
        frame = s.csvs.get(name, pd.DataFrame())
        files = [c for c in frame.columns if len(frame) and frame[c].str.lower().str.endswith(IMAGE_EXTS).all()]
        column = id_column if id_column in frame.columns else (files[0] if files else "")
        return frame[column].tolist() if column else []

    listing = test if test and id_column in s.csvs[test].columns else sample
    train = folder_of(s, ids(candidates[0]), named[0]) if candidates else ("", "")
    return (train[0], f"{train[1]} of {candidates[0]}" if train[0] else ""), folder_of(s, ids(listing), named[1])


# ---------------------------------------------------------------- labels in the file names


def read_stems(s: Survey, folder: str, ext: str) -> list[str]:
    """The names, without ``ext``, of up to NAMES_SEEN files ending with it directly in ``folder``."""
    stems, n = [], len(ext)
    with os.scandir(s.raw_dir / folder) as entries:
        for entry in entries:
            if entry.name[-n:].lower() == ext.lower() and len(entry.name) > n and entry.is_file():
                stems.append(entry.name[:-n])
                if len(stems) >= NAMES_SEEN:
                    break
    return sorted(stems)


def name_labels(pattern: str, stems: list[str]) -> list[str] | None:
    """The label of each stem under ``pattern`` (re.fullmatch), or None when one does not match."""
    compiled, found = re.compile(pattern), []
    for stem in stems:
        match = compiled.fullmatch(stem)
        if not match:
            return None
        found.append(match.group("label"))
    return found


def propose_pattern(stems: list[str]) -> tuple[str, list[str]] | None:
    """(a label_pattern that matches every stem, the labels) or None: a label before or after a number,
    giving at least 2 labels, each on 2 images on average (a pattern capturing ids would fail that)."""
    trailing = {m.group(1) for m in (re.fullmatch(r".+([._ -])\d+", x) for x in stems) if m}
    leading = {m.group(1) for m in (re.fullmatch(r"\d+([._ -]).+", x) for x in stems) if m}
    candidates = ([r"(?P<label>.+)" + _one_of(trailing) + r"\d+"] if trailing else []) + \
                 ([r"\d+" + _one_of(leading) + r"(?P<label>.+)"] if leading else []) + [r"(?P<label>[^._ -]+)[._ -].*"]
    for pattern in candidates:
        labels = name_labels(pattern, stems)
        if labels is not None and 2 <= len(set(labels)) <= len(labels) / 2:
            return pattern, labels
    return None


def _one_of(separators: set[str]) -> str:
    """A regex matching any of these separator characters ("-" last in a class: a literal)."""
    if len(separators) == 1:
        return re.escape(next(iter(separators)))
    return "[" + "".join(sorted(separators, key="._ -".index)) + "]"


def names_layout(s: Survey, g: Guess) -> bool:
    """layout "names" with a label_pattern when no labels CSV exists and the training names carry labels."""
    train, ext = g.fields.get("train_dir", ""), g.fields.get("image_ext", "")
    if not train or not ext or "train_dir" in g.undecided or not (s.raw_dir / train).is_dir():
        return False
    stems = read_stems(s, train, ext)
    found = propose_pattern(stems)
    if found is None:
        return False
    pattern, labels = found
    s.train_stems = stems
    counts = Counter(labels)
    shown = ", ".join(f"{label!r}" for label, _ in counts.most_common(3)) + (", ..." if len(counts) > 3 else "")
    g.set("layout", "names", f"no labels CSV; the names of {train}/ carry the label (e.g. {stems[0]}{ext})")
    g.set("label_pattern", pattern, f"matched on the name without {ext}: all {len(stems)} training names seen "
                                    f"match it, giving {len(counts)} labels ({shown})")
    return True


# ---------------------------------------------------------------- the target's kind


def target(g: Guess, labels: pd.DataFrame, sample: pd.DataFrame, others: list[str]) -> bool:
    """task, the target column(s), submission and metric for one-hot / multi-hot columns, tags, a number
    or a grade; False leaves the target to the single-label rules (one class column)."""
    if labels.empty or not others:
        return False
    labels = labels.drop(columns=[g.fields.get("id_column", "")], errors="ignore")
    return _hot_columns(g, labels, others) or _tags(g, labels, others) or _number(g, labels, sample, others)


def _hot_columns(g: Guess, labels: pd.DataFrame, others: list[str]) -> bool:
    """The sample's class columns are 0/1 columns of the labels CSV: one-hot (single) or multi-hot."""
    if len(others) < 2 or not set(others) <= set(labels.columns):
        return False
    hot = labels[others].apply(pd.to_numeric, errors="coerce")
    if not hot.isin([0, 1]).all().all():
        return False
    sums, where = hot.sum(axis=1), g.fields.get("labels_file")
    g.set("label_columns", list(others), f"the sample submission's {len(others)} columns are 0/1 columns of {where}")
    if (sums == 1).all():
        g.set("task", "single", "every row has exactly one 1 among them (one-hot)")
        g.set("metric", "log_loss", "the usual metric of one probability per class: check the Evaluation page")
    else:
        g.set("task", "multilabel", f"{int((sums != 1).sum())} of {len(sums)} rows have none or several 1s (multi-hot)")
        g.set("metric", "mean_auc", "the usual metric of one probability per label (mean column-wise ROC AUC): "
                                    "check the Evaluation page")
    g.set("submission", "probs", "one probability column per class in the sample submission")
    return True


def tag_split(values: pd.Series, sep: str) -> list[frozenset[str]] | None:
    """Each row's label set when ``sep`` makes ``values`` tags, else None.

    Tags: some rows hold several labels and the label sets outnumber the labels (the labels recombine
    across rows; a class name with a space, "golden retriever", keeps its words together).
    """
    sets = [frozenset(t for t in v.split(sep) if t) for v in values]
    tokens = set().union(*sets) if sets else set()
    several = sum(len(x) > 1 for x in sets)
    return sets if several and len(set(sets)) > len(tokens) else None


def _tag_column(labels: pd.DataFrame, sample_column: str) -> tuple[str, str, list[frozenset[str]]] | None:
    """(column, separator, label sets) of a tags column: the sample's column, else one named like labels."""
    named = [c for c in labels.columns if "_".join(words(c)) in LABEL_NAMES + TAG_NAMES]
    for col in dict.fromkeys(([sample_column] if sample_column in labels.columns else []) + named):
        for sep in SEPARATORS:
            sets = tag_split(labels[col], sep)
            numeric_only = sets and all(re.fullmatch(r"[\d.]+", t) for x in sets for t in x)
            if sets and not (numeric_only and col not in named):
                return col, sep, sets  # a list of numbers is a mask or a box, unless its name says labels
    return None


def _tags(g: Guess, labels: pd.DataFrame, others: list[str]) -> bool:
    """A column of separated labels: task multilabel, submitted as tags (one column) or probs (one per label)."""
    found = _tag_column(labels, others[0] if len(others) == 1 else "")
    if found is None:
        return False
    col, sep, sets = found
    tokens = set().union(*sets)
    if len(others) > 1 and not tokens <= set(others):
        return False
    shown = " ".join(sorted(tokens)[:4])
    g.set("task", "multilabel", f"{col!r} holds sets of labels ({len(tokens)} labels in {len(set(sets))} "
                                f"combinations): tags, not one class per combination")
    g.set("label_column", col, f"its values are labels separated by {sep!r} ({shown} ...)")
    g.set("label_separator", sep, f"it splits {col!r} into labels that recur across rows")
    if len(others) > 1:
        g.set("submission", "probs", "the sample submission has one probability column per label")
        g.set("metric", "mean_auc", "the usual metric of one probability per label: check the Evaluation page")
        return True
    g.set("submission", "tags", f"the sample submission's {others[0]!r} is one column of labels")
    g.set("submission_label_column", others[0], "the sample submission's prediction column")
    g.set("metric", "f_beta_samples", "the usual metric of tags (F-beta per image, averaged): check the "
                                      "Evaluation page")
    g.set("beta", 1.0, "F1; check the competition's Evaluation page for the beta (F2: set 2.0)")
    return True


def _number(g: Guess, labels: pd.DataFrame, sample: pd.DataFrame, others: list[str]) -> bool:
    """A numeric target with a numeric sample column: regression, or ordinal for a few named grades."""
    if len(others) != 1 or numbers(sample[others[0]]) is None:
        return False
    col = next((c for c in labels.columns if c.lower() == others[0].lower()), "") or next(
        (c for c in labels.columns if c.lower() in LABEL_NAMES or _says(c, GRADE_WORDS)), "")
    values = numbers(labels[col]) if col else None
    if values is None or values.nunique() <= 2 or len(values) < len(labels):
        return False  # not a number everywhere, or two values: the classification rules decide
    distinct, whole = sorted(values.unique()), bool((values == values.round()).all())
    contiguous = whole and distinct[-1] - distinct[0] + 1 == len(distinct)
    sample_whole = bool((numbers(sample[others[0]]) % 1 == 0).all())
    if contiguous and len(distinct) <= 10 and _says(col, GRADE_WORDS) and sample_whole:
        grades = f"{int(distinct[0])}..{int(distinct[-1])}"
        g.set("task", "ordinal", f"{col!r} holds the integer grades {grades} and its name says a grade")
        g.set("submission", "grade", f"the sample submission's {others[0]!r} holds integers")
        g.set("metric", "qwk", "the usual metric of grades (quadratic weighted kappa): check the Evaluation page")
    elif not whole or (len(distinct) > MANY_VALUES and not _class_id(col)):
        shape = "non-integer numbers" if not whole else f"{len(distinct)} distinct integers"
        g.set("task", "regression", f"{col!r} holds {shape} and the sample submission a number: a value per image")
        g.set("submission", "value", f"the sample submission's {others[0]!r} is one number per image")
        g.set("metric", "rmse", "the usual metric of a number (rmse; mae if the Evaluation page says so)")
    else:
        return False
    g.set("label_column", col, "the target column: " + ("the sample's column" if col == others[0] else "its name"))
    g.set("submission_label_column", others[0], "the sample submission's prediction column")
    return True


def _class_id(column: str) -> bool:
    """Whether the column's name says a class or an id (integer codes of classes, not a quantity)."""
    found = words(column)
    return bool(found) and (found[-1] in ("id", "ids", "code") or any(w in CLASS_NAMES for w in found))


# ---------------------------------------------------------------- groups and metadata


def group_column(g: Guess, labels: pd.DataFrame, taken: set[str]) -> None:
    """group_column: a column whose values repeat across rows and whose name says a grouping
    (patient, study, scene, ...), else one named ``*_id`` that repeats; never the id, target or path."""
    candidates = []
    for col in labels.columns:
        values = labels[col][labels[col] != ""]
        counts = values.value_counts()
        if (col in taken or len(counts) < max(3, len(labels) / 100) or counts.iloc[0] < 2
                or len(values) < len(labels) / 2):
            continue  # a group repeats, and there are many (a 0/1 flag named "Group" is no grouping)
        word = _says(col, GROUP_WORDS)
        if word:
            candidates.append((GROUP_WORDS.index(word), col, f"its name says {word}"))
        elif words(col)[-1:] in (["id"], ["uid"]):
            candidates.append((len(GROUP_WORDS), col, "its name says an id"))
    if candidates:
        _, col, why = min(candidates)
        n = labels[col].nunique()
        g.set("group_column", col, f"{why} and its {n} values repeat over {len(labels)} rows: a group never spans "
                                   "train and valid")


def metadata(g: Guess, labels: pd.DataFrame, test: pd.DataFrame, taken: set[str]) -> None:
    """metadata: the labels CSV's numeric and categorical columns that the test CSV has too."""
    chosen, skipped = [], []
    for col in labels.columns:
        if col in taken or col not in test.columns:
            continue
        values = labels[col][labels[col] != ""]
        kind = _feature_kind(values, len(labels))
        (chosen if kind else skipped).append(col)
    if chosen:
        what = ", ".join(chosen[:6]) + (" ..." if len(chosen) > 6 else "")
        note = f"; not {', '.join(skipped[:3])} (free text, ids or one value)" if skipped else ""
        g.set("metadata", chosen, f"numeric or categorical columns of both {g.fields.get('labels_file')} and "
                                  f"{g.fields.get('test_file')} ({what}){note}")


def _feature_kind(values: pd.Series, rows: int) -> str:
    """"numeric", "categorical" or "" (constant, mostly empty, free text or an id: one value per row)."""
    distinct = values.nunique()
    if distinct < 2 or len(values) < rows / 2 or values.str.lower().str.endswith((".png", ".jpg", ".jpeg")).any():
        return ""
    parsed = numbers(values)
    if parsed is not None:
        counter = bool((parsed % 1 == 0).all()) and distinct == len(values) and len(values) > 10
        return "" if counter else "numeric"
    return "categorical" if distinct <= max(20, 0.05 * rows) and distinct <= 0.5 * len(values) else ""


# ---------------------------------------------------------------- rare classes


def rare_note(g: Guess, counts: Counter, rows: int, truncated: bool) -> None:
    """A note naming the classes or labels under 2% of the rows (for many classes: under half the even share)."""
    if not counts or not rows:
        return
    multilabel = g.fields.get("task") == "multilabel"
    share = RARE if multilabel else min(RARE, 0.5 / len(counts))
    rare = sorted((n, c) for c, n in counts.items() if n < share * rows)
    if not rare:
        return
    kind = "labels" if multilabel else "classes"
    shown = ", ".join(f"{c!r} ({n}, {100 * n / rows:.1f}%)" for n, c in rare[:5]) + (" ..." if len(rare) > 5 else "")
    seen = f"the first {rows} rows" if truncated else f"the {rows} rows"
    metric = g.fields.get("metric", "")
    advice = (f"`--balance loss` would weigh them but skews the probabilities that {metric} scores: off by default"
              if metric in PROBABILITY_METRICS else "`pipeline train --balance loss` weighs them in the loss")
    g.notes.append(f"rare {kind}: {len(rare)} under {100 * share:.2g}% of {seen}: {shown}; {advice}")


def target_counts(s: Survey, g: Guess, labels: pd.DataFrame) -> tuple[Counter, int]:
    """(rows per class or label, rows) of the training targets init saw; empty for numbers."""
    task, col = g.fields.get("task", "single"), g.fields.get("label_column", "")
    if task == "regression":
        return Counter(), 0
    if g.fields.get("label_columns"):
        hot = labels[g.fields["label_columns"]].apply(pd.to_numeric, errors="coerce")
        return Counter({c: int(hot[c].sum()) for c in hot.columns}), len(labels)
    if col and col in labels.columns:
        sep = g.fields.get("label_separator", "")
        rows = [[t for t in v.split(sep) if t] for v in labels[col]] if sep else [[v] for v in labels[col]]
        return Counter(t for r in rows for t in r), len(labels)
    if g.fields.get("layout") == "names":
        found = name_labels(g.fields["label_pattern"], s.train_stems) or []
        return Counter(found), len(found)
    if g.fields.get("layout") == "folders":
        counts = Counter(s.nested.get(g.fields.get("train_dir", ""), {}))
        return counts, sum(counts.values())
    return Counter(), 0


def size_and_recipe(s: Survey, g: Guess) -> None:
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
        g.recipe = dict(SPEED_RUN)
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
