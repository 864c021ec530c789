"""What the default recipes score on small data, and the variants of issue 15, with wall time on this machine.

Runs the `pipeline` CLI (this checkout's package) as a user would:

- dog: the 300 real dog-breed images of ../shared (reorg --folds 3), trained as
  `pipeline train dog-breed-identification WORK RUN --folds 3 --model
  timm:tf_efficientnet_lite0 --weights <lite0>` (the recipe's logreg head),
  then the same with `--head mlp` (the d2l head trained by SGD); prints the CV
  log loss (uniform guess: ln 120 = 4.787).
- cifar: 2,000 training images drawn from ../shared/data/cifar-10-jpeg (written
  as the Kaggle PNG layout) and 1,000 other images of the set as the test set,
  their labels known only here; `pipeline train cifar-10 WORK RUN --recipe fast`
  (holdout), predict, and the accuracy on the 1,000 (chance: 10%).
- tiny: cifar-10-tiny (900 train / 100 valid), `--recipe fast`, its holdout accuracy.
- finetune: the dog data with `--unfreeze-after 1` after the logreg fit (3
  epochs of fine-tuning the whole Lite0, backbone lr x 0.1, AdamW), 3 folds.
- defaults: the default recipe of each other competition with data here, no
  flags: cifar-10's (ResNet-18, 30 epochs) on cifar-10-tiny, digits' (the
  dataset scikit-learn ships) on its holdout split.
- tricks (issue 23): each technique with and without it on the same data:
  the lr scaled with the adapted batch (cifar-10-tiny, default and fast
  recipes, against --lr at the recipe's value, the old behaviour); calibration
  (dog 300: the calibrated nested CV beside the uncalibrated CV of the same
  predictions, with the paired 95% interval of the change); --tta flip on dog;
  --augment trivialaugment on cifar-10-tiny (fast recipe).
- cifar-tricks (issue 23): CIFAR 2,000's fast recipe against its small-data epochs undone
  (--epochs 10), the shifted views (--tta flipshift) and a higher lr, with paired intervals.
- unseen (issue 23): cifar-10-tiny's training images with 2,000 other CIFAR-10
  images as the test set: the default and the fast recipe's accuracy there
  beside their holdout accuracy (100 images).
- views (issue 23): dog 300 with --tta none, flip, multiscale and --test-size 256 (the
  decoded images at a side above the training 224), CV log loss with its interval.
- presets (issue 23): the fast recipe with --augment randaugment, erasing, d4 and with
  --accum-steps 2, on CIFAR 2,000 and on cifar-10-tiny's unseen images, paired intervals.
- layer-decay (issue 23): fine-tuning Lite0 with and without --layer-decay 0.75 on dog 300
  (3 folds) and on cifar-10-tiny at 64 px (2,000 unseen images).
- second (issue 23): a second data set for techniques first measured on one: averaging, the
  lr rule, d4 and multiscale views on CIFAR 2,000; soft and pseudo-labels on cifar-10-tiny (3 folds).

Each row prints its baseline on the same images: for accuracy the majority
class of the training images, for log loss the uniform guess and the class
frequencies of the training folds (out of fold). The dog part also blends its
two runs (`pipeline blend`) and prints the blended CV.

- soft (issue 23 point 3): on dog 300, the recipe as teacher, a student with
  --soft-labels TEACHER and one with --pseudo-label TEACHER, with the paired
  interval of each student's per-image log-loss change against the teacher.

    python benchmarks/bench_quality.py [--parts dog,cifar,tiny,finetune,defaults,tricks,soft,...] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" if (ROOT.parent / "shared").is_dir() else Path("/work/shared")
DOG = SHARED / "data" / "dog-breed-identification"
CIFAR = SHARED / "data" / "cifar-10-jpeg"
TINY = SHARED / "data" / "cifar-10-tiny"
WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0.mlillustrated_in1k.safetensors"
LITE0 = ["--model", "timm:tf_efficientnet_lite0", "--weights", str(WEIGHTS)]


def cli(*args: str) -> float:
    """Run `python -m pipeline ARGS` from this checkout; its wall time in seconds."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pipeline", "-q", *args], cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"pipeline {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def notes_of(run: Path) -> list[str]:
    return json.loads((run / "config.json").read_text())["notes"]


def dog_work(tmp: Path) -> Path:
    work = tmp / "dog-work"
    if not (work / "reorg.json").is_file():
        cli("reorg", "dog-breed-identification", str(DOG), str(work), "--folds", "3")
    return work


def dog_cv(tmp: Path, name: str, run: Path, extra: list[str]) -> dict:
    work = dog_work(tmp)
    shutil.rmtree(run, ignore_errors=True)  # a kept folder's earlier run of this row: trained again
    secs = cli("train", "dog-breed-identification", str(work), str(run), "--folds", "3", *LITE0, *extra)
    cv = json.loads((run / "cv.json").read_text())
    return {"data": "dog 300, 3 folds", "variant": name, "score": f"CV log loss {cv['cv']:.3f}",
            "target": "<= 2.0", "baseline": cv_log_loss_baselines(work), "seconds": secs, "notes": notes_of(run)}


def dog(tmp: Path) -> list[dict]:
    """CV log loss of the dog recipe (logreg head) with Lite0 weights, of an mlp head by SGD, and their blend."""
    rows = [dog_cv(tmp, "recipe (logreg head)", tmp / "dog-0", []),
            dog_cv(tmp, "--head mlp (SGD)", tmp / "dog-1", ["--head", "mlp"])]
    out = tmp / "dog-blend.csv"
    secs = cli("blend", str(tmp / "dog-0"), str(tmp / "dog-1"), str(out), "--force")
    record = json.loads(out.with_suffix(".blend.json").read_text())
    weights = ", ".join(f"{w:.2f}" for w in record["weights"])
    rows.append({"data": "dog 300, 3 folds", "variant": "blend of the two", "score": f"blended CV {record['blended_cv']:.3f}",
                 "target": f"weights {weights}", "baseline": "", "seconds": secs, "notes": []})
    return rows


FINETUNE = ["--head", "logreg", "--unfreeze-after", "1", "--epochs", "4", "--lr", "0.001",
            "--backbone-lr-scale", "0.1", "--optimizer", "adamw", "--weight-decay", "0.05"]


def finetune(tmp: Path) -> list[dict]:
    """The logreg fit, then three epochs fine-tuning the whole network (--unfreeze-after 1)."""
    return [dog_cv(tmp, "--unfreeze-after 1", tmp / "dog-ft", FINETUNE)]


def layer_decay(tmp: Path) -> list[dict]:
    """Issue 23 point 5: fine-tuning Lite0 with and without --layer-decay 0.75 (timm's param groups: each block
    below the head at 0.75x the lr of the one above), on top of --backbone-lr-scale 0.1 and instead of it (beside
    the whole backbone at the head's lr, --backbone-lr-scale 1, without decay), on
    dog 300 (3 folds, the finetune part's schedule) and on cifar-10-tiny at 64 px with its 2,000 unseen test
    images (holdout, 10 epochs, AdamW)."""
    # each variant and the one it is compared with: the decay on top of the backbone's 0.1, the whole backbone
    # at the head's lr, and the decay instead of the 0.1 (against the backbone at the head's lr)
    variants = ((), ("--layer-decay", "0.75"), ("--backbone-lr-scale", "1"),
                ("--backbone-lr-scale", "1", "--layer-decay", "0.75"))
    bases, rows = (0, 0, 0, 2), []
    for i, extra in enumerate(variants):
        run = tmp / f"dog-ft-ld{i}"
        row = dog_cv(tmp, " ".join(["--unfreeze-after 1", *extra]), run, FINETUNE + list(extra))
        cv = json.loads((run / "cv.json").read_text())
        lo, hi = cv["interval"]
        row.update(score=f"CV log loss {cv['cv']:.3f} [{lo:.3f}, {hi:.3f}]",
                   target=paired_change(tmp / f"dog-ft-ld{bases[i]}", run, f"row {bases[i] + 1}") if i else "")
        rows.append(row)
    tiny = ("--model", "timm:tf_efficientnet_lite0", "--weights", str(WEIGHTS), "--image-size", "64", "--epochs", "10",
            "--optimizer", "adamw", "--lr", "0.001", "--weight-decay", "0.05", "--backbone-lr-scale", "0.1")
    return rows + unseen(tmp, tuple((*tiny, *extra) for extra in variants), bases)


def second(tmp: Path) -> list[dict]:
    """Issue 23 point 8: a second data set for the techniques first measured on one. CIFAR 2,000 (fast recipe,
    1,000 held-out images): --average-last 3, --lr 0.4 (the recipe's lr unscaled: the lr rule undone), --tta d4
    and --tta multiscale. cifar-10-tiny with 3 folds and 2,000 unseen test images (fast recipe): the teacher,
    a student with --soft-labels TEACHER and one with --pseudo-label TEACHER (the fold source: fold k's targets
    from the teacher's fold-k model), each with its CV accuracy and its accuracy on the unseen images."""
    rows = cifar(tmp, ((), ("--average-last", "3"), ("--lr", "0.4"), ("--tta", "d4"), ("--tta", "multiscale")))
    return rows + teachers_on_tiny(tmp)


def teachers_on_tiny(tmp: Path) -> list[dict]:
    """The teacher, --soft-labels and --pseudo-label rows of :func:`second` (cifar-10-tiny, 3 folds)."""
    (raw, truth), work = unseen_download(tmp), tmp / "unseen3-work"
    if not (work / "reorg.json").is_file():
        cli("reorg", "cifar-10", str(raw), str(work), "--folds", "3")
    top = pd.read_csv(raw / "trainLabels.csv")["label"].value_counts().idxmax()
    rows, teacher, first = [], tmp / "tiny3-teacher", None
    for name, extra in (("teacher (--recipe fast --folds 3)", []), ("--soft-labels TEACHER", ["--soft-labels"]),
                        ("--pseudo-label TEACHER", ["--pseudo-label"])):
        run = teacher if not extra else tmp / f"tiny3-{extra[0].strip('-')}"
        sub = run.with_suffix(".csv")
        shutil.rmtree(run, ignore_errors=True)
        sub.unlink(missing_ok=True)
        secs = cli("train", "cifar-10", str(work), str(run), "--folds", "3", "--recipe", "fast",
                   *(extra and [extra[0], str(teacher)]))
        secs += cli("predict", "cifar-10", str(work), str(run), str(sub))
        right = correct(sub, truth)
        first = right if first is None else first
        cv = json.loads((run / "cv.json").read_text())
        lo, hi = cv["interval"]
        rows.append({"data": "cifar-10-tiny 3 folds + 2,000 unseen", "variant": name,
                     "score": f"CV accuracy {cv['cv']:.3f} [{lo:.2f}, {hi:.2f}], unseen {right.mean():.3f}",
                     "target": paired(right - first) if extra else "",
                     "baseline": f"majority {float((truth == top).mean()):.3f}",
                     "seconds": secs, "notes": [cv["teacher"]["line"]] if cv.get("teacher") else []})
    return rows


def presets(tmp: Path) -> list[dict]:
    """Issue 23 points 2 and 4: the fast recipe beside each augmentation preset (--augment randaugment, erasing,
    d4) and beside --accum-steps 2 (an optimizer step of two half batches: the same images per step in half the
    memory), on CIFAR 2,000 (1,000 held-out images) and on cifar-10-tiny (2,000 unseen images)."""
    changes = (("--augment", "randaugment"), ("--augment", "erasing"), ("--augment", "d4"), ("--accum-steps", "2"))
    fast = ("--recipe", "fast")
    return cifar(tmp, ((), *changes)) + unseen(tmp, (fast, *((*fast, *c) for c in changes)))


def cv_log_loss_baselines(work: Path) -> str:
    """Uniform guess and out-of-fold class frequencies (add-one), as log loss on the folds of ``work``."""
    folds = pd.read_csv(work / "folds.csv", dtype=str)
    classes = sorted(folds["label"].unique())
    n_classes = len(json.loads((work / "reorg.json").read_text())["classes"])
    losses = []
    for k in folds["fold"].unique():
        train, valid = folds[folds["fold"] != k], folds[folds["fold"] == k]
        counts = train["label"].value_counts().reindex(classes, fill_value=0) + 1
        prior = counts / (len(train) + n_classes)
        losses += list(-np.log(prior.loc[valid["label"]].to_numpy()))
    return f"uniform {math.log(n_classes):.3f}, class prior {np.mean(losses):.3f}"


def majority_accuracy(work: Path, train: str = "train", valid: str = "valid") -> float:
    """Accuracy on WORK/valid of always answering the most frequent class of WORK/train."""
    def counts(split: str) -> dict[str, int]:
        return {d.name: sum(1 for _ in d.iterdir()) for d in (work / split).iterdir() if d.is_dir()}

    train_counts, valid_counts = counts(train), counts(valid)
    top = max(train_counts, key=train_counts.get)
    return valid_counts.get(top, 0) / sum(valid_counts.values())


def cifar_subset(dst: Path, n_train: int = 2000, n_test: int = 1000, seed: int = 0) -> pd.Series:
    """A Kaggle-layout CIFAR-10 download of ``n_train`` images; the hidden labels of its ``n_test`` test images."""
    labels = pd.read_csv(CIFAR / "trainLabels.csv")
    pick = labels.sample(n_train + n_test, random_state=seed).reset_index(drop=True)
    train, test = pick[:n_train], pick[n_train:].reset_index(drop=True)
    for sub in ("train", "test"):
        (dst / sub).mkdir(parents=True, exist_ok=True)
    for row in train.itertuples():
        Image.open(CIFAR / "train" / f"{row.id}.jpg").convert("RGB").save(dst / "train" / f"{row.id}.png")
    for i, row in enumerate(test.itertuples(), start=1):
        Image.open(CIFAR / "train" / f"{row.id}.jpg").convert("RGB").save(dst / "test" / f"{i}.png")
    train.to_csv(dst / "trainLabels.csv", index=False)
    pd.DataFrame({"id": range(1, n_test + 1), "label": "cat"}).to_csv(dst / "sampleSubmission.csv", index=False)
    return pd.Series(test["label"].to_numpy(), index=range(1, n_test + 1))


def cifar(tmp: Path, variants: tuple[tuple[str, ...], ...] = ((),)) -> list[dict]:
    """Accuracy of the fast recipe (no flags, then each variant's flags) on 1,000 held-out images after training
    on 2,000; a variant's row gives the paired 95% interval of the per-image change against the first row."""
    raw, work = tmp / "cifar-raw", tmp / "cifar-work"
    truth = cifar_subset(raw)
    if not (work / "reorg.json").is_file():
        cli("reorg", "cifar-10", str(raw), str(work), "--folds", "0")
    top = pd.read_csv(raw / "trainLabels.csv")["label"].value_counts().idxmax()
    rows, first = [], None
    for extra in variants:
        name = "cifar-" + ("-".join(Path(a).name.strip("-") for a in extra) or "fast")
        run, sub = tmp / f"{name}-run", tmp / f"{name}-sub.csv"
        shutil.rmtree(run, ignore_errors=True)
        sub.unlink(missing_ok=True)
        secs = cli("train", "cifar-10", str(work), str(run), "--recipe", "fast", *extra)
        secs += cli("predict", "cifar-10", str(work), str(run), str(sub))
        right = correct(sub, truth)
        first = right if first is None else first
        rows.append({"data": "cifar-10 2,000 (held-out 1,000)", "variant": " ".join(("--recipe fast", *extra)),
                     "score": f"test accuracy {right.mean():.3f} (valid {last_valid_accuracy(run / 'holdout'):.3f})",
                     "target": paired(right - first) if extra else ">= 0.62",
                     "baseline": f"majority {float((truth == top).mean()):.3f}", "seconds": secs,
                     "notes": notes_of(run)})
    return rows


def cifar_tricks(tmp: Path) -> list[dict]:
    """Issue 23 on CIFAR 2,000: the fast recipe's defaults against the small-data epochs undone (--epochs 10),
    the shifted test views added (--tta flipshift, at 15 epochs and at 10) and a higher lr."""
    return cifar(tmp, ((), ("--epochs", "10"), ("--tta", "flipshift"), ("--epochs", "10", "--tta", "flipshift"),
                       ("--lr", "0.094")))


def holdout(tmp: Path, slug: str, raw: Path, name: str, label: str, *extra: str) -> dict:
    """Holdout accuracy of a recipe on a download, beside the majority-class accuracy of the same split."""
    work, run = tmp / f"{name}-work", tmp / f"{name}-run"
    if not (work / "reorg.json").is_file():
        cli("reorg", slug, str(raw), str(work), "--folds", "0")
    shutil.rmtree(run, ignore_errors=True)
    secs = cli("train", slug, str(work), str(run), *extra)
    return {"data": label, "variant": " ".join(extra) or "default recipe",
            "score": f"valid accuracy {last_valid_accuracy(run / 'holdout'):.3f}", "target": "above baseline",
            "baseline": f"majority {majority_accuracy(work):.3f}", "seconds": secs, "notes": notes_of(run)}


def tiny(tmp: Path) -> list[dict]:
    """Holdout accuracy of the fast recipe on cifar-10-tiny."""
    return [holdout(tmp, "cifar-10", TINY, "tiny", "cifar-10-tiny 900/100", "--recipe", "fast")]


def defaults(tmp: Path) -> list[dict]:
    """The default recipe, no flags, of the competitions not covered above: cifar-10 (on tiny) and digits."""
    digits_raw = tmp / "digits-raw"
    if not digits_raw.is_dir():
        cli("download", "digits", str(digits_raw))
    return [holdout(tmp, "cifar-10", TINY, "tiny-default", "cifar-10-tiny 900/100"),
            holdout(tmp, "digits", digits_raw, "digits", "digits (scikit-learn)")]


def paired(change: np.ndarray) -> str:
    """The mean per-image change with its 95% normal interval (both runs scored on the same images)."""
    half = 1.96 * change.std(ddof=1) / math.sqrt(len(change))
    return f"paired {change.mean():+.3f} [{change.mean() - half:+.3f}, {change.mean() + half:+.3f}]"


def binomial_interval(p: float, n: int) -> str:
    half = 1.96 * math.sqrt(p * (1 - p) / n)
    return f"[{max(0.0, p - half):.2f}, {min(1.0, p + half):.2f}]"


UNSEEN_IDS = range(48001, 50001)  # ../shared's cifar-10-jpeg ids that play the test set of tiny's images


def unseen_download(tmp: Path) -> tuple[Path, pd.Series]:
    """A download of cifar-10-tiny's training images with the UNSEEN_IDS images as its test set (test ids 1-2,000,
    as Kaggle numbers them), written once into TMP/unseen-raw; and the test images' labels, by test id."""
    raw = tmp / "unseen-raw"
    if not (raw / "sampleSubmission.csv").is_file():
        (raw / "test").mkdir(parents=True, exist_ok=True)
        shutil.copytree(TINY / "train", raw / "train", dirs_exist_ok=True)
        shutil.copyfile(TINY / "trainLabels.csv", raw / "trainLabels.csv")
        for i, k in enumerate(UNSEEN_IDS, start=1):
            Image.open(CIFAR / "train" / f"{k}.jpg").convert("RGB").save(raw / "test" / f"{i}.png")
        pd.DataFrame({"id": range(1, len(UNSEEN_IDS) + 1), "label": "cat"}).to_csv(raw / "sampleSubmission.csv",
                                                                                   index=False)
    labels = pd.read_csv(CIFAR / "trainLabels.csv").set_index("id")["label"]
    return raw, pd.Series(labels.loc[list(UNSEEN_IDS)].to_numpy(), index=range(1, len(UNSEEN_IDS) + 1))


def correct(sub: Path, truth: pd.Series) -> np.ndarray:
    """1 where the submission's label of a test id is its true label, else 0 (in ``truth``'s order)."""
    return (pd.read_csv(sub).set_index("id")["label"].loc[truth.index] == truth).to_numpy(dtype=float)


def unseen(tmp: Path, variants: tuple[tuple[str, ...], ...] = ((), ("--recipe", "fast")),
           bases: tuple[int, ...] | None = None) -> list[dict]:
    """cifar-10-tiny's 1,000 labelled images (the same 900/100 holdout) with 2,000 other CIFAR-10 images as its
    test set (ids 48,001-50,000 of ../shared's cifar-10-jpeg; tiny holds ids 1-1,000), their labels known only
    here: each recipe's holdout accuracy (100 images: +-10 points) beside its accuracy on the 2,000, and the
    paired interval of the change against the variant ``bases`` names (the first by default)."""
    raw, truth = unseen_download(tmp)
    work = tmp / "unseen-work"
    if not (work / "reorg.json").is_file():
        cli("reorg", "cifar-10", str(raw), str(work), "--folds", "0")
    rows, rights = [], []
    for i, extra in enumerate(variants):
        name = "unseen-" + ("-".join(Path(a).name.strip("-") for a in extra) or "default")
        run, sub = tmp / f"{name}-run", tmp / f"{name}.csv"
        shutil.rmtree(run, ignore_errors=True)
        sub.unlink(missing_ok=True)
        secs = cli("train", "cifar-10", str(work), str(run), *extra)
        secs += cli("predict", "cifar-10", str(work), str(run), str(sub))
        right = correct(sub, truth)
        rights.append(right)
        base = bases[i] if bases else 0
        acc, valid = float(right.mean()), last_valid_accuracy(run / "holdout")
        rows.append({"data": "cifar-10-tiny + 2,000 unseen", "variant": " ".join(extra) or "default recipe",
                     "score": f"unseen {acc:.3f} {binomial_interval(acc, len(truth))}, holdout {valid:.2f} "
                              f"{binomial_interval(valid, 100)}",
                     "target": f"vs row {base + 1}: {paired(right - rights[base])}" if i else ">= 0.45",
                     "baseline": f"majority {majority_accuracy(work):.3f}", "seconds": secs, "notes": notes_of(run)})
    return rows


def calibrated_row(tmp: Path, name: str, run: Path, extra: list[str]) -> dict:
    """A dog run with --calibrate auto (on: log loss): its calibrated nested CV, the uncalibrated CV, the change."""
    row = dog_cv(tmp, name, run, ["--calibrate", "auto", *extra])
    cv = json.loads((run / "cv.json").read_text())
    cal, (lo, hi) = cv["calibration"], cv["interval"]
    change = cal["change_interval"]
    row.update(score=f"CV log loss {cv['cv']:.3f} [{lo:.3f}, {hi:.3f}]",
               target=f"uncalibrated {cal['uncalibrated']:.3f}, change [{change[0]:+.3f}, {change[1]:+.3f}] "
                      f"(T {cal['temperature']:.2f}, w {cal['weight']:.3f})")
    return row


def with_interval(row: dict, member: Path) -> dict:
    """The holdout row with the 95% interval of the kept weights' validation score."""
    lo, hi = json.loads((member / "done.json").read_text())["kept"]["interval"]
    row["score"] += f" [{lo:.2f}, {hi:.2f}]"
    return row


def tricks(tmp: Path) -> list[dict]:
    """Issue 23: each technique and the same run without it."""
    tiny_label = "cifar-10-tiny 900/100"
    rows = [calibrated_row(tmp, "calibrated (auto)", tmp / "dog-cal", []),
            calibrated_row(tmp, "calibrated, --tta flip", tmp / "dog-flip", ["--tta", "flip"])]
    for name, extra in (("tiny-default", []), ("tiny-default-lr", ["--lr", "0.1"]),
                        ("tiny-fast", ["--recipe", "fast"]), ("tiny-fast-lr", ["--recipe", "fast", "--lr", "0.4"]),
                        ("tiny-fast-ta", ["--recipe", "fast", "--augment", "trivialaugment"])):
        row = holdout(tmp, "cifar-10", TINY, name, tiny_label, *extra)
        rows.append(with_interval(row, tmp / f"{name}-run" / "holdout"))
    return rows


def soft(tmp: Path) -> list[dict]:
    """Issue 23 point 3 on dog 300 (3 folds, the recipe's logreg head on Lite0): the teacher run, a student
    with --soft-labels TEACHER (the teacher's fold-k model's probabilities mixed into fold k's targets, weight
    0.5), the same with --teacher-source all (its out-of-fold table: an optimistic CV), and one
    with --pseudo-label TEACHER (the 300 test images added as soft rows, labelled by the teacher's fold-k model
    for fold k; with --teacher-source all by what `pipeline predict` kept: an optimistic CV). Each row: CV log
    loss with its interval, wall time, and the paired 95% interval of the per-image log-loss change against
    the teacher (same out-of-fold images; below 0: the student wins beyond the noise of these rows)."""
    from pipeline.predict.calibrate import paired_change_interval

    work, rows = dog_work(tmp), []

    def oof(run: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
        frame = pd.read_csv(run / "oof.csv", dtype={"id": str}).set_index("id").sort_index()
        classes = [c for c in frame.columns if c != "label"]
        return frame[classes].to_numpy(), frame["label"].map({c: i for i, c in enumerate(classes)}).to_numpy(), \
            classes

    def run_row(name: str, run: Path, extra: list[str]) -> dict:
        secs = 0.0 if (run / "cv.json").is_file() else cli("train", "dog-breed-identification", str(work),
                                                           str(run), "--folds", "3", *LITE0, *extra)
        cv = json.loads((run / "cv.json").read_text())
        lo, hi = cv["interval"]
        paired = ""
        if run != teacher:
            before, targets, classes = oof(teacher)
            after = pd.read_csv(run / "oof.csv", dtype={"id": str}).set_index("id").sort_index()[classes].to_numpy()
            a, b = paired_change_interval(before, after, targets)
            paired = f"change vs teacher [{a:+.3f}, {b:+.3f}]"
        return {"data": "dog 300, 3 folds", "variant": name, "score": f"CV log loss {cv['cv']:.3f} [{lo:.3f}, "
                f"{hi:.3f}]", "target": paired, "baseline": cv_log_loss_baselines(work), "seconds": secs,
                "notes": [cv["teacher"]["line"]] if cv.get("teacher") else []}

    teacher = tmp / "soft-teacher"
    rows.append(run_row("teacher (recipe)", teacher, []))
    if not (teacher / "test_probs.csv").is_file():
        rows[-1]["seconds"] += cli("predict", "dog-breed-identification", str(work), str(teacher),
                                   str(tmp / "soft-teacher.csv"), "--force")
    rows.append(run_row("--soft-labels teacher", tmp / "soft-student", ["--soft-labels", str(teacher)]))
    rows.append(run_row("... --teacher-source all", tmp / "soft-oof-student", ["--soft-labels", str(teacher),
                                                                              "--teacher-source", "all"]))
    rows.append(run_row("--pseudo-label teacher", tmp / "pseudo-fold-student", ["--pseudo-label", str(teacher)]))
    rows.append(run_row("... --teacher-source all", tmp / "pseudo-student", ["--pseudo-label", str(teacher),
                                                                            "--teacher-source", "all"]))
    return rows


def prior(tmp: Path) -> list[dict]:
    """The dog recipe with the class prior (the default: 119 of 120 breeds are ImageNet classes by name) and
    without it, each with the CV's 95% interval; the second run reads the first's feature cache."""
    rows = []
    for name, run, extra in (("class prior (default)", tmp / "dog-prior", []),
                             ("--class-prior off", tmp / "dog-noprior", ["--class-prior", "off"])):
        row = dog_cv(tmp, name, run, extra)
        lo, hi = json.loads((run / "cv.json").read_text())["interval"]
        row["score"] += f" [{lo:.3f}, {hi:.3f}]"
        rows.append(row)
    return rows


AVERAGE_K = 3  # --average-last: the last 3 of the fast recipe's 10 epochs (its one-cycle tail)


def averaging(tmp: Path) -> list[dict]:
    """Issue 23 point 5: cifar-10-tiny, --recipe fast, without and with --average-last K (same seed and
    budget); the kept weights' valid accuracy with its 95% interval (with K: the average's, BN recomputed)."""
    rows = []
    for name, extra in (("avg-off", []), ("avg-on", ["--average-last", str(AVERAGE_K)])):
        row = holdout(tmp, "cifar-10", TINY, name, "cifar-10-tiny 900/100", "--recipe", "fast", *extra)
        kept = json.loads((tmp / f"{name}-run" / "holdout" / "done.json").read_text())["kept"]
        lo, hi = kept["interval"]
        row["score"] = f"valid accuracy {kept['metric']:.3f} [{lo:.2f}, {hi:.2f}] ({kept['variant']})"
        rows.append(row)
    return rows


def views(tmp: Path) -> list[dict]:
    """Issue 23 point 1: the dog recipe (frozen Lite0, logreg head) with --tta none, flip, multiscale and a test
    side above the training one (256 for 224); each run from a cold feature cache, so the wall times compare."""
    rows = []
    for i, (name, extra) in enumerate((("--tta none", ["--tta", "none"]), ("--tta flip", ["--tta", "flip"]),
                                       ("--tta multiscale", ["--tta", "multiscale"]),
                                       ("--test-size 256", ["--test-size", "256"]))):
        shutil.rmtree(dog_work(tmp) / "cache", ignore_errors=True)  # every run builds its features
        run = tmp / f"dog-views-{i}"
        row = dog_cv(tmp, name, run, extra)
        cv = json.loads((run / "cv.json").read_text())
        lo, hi = cv["interval"]
        row.update(score=f"CV log loss {cv['cv']:.3f} [{lo:.3f}, {hi:.3f}]",
                   target=paired_change(tmp / "dog-views-0", run) if i else "")
        rows.append(row)
    return rows


def paired_change(base: Path, run: Path, against: str = "none") -> str:
    """The 95% paired bootstrap interval of the per-row out-of-fold log loss change of ``run`` against ``base``
    (the same images, classes matched by name): below 0 is a gain beyond the noise of these rows."""
    from pipeline.predict.calibrate import paired_change_interval

    before = pd.read_csv(base / "oof.csv", dtype={"id": str}).set_index("id").sort_index()
    after = pd.read_csv(run / "oof.csv", dtype={"id": str}).set_index("id").loc[before.index]
    classes = [c for c in before.columns if c != "label"]
    targets = before["label"].map({c: k for k, c in enumerate(classes)}).to_numpy()
    lo, hi = paired_change_interval(before[classes].to_numpy(), after[classes].to_numpy(), targets)
    return f"change vs {against} [{lo:+.3f}, {hi:+.3f}]"


def last_valid_accuracy(member: Path) -> float:
    return float(pd.read_csv(member / "metrics.csv")["valid_accuracy"].iloc[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="dog,cifar,tiny,finetune,defaults,tricks",
                        help="comma-separated: dog, cifar, tiny, finetune, defaults, tricks, prior, averaging, soft, views, "
                             "unseen, cifar-tricks, presets, layer-decay, second")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it")
    args = parser.parse_args()
    missing = [p for p in (DOG, CIFAR, TINY, WEIGHTS) if not p.exists()]
    if missing:
        raise SystemExit(f"shared data missing: {', '.join(map(str, missing))}")
    parts = {"dog": dog, "cifar": cifar, "tiny": tiny, "finetune": finetune, "defaults": defaults, "tricks": tricks,
             "prior": prior, "averaging": averaging, "soft": soft,
             "views": views, "unseen": unseen, "cifar-tricks": cifar_tricks, "presets": presets,
             "layer-decay": layer_decay, "second": second}
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.keep or Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        for part in args.parts.split(","):
            for row in parts[part](tmp):
                print(f"{row['data']:<31} {row['variant']:<22} {row['score']:<36} target {row['target']:<16} "
                      f"baseline {row['baseline']:<34} {row['seconds']:6.1f} s", flush=True)
                for note in row["notes"]:
                    print(f"    adapted: {note}", flush=True)


if __name__ == "__main__":
    main()
