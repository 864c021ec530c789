"""Every task kind end to end on CIFAR-10 images: the pipeline's CV beside a constant baseline and a pixel reference.

    python benchmarks/bench_kinds.py [--images 1500] [--test-images 300] [--epochs E] [--kinds names,tags,...]
                                     [--folds 3] [--device cpu] [--out DIR] [other `pipeline train` options]

For each kind, builds a Kaggle-shaped download from ../shared/data/cifar-10-jpeg (the same --images training
images, drawn once with a fixed seed, and --test-images of CIFAR's test images), relabelled so the target follows
from the CIFAR class (see KINDS), then runs the chain through the CLI in subprocesses: `pipeline init RAW --out
SPEC`, reorg --folds K, train --folds K with the recipe init wrote (--epochs E caps it, when given), predict,
check; options this script does not know go to `pipeline train` (e.g. --model fastnet_s: not init's recipe).
Where init reads the download as something else than the kind built (another task, target columns,
layout, group or metadata), the spec is written from the fields below with init's [recipe] and the line says so;
the metric (and beta) come from the "Evaluation page", i.e. are set here, as a user would.

Per kind it prints: the CV (cv.json's 'cv': out of fold, with thresholds scored nested where the metric needs a
decision), the trivial baseline (a constant prediction fitted on the training folds: class or label priors, the
training mean, the most common grade) and a simple reference (logistic / ridge regression on 16x16 pixels, plus
the metadata columns where the kind has them), both scored out of fold on the run's own folds.csv with
scikit-learn; then the seconds of each stage. Skips when ../shared/data is absent.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import tomllib
from PIL import Image
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
if not SHARED.is_dir():
    SHARED = Path("/work/shared")
CIFAR = SHARED / "data" / "cifar-10-jpeg"

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# multi-hot / tags: coarse properties of each class (every class has at least one)
PROPERTIES = {"animal": {"bird", "cat", "deer", "dog", "frog", "horse"},
              "four_legs": {"cat", "deer", "dog", "horse"},
              "flies": {"airplane", "bird"},
              "wheels": {"automobile", "truck"},
              "water": {"ship", "frog"},
              "pet": {"cat", "dog"}}
# regression: a class-dependent value (a rough "size"), plus brightness, a metadata flag and noise
SIZE = {"frog": 10, "bird": 15, "cat": 25, "dog": 30, "deer": 45, "horse": 55, "automobile": 60, "truck": 75,
        "airplane": 85, "ship": 90}
GRADE = {"frog": 0, "bird": 0, "cat": 1, "dog": 1, "deer": 2, "horse": 2, "automobile": 3, "truck": 3,
         "airplane": 4, "ship": 4}  # ordinal: the size ranked into 5 grades
POSITIVE = {"cat", "dog"}  # binary with patients: is it a pet (20% of the rows)
BASE = {"image_ext": ".jpg"}


@dataclass
class Sample:
    """The CIFAR images a download is built from: ids, classes, source files; test files."""

    ids: list[str]
    classes: list[str]
    files: list[Path]
    test_files: list[Path]
    rng_seed: int = 0


@dataclass
class Built:
    """A download: the spec fields that read it (the kind as built), and the truth per training id."""

    fields: dict
    truth: pd.DataFrame  # id + the target(s) as numbers: class index, 0/1 per label, value, grade
    meta: np.ndarray | None = None  # (N, M) numeric metadata the reference sees, rows as truth
    notes: list[str] = field(default_factory=list)


def draw(n_train: int, n_test: int, seed: int = 0) -> Sample:
    labels = pd.read_csv(CIFAR / "trainLabels.csv", dtype={"id": str})
    rng = np.random.default_rng(seed)
    rows = labels.iloc[np.sort(rng.choice(len(labels), n_train, replace=False))]
    tests = sorted(CIFAR.glob("test/*.jpg"), key=lambda p: int(p.stem))
    chosen = [tests[i] for i in np.sort(rng.choice(len(tests), n_test, replace=False))]
    return Sample(list(rows["id"]), list(rows["label"]), [CIFAR / "train" / f"{i}.jpg" for i in rows["id"]], chosen)


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def _test(raw: Path, s: Sample, folder: str, prefix: str) -> list[str]:
    ids = [f"{prefix}{k}" for k in range(len(s.test_files))]
    for image_id, src in zip(ids, s.test_files):
        _copy(src, raw / folder / f"{image_id}.jpg")
    return ids


def build_names(raw: Path, s: Sample) -> Built:
    """dogs-vs-cats: train/<label>.<n>.jpg, test/<n>.jpg, sample_submission id,label; accuracy."""
    stems = [f"{c}.{k}" for k, c in enumerate(s.classes)]
    for stem, src in zip(stems, s.files):
        _copy(src, raw / "train" / f"{stem}.jpg")
    test_ids = _test(raw, s, "test", "")
    pd.DataFrame({"id": test_ids, "label": CLASSES[0]}).to_csv(raw / "sample_submission.csv", index=False)
    truth = pd.DataFrame({"id": stems, "y": [CLASSES.index(c) for c in s.classes]})
    return Built({**BASE, "task": "single", "layout": "names", "label_pattern": r"(?P<label>[a-z]+)\.\d+",
                  "id_column": "id", "train_dir": "train", "test_dir": "test",
                  "sample_submission": "sample_submission.csv", "submission": "label", "metric": "accuracy"}, truth)


def build_onehot(raw: Path, s: Sample) -> Built:
    """plant-pathology-like: images/train, images/test, train.csv image_id + one 0/1 column per class; log loss."""
    ids = [f"Train_{k}" for k in range(len(s.ids))]
    for image_id, src in zip(ids, s.files):
        _copy(src, raw / "images" / "train" / f"{image_id}.jpg")
    test_ids = _test(raw, s, "images/test", "Test_")
    train = pd.DataFrame({"image_id": ids, **{c: [int(x == c) for x in s.classes] for c in CLASSES}})
    train.to_csv(raw / "train.csv", index=False)
    pd.DataFrame({"image_id": test_ids}).to_csv(raw / "test.csv", index=False)
    pd.DataFrame({"image_id": test_ids, **{c: 0.1 for c in CLASSES}}).to_csv(raw / "sample_submission.csv",
                                                                              index=False)
    truth = pd.DataFrame({"id": ids, "y": [CLASSES.index(c) for c in s.classes]})
    return Built({**BASE, "task": "single", "layout": "csv", "labels_file": "train.csv",
                  "label_columns": list(CLASSES), "id_column": "image_id", "train_dir": "images/train",
                  "test_dir": "images/test", "test_file": "test.csv", "sample_submission": "sample_submission.csv",
                  "submission": "probs", "metric": "log_loss"}, truth)


def _label_sets(s: Sample) -> np.ndarray:
    return np.array([[int(c in members) for members in PROPERTIES.values()] for c in s.classes])  # (N, L)


def build_multihot(raw: Path, s: Sample) -> Built:
    """One 0/1 column per property, one probability column per label in the sample; mean column AUC."""
    ids = [f"img_{k}" for k in range(len(s.ids))]
    for image_id, src in zip(ids, s.files):
        _copy(src, raw / "train" / f"{image_id}.jpg")
    test_ids = _test(raw, s, "test", "tst_")
    hot = _label_sets(s)
    names = list(PROPERTIES)
    pd.DataFrame({"id": ids, **{n: hot[:, k] for k, n in enumerate(names)}}).to_csv(raw / "train.csv", index=False)
    pd.DataFrame({"id": test_ids, **{n: 0.5 for n in names}}).to_csv(raw / "sample_submission.csv", index=False)
    truth = pd.DataFrame({"id": ids, **{n: hot[:, k] for k, n in enumerate(names)}})
    return Built({**BASE, "task": "multilabel", "layout": "csv", "labels_file": "train.csv", "label_columns": names,
                  "id_column": "id", "train_dir": "train", "test_dir": "test",
                  "sample_submission": "sample_submission.csv", "submission": "probs", "metric": "mean_auc"}, truth)


def build_tags(raw: Path, s: Sample) -> Built:
    """planet-like: train-jpg/, test-jpg/, train_v2.csv image_name,tags (space-separated); F2 on the sets."""
    ids = [f"train_{k}" for k in range(len(s.ids))]
    for image_id, src in zip(ids, s.files):
        _copy(src, raw / "train-jpg" / f"{image_id}.jpg")
    test_ids = _test(raw, s, "test-jpg", "test_")
    hot, names = _label_sets(s), list(PROPERTIES)
    tags = [" ".join(n for n, v in zip(names, row) if v) for row in hot]
    pd.DataFrame({"image_name": ids, "tags": tags}).to_csv(raw / "train_v2.csv", index=False)
    pd.DataFrame({"image_name": test_ids, "tags": "animal pet"}).to_csv(raw / "sample_submission_v2.csv",
                                                                       index=False)
    truth = pd.DataFrame({"id": ids, **{n: hot[:, k] for k, n in enumerate(names)}})
    return Built({**BASE, "task": "multilabel", "layout": "csv", "labels_file": "train_v2.csv",
                  "label_column": "tags", "label_separator": " ", "id_column": "image_name",
                  "train_dir": "train-jpg", "test_dir": "test-jpg", "sample_submission": "sample_submission_v2.csv",
                  "submission": "tags", "metric": "f_beta_samples", "beta": 2.0}, truth)


def _brightness(files: list[Path]) -> np.ndarray:
    return np.array([np.asarray(Image.open(f).convert("L"), dtype=np.float64).mean() / 255 for f in files])


def build_regression(raw: Path, s: Sample) -> Built:
    """petfinder-like: train/, test/, train.csv Id + Flag (0/1, +8) + Region (noise) + Score 1..100; RMSE."""
    rng = np.random.default_rng(1)
    n, ids = len(s.ids), [f"pet{k:05d}" for k in range(len(s.ids))]
    for image_id, src in zip(ids, s.files):
        _copy(src, raw / "train" / f"{image_id}.jpg")
    test_ids = _test(raw, s, "test", "q")
    flag, region = rng.integers(0, 2, n), rng.choice(["north", "south", "east"], n)
    value = (np.array([SIZE[c] for c in s.classes]) + 20 * (_brightness(s.files) - 0.5) + 8 * flag
             + rng.normal(0, 5, n))
    score = np.clip(np.round(value), 1, 100).astype(int)
    pd.DataFrame({"Id": ids, "Flag": flag, "Region": region, "Score": score}).to_csv(raw / "train.csv", index=False)
    m = len(test_ids)
    pd.DataFrame({"Id": test_ids, "Flag": rng.integers(0, 2, m), "Region": rng.choice(["north", "south", "east"], m)}
                 ).to_csv(raw / "test.csv", index=False)
    pd.DataFrame({"Id": test_ids, "Score": 50.0}).to_csv(raw / "sample_submission.csv", index=False)
    meta = np.column_stack([flag, *(region == r for r in ("north", "south", "east"))]).astype(np.float64)
    return Built({**BASE, "task": "regression", "layout": "csv", "labels_file": "train.csv", "label_column": "Score",
                  "metadata": ["Flag", "Region"], "id_column": "Id", "train_dir": "train", "test_dir": "test",
                  "test_file": "test.csv", "sample_submission": "sample_submission.csv", "submission": "value",
                  "metric": "rmse"}, pd.DataFrame({"id": ids, "y": score.astype(float)}), meta)


def build_ordinal(raw: Path, s: Sample) -> Built:
    """aptos-like: train_images/, test_images/, train.csv id_code,diagnosis (0-4 by size); QWK."""
    ids = [f"{k:08x}" for k in range(len(s.ids))]
    for image_id, src in zip(ids, s.files):
        _copy(src, raw / "train_images" / f"{image_id}.jpg")
    test_ids = [f"t{k:07x}" for k in range(len(s.test_files))]
    for image_id, src in zip(test_ids, s.test_files):
        _copy(src, raw / "test_images" / f"{image_id}.jpg")
    grade = np.array([GRADE[c] for c in s.classes])
    pd.DataFrame({"id_code": ids, "diagnosis": grade}).to_csv(raw / "train.csv", index=False)
    pd.DataFrame({"id_code": test_ids}).to_csv(raw / "test.csv", index=False)
    pd.DataFrame({"id_code": test_ids, "diagnosis": 0}).to_csv(raw / "sample_submission.csv", index=False)
    return Built({**BASE, "task": "ordinal", "layout": "csv", "labels_file": "train.csv", "label_column": "diagnosis",
                  "id_column": "id_code", "train_dir": "train_images", "test_dir": "test_images",
                  "test_file": "test.csv", "sample_submission": "sample_submission.csv", "submission": "grade",
                  "metric": "qwk"}, pd.DataFrame({"id": ids, "y": grade}))


def build_patients(raw: Path, s: Sample) -> Built:
    """siim-isic-like: 'patients' of 1-6 images of one class (one label); target = a pet; sex, age; ROC AUC."""
    rng = np.random.default_rng(2)
    order = np.argsort(np.array(s.classes), kind="stable")
    patient = np.empty(len(order), dtype=object)
    k, p = 0, 0
    while k < len(order):
        size = int(rng.integers(1, 7))
        same = [i for i in order[k:k + size] if s.classes[i] == s.classes[order[k]]]
        patient[same] = f"IP_{p:05d}"
        k, p = k + len(same), p + 1
    ids = [f"ISIC_{k:07d}" for k in range(len(s.ids))]
    for image_id, src in zip(ids, s.files):
        _copy(src, raw / "train" / f"{image_id}.jpg")
    test_ids = _test(raw, s, "test", "ISIC_9")
    target = np.array([int(c in POSITIVE) for c in s.classes])
    n, m = len(ids), len(test_ids)
    sex, age = rng.choice(["male", "female"], n), 5 * rng.integers(4, 17, n)
    pd.DataFrame({"image_name": ids, "patient_id": patient, "sex": sex, "age_approx": age, "target": target}
                 ).to_csv(raw / "train.csv", index=False)
    pd.DataFrame({"image_name": test_ids, "patient_id": [f"IP_9{j:04d}" for j in range(m)],
                  "sex": rng.choice(["male", "female"], m), "age_approx": 5 * rng.integers(4, 17, m)}
                 ).to_csv(raw / "test.csv", index=False)
    pd.DataFrame({"image_name": test_ids, "target": 0.0}).to_csv(raw / "sample_submission.csv", index=False)
    meta = np.column_stack([sex == "male", (age - 50) / 20]).astype(np.float64)
    return Built({**BASE, "task": "single", "layout": "csv", "labels_file": "train.csv", "label_column": "target",
                  "group_column": "patient_id", "metadata": ["sex", "age_approx"], "id_column": "image_name",
                  "train_dir": "train", "test_dir": "test", "test_file": "test.csv",
                  "sample_submission": "sample_submission.csv", "submission": "binary", "metric": "roc_auc"},
                 pd.DataFrame({"id": ids, "y": target}), meta)


KINDS = {"names": build_names, "onehot": build_onehot, "multihot": build_multihot, "tags": build_tags,
         "regression": build_regression, "ordinal": build_ordinal, "patients": build_patients}

# ---------------------------------------------------------------- the spec: init's, or the fields above

# what decides how the download is read: init must agree with the construction on these
KIND_FIELDS = ("task", "layout", "labels_file", "label_column", "label_columns", "label_separator", "id_column",
               "group_column", "metadata", "train_dir", "test_dir", "submission")
EVALUATION_PAGE = ("metric", "beta")  # what no download tells: set here, as a user reading Kaggle's page would
ASKED = ("submission",)  # ... and what it decides where init says it could not (0/1 targets: class or probability)


def _norm(name: str, value):
    if name == "task":
        return value or "single"
    if name in ("label_columns", "metadata"):
        return sorted(value or [])
    if name == "label_separator":
        return (value or "").strip() or " "
    return value or ""


def write_spec(raw: Path, spec: Path, built: Built, log: Path) -> tuple[str, float]:
    """SPEC from `pipeline init` when it reads the download as built, else from the built fields with init's
    recipe; what happened, and init's seconds.

    What a user sets from the competition's Evaluation page is set here in init's spec: the metric and beta,
    and the submission kind where init marked it 'TODO check' (a 0/1 target: the class or its probability).
    """
    start = time.perf_counter()
    ok = _cli(["init", str(raw), "--out", str(spec)], log, check=False)
    seconds = time.perf_counter() - start
    text = spec.read_text(encoding="utf-8") if spec.is_file() else ""
    table = tomllib.loads(text) if text else {}
    undecided = set(re.findall(r"^# TODO check:.*\n(?:#\s*)?(\w+) =", text, re.MULTILINE))
    by_hand = [n for n in EVALUATION_PAGE + tuple(undecided & set(ASKED)) if n in built.fields
               and _norm(n, table.get(n)) != _norm(n, built.fields[n])]
    if not ok:
        why = f"init failed ({_last_line(log)})"
    else:
        differs = [n for n in KIND_FIELDS if n not in by_hand
                   and _norm(n, table.get(n)) != _norm(n, built.fields.get(n))]
        why = "init read it as " + ", ".join(f"{n}={table.get(n)!r}" for n in differs) if differs else ""
    if not why:
        for name in by_hand:
            text = _set_field(text, name, built.fields[name])
        spec.write_text(text, encoding="utf-8")
        asked = sorted(set(by_hand) & undecided)
        return "init" + (f" ({', '.join(asked)} set by hand: init marked it TODO)" if asked else ""), seconds
    from pipeline.download.specfile import toml_value

    fields = {"slug": raw.name, "title": raw.name, "image_size": table.get("image_size", 32),
              "mean": table.get("mean", [0.5] * 3), "std": table.get("std", [0.25] * 3), **built.fields}
    recipe = table.get("recipe") or FALLBACK_RECIPE
    lines = [f"{k} = {toml_value(v)}" for k, v in fields.items()]
    lines += ["", "[recipe]"] + [f"{k} = {toml_value(v)}" for k, v in recipe.items()]
    spec.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return f"fields ({why}; recipe {'init' if table.get('recipe') else 'fallback'})", seconds


# init's small-image recipe (pipeline/download/spec_guess.py), used only when init wrote no spec at all
FALLBACK_RECIPE = {"model": "fastnet", "epochs": 10, "batch_size": 512, "lr": 0.4, "optimizer": "sgd",
                   "momentum": 0.85, "nesterov": True, "weight_decay": 5e-4, "schedule": "onecycle",
                   "label_smoothing": 0.2, "augment": "pad_crop_flip", "tta": "flip", "data_init": True}


def _set_field(text: str, name: str, value) -> str:
    from pipeline.download.specfile import toml_value

    line = f"{name} = {toml_value(value)}  # set from the competition's Evaluation page (bench_kinds)"
    pattern = re.compile(rf"^#? ?{name} = .*$", re.MULTILINE)
    if pattern.search(text):
        return pattern.sub(lambda _: line, text, count=1)
    head, sep, tail = text.partition("\n[")
    return f"{head}\n{line}\n{sep}{tail}" if sep else f"{text}\n{line}\n"


# ---------------------------------------------------------------- the chain

def _cli(args: list[str], log: Path, check: bool = True) -> bool:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(":")}
    with log.open("a", encoding="utf-8") as out:
        out.write(f"\n$ pipeline {' '.join(args)}\n")
        out.flush()
        done = subprocess.run([sys.executable, "-m", "pipeline", *args], env=env, stdout=out, stderr=out,
                              check=False)
    if check and done.returncode:
        raise RuntimeError(f"pipeline {args[0]} failed ({_last_line(log)}); see {log}")
    return done.returncode == 0


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no output"


def run_chain(spec: Path, raw: Path, tmp: Path, args, log: Path) -> dict[str, float]:
    work, run, sub = tmp / "work", tmp / "run", tmp / "submission.csv"
    times = {}
    for name, cmd in (("reorg", ["reorg", str(spec), str(raw), str(work), "--folds", str(args.folds)]),
                      ("train", ["train", str(spec), str(work), str(run), "--folds", str(args.folds), "--device",
                                 args.device, *(["--epochs", str(args.epochs)] if args.epochs else []),
                                 *args.train_options]),
                      ("predict", ["predict", str(spec), str(work), str(run), str(sub), "--device", args.device]),
                      ("check", ["check", str(spec), str(sub), "--work-dir", str(work)])):
        start = time.perf_counter()
        _cli(cmd, log)
        times[name] = time.perf_counter() - start
    return times


# ---------------------------------------------------------------- baseline and reference, out of fold

PIXELS = 16  # the reference's images: PIXELS x PIXELS x RGB
GRID = np.round(np.arange(0.05, 0.951, 0.05), 2)
HIGHER = {"accuracy": True, "log_loss": False, "roc_auc": True, "mean_auc": True, "f_beta_samples": True,
          "rmse": False, "qwk": True}


def pixels(files: list[Path], side: int = PIXELS) -> np.ndarray:
    """(N, side*side*3) pixels in 0-1, each image box-downsampled."""
    return np.stack([np.asarray(Image.open(f).convert("RGB").resize((side, side), Image.BOX), dtype=np.float64)
                     .reshape(-1) / 255 for f in files])


def _fscore(y: np.ndarray, decided: np.ndarray, beta: float) -> float:
    from sklearn.metrics import fbeta_score

    return float(fbeta_score(y, decided, beta=beta, average="samples", zero_division=0))


def score(metric: str, y: np.ndarray, pred: np.ndarray, beta: float = 1.0) -> float:
    """The metric of out-of-fold predictions (probabilities, label sets, numbers or grades) with scikit-learn."""
    from sklearn import metrics as m

    if metric == "accuracy":
        return float(m.accuracy_score(y, pred.argmax(axis=1)))
    if metric == "log_loss":
        return float(m.log_loss(y, pred, labels=list(range(pred.shape[1]))))
    if metric == "roc_auc":
        return float(m.roc_auc_score(y, pred))
    if metric == "mean_auc":
        return float(np.mean([m.roc_auc_score(y[:, k], pred[:, k]) for k in range(y.shape[1])]))
    if metric == "f_beta_samples":
        return _fscore(y, pred, beta)
    if metric == "rmse":
        return float(np.sqrt(m.mean_squared_error(y, pred)))
    return float(m.cohen_kappa_score(y, pred, weights="quadratic"))


def baseline(metric: str, y: np.ndarray, folds: np.ndarray, beta: float) -> np.ndarray:
    """A constant per fold, fitted on the other folds: priors, the best constant label set, the mean, the mode."""
    out = np.zeros((len(y), y.shape[1])) if y.ndim > 1 else np.zeros(len(y))
    if metric in ("accuracy", "log_loss"):
        out = np.zeros((len(y), int(y.max()) + 1))
    for k in np.unique(folds):
        held, fit = folds == k, y[folds != k]
        if metric in ("accuracy", "log_loss"):
            out[held] = np.bincount(fit, minlength=out.shape[1]) / len(fit)
        elif metric in ("roc_auc", "rmse"):
            out[held] = fit.mean()
        elif metric == "mean_auc":
            out[held] = fit.mean(axis=0)
        elif metric == "f_beta_samples":  # the top-j labels by prior, j best on the other folds
            order = np.argsort(-fit.mean(axis=0))
            sets = [np.isin(np.arange(y.shape[1]), order[:j]).astype(int) for j in range(y.shape[1] + 1)]
            best = max(sets, key=lambda s: _fscore(fit, np.tile(s, (len(fit), 1)), beta))
            out[held] = best
        else:
            out[held] = np.bincount(fit).argmax()
    return out


def reference(metric: str, x: np.ndarray, y: np.ndarray, folds: np.ndarray, beta: float) -> np.ndarray:
    """Logistic regression (one per label, C = 0.1) on the first 64 principal components of the standardised
    pixels, whitened (+ the metadata, standardised), or ridge regression on the standardised pixels (+ metadata)
    with the penalty chosen by an inner CV on the training folds; out of fold. F2: one threshold for every label,
    fitted nested; QWK: the number rounded to a grade."""
    from sklearn.compose import ColumnTransformer
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression, RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n_pix = PIXELS * PIXELS * 3

    def logistic():  # the components of the pixels only; metadata columns beside them
        pca = PCA(min(64, int(fit.sum()) - 1), whiten=True, random_state=0)  # fewer on tiny smoke downloads
        parts = ColumnTransformer([("pixels", make_pipeline(StandardScaler(), pca), slice(0, n_pix))],
                                  remainder=StandardScaler())
        return make_pipeline(parts, LogisticRegression(C=0.1, max_iter=1000))

    def ridge():
        return make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(1, 5, 9)))

    multilabel = metric in ("mean_auc", "f_beta_samples")
    out = np.zeros(y.shape if multilabel else (len(y), int(y.max()) + 1) if metric in ("accuracy", "log_loss")
                   else len(y))
    for k in np.unique(folds):
        held, fit = folds == k, folds != k
        if multilabel:
            for j in range(y.shape[1]):
                out[held, j] = logistic().fit(x[fit], y[fit, j]).predict_proba(x[held])[:, 1]
        elif metric in ("accuracy", "log_loss"):
            model = logistic().fit(x[fit], y[fit])
            out[np.ix_(held, model.classes_)] = model.predict_proba(x[held])
        elif metric == "roc_auc":
            out[held] = logistic().fit(x[fit], y[fit]).predict_proba(x[held])[:, 1]
        else:
            out[held] = ridge().fit(x[fit], y[fit]).predict(x[held])
    if metric == "qwk":
        out = np.clip(np.rint(out), y.min(), y.max())
    if metric == "f_beta_samples":  # fold k decided by the threshold that scores best on the other folds
        probs, out = out, np.zeros_like(out, dtype=int)
        for k in np.unique(folds):
            held = folds == k
            t = max(GRID, key=lambda g: _fscore(y[~held], (probs[~held] >= g).astype(int), beta))
            out[held] = probs[held] >= t
    return out


# ---------------------------------------------------------------- per kind, and the table

def clearly_better(metric: str, cv: float, base: float) -> bool:
    """At least 0.05 better on a 0-1 score, 5% lower on a loss (log loss, RMSE)."""
    return cv >= base + 0.05 if HIGHER[metric] else cv <= 0.95 * base


def bench_kind(kind: str, sample: Sample, args, tmp: Path) -> dict:
    raw, spec, log = tmp / kind / f"bench-{kind}", tmp / kind / "spec.toml", tmp / kind / "chain.log"
    raw.mkdir(parents=True)
    built = KINDS[kind](raw, sample)
    source, init_s = write_spec(raw, spec, built, log)
    times = {"init": init_s, **run_chain(spec, raw, tmp / kind, args, log)}
    run = tmp / kind / "run"
    cv = json.loads((run / "cv.json").read_text(encoding="utf-8"))
    cfg = json.loads((run / "fold0" / "config.json").read_text(encoding="utf-8"))["config"]  # adapted to the data
    metric, beta = built.fields["metric"], float(built.fields.get("beta", 1.0))
    if cv["metric"] != metric:
        raise RuntimeError(f"{kind}: the run scored {cv['metric']}, the bench built {metric}")
    folds = pd.read_csv(tmp / kind / "work" / "folds.csv", dtype={"id": str}).set_index("id")["fold"]
    truth = built.truth.assign(file=sample.files, row=range(len(sample.files))).set_index("id")
    missing = sorted(set(folds.index) - set(truth.index))
    if missing or len(folds) != len(truth):
        raise RuntimeError(f"{kind}: folds.csv has {len(folds)} ids for {len(truth)} images ({missing[:3]})")
    truth = truth.loc[folds.index]
    y = truth.drop(columns=["file", "row"]).to_numpy()
    y = y[:, 0].astype(int if metric != "rmse" else float) if y.shape[1] == 1 else y.astype(int)
    fold = folds.to_numpy()
    start = time.perf_counter()
    x = pixels(list(truth["file"]))
    if built.meta is not None:
        x = np.hstack([x, built.meta[truth["row"].to_numpy()]])
    with threadpool_limits(1):  # BLAS threads on small matrices cost 30x on 2 shared cores
        base = score(metric, y, baseline(metric, y, fold, beta), beta)
        ref = score(metric, y, reference(metric, x, y, fold, beta), beta)
    times["reference"] = time.perf_counter() - start
    row = {"kind": kind, "task": built.fields["task"], "metric": metric + (f" (beta {beta:g})" if beta != 1 else ""),
           "spec": source, "epochs": cfg["epochs"], "batch": cfg["batch_size"], "lr": cfg["lr"], "model": cfg["model"],
           "cv": float(cv["cv"]), "baseline": base, "reference": ref, "decision": cv.get("decision"),
           "clear": clearly_better(metric, float(cv["cv"]), base), "times": times, "log": str(log)}
    print_kind(row, len(sample.ids), len(sample.test_files))
    return row


def print_kind(r: dict, n: int, n_test: int) -> None:
    print(f"== {r['kind']}: task {r['task']}, metric {r['metric']}; spec from {r['spec']}")
    print(f"   {n} training images, {n_test} test; {r['model']}, {r['epochs']} epochs at batch {r['batch']}, "
          f"lr {r['lr']:.4g}")
    line = f"   CV {r['cv']:.4f}   baseline {r['baseline']:.4f}   reference {r['reference']:.4f}"
    if r["decision"]:
        d = r["decision"]
        line += f"   (decision nested {d['nested']:.4f}, in-sample {d['in_sample']:.4f}, default {d['default']:.4f})"
    print(line + ("" if r["clear"] else "   <- NOT clearly better than the baseline"))
    print("   seconds: " + "  ".join(f"{k} {v:.1f}" for k, v in r["times"].items()) + f"   log {r['log']}",
          flush=True)


def print_table(rows: list[dict]) -> None:
    head = f"{'kind':<11}{'task':<11}{'metric':<24}{'spec':<7}{'epochs':>7}{'CV':>9}{'baseline':>10}" \
           f"{'reference':>11}{'beats':>7}{'chain s':>9}{'ref s':>7}"
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        chain = sum(v for k, v in r["times"].items() if k != "reference")
        spec = ("init" if r["spec"] == "init" else "init*") if r["spec"].startswith("init") else "fields"
        print(f"{r['kind']:<11}{r['task']:<11}{r['metric']:<24}{spec:<7}{r['epochs']:>7}{r['cv']:>9.4f}"
              f"{r['baseline']:>10.4f}{r['reference']:>11.4f}{'yes' if r['clear'] else 'NO':>7}{chain:>9.1f}"
              f"{r['times']['reference']:>7.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1500, help="training images per download")
    parser.add_argument("--test-images", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=0, help="cap the recipe's epochs (0: init's recipe)")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of {', '.join(KINDS)}")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, help="keep the downloads, work folders and runs here (default: a "
                                                  "temporary folder, removed)")
    args, args.train_options = parser.parse_known_args()  # the rest goes to `pipeline train` (e.g. --model)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        parser.error(f"unknown kind {unknown[0]!r}; choose from {', '.join(KINDS)}")
    if not (CIFAR / "trainLabels.csv").is_file():
        print(f"skipped: {CIFAR} is absent")
        return
    sys.path.insert(0, str(ROOT))  # this checkout's pipeline (specfile's TOML writer)
    tmp = args.out or Path(tempfile.mkdtemp(prefix="bench-kinds-"))
    tmp.mkdir(parents=True, exist_ok=True)
    sample = draw(args.images, args.test_images)
    rows, start = [], time.perf_counter()
    try:
        for kind in kinds:
            try:
                rows.append(bench_kind(kind, sample, args, tmp))
            except RuntimeError as exc:
                print(f"== {kind}: FAILED: {exc}", flush=True)
    finally:
        if args.out is None:
            shutil.rmtree(tmp, ignore_errors=True)
    print_table(rows)
    if args.train_options:
        print(f"train options beyond the recipe: {' '.join(args.train_options)}")
    print(f"\n{len(rows)} of {len(kinds)} kinds ran in {time.perf_counter() - start:.0f} s; "
          f"{sum(r['clear'] for r in rows)} beat the constant baseline clearly")


if __name__ == "__main__":
    main()
