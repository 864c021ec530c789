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

    python benchmarks/bench_quality.py [--parts dog,cifar,tiny] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import math
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


def dog(tmp: Path) -> list[dict]:
    """CV log loss of the dog recipe with Lite0 weights, and of the logreg head."""
    work = tmp / "dog-work"
    cli("reorg", "dog-breed-identification", str(DOG), str(work), "--folds", "3")
    rows = []
    for name, extra in (("recipe (logreg head)", []), ("--head mlp (SGD)", ["--head", "mlp"])):
        run = tmp / f"dog-{len(rows)}"
        secs = cli("train", "dog-breed-identification", str(work), str(run), "--folds", "3", *LITE0, *extra)
        cv = json.loads((run / "cv.json").read_text())
        rows.append({"data": "dog 300, 3 folds", "variant": name, "score": f"CV log loss {cv['cv']:.3f}",
                     "target": "<= 2.0 (uniform 4.787)", "seconds": secs, "notes": notes_of(run)})
    return rows


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


def cifar(tmp: Path) -> list[dict]:
    """Accuracy of the fast recipe (no flags) on 1,000 held-out images after training on 2,000."""
    raw, work, run, sub = tmp / "cifar-raw", tmp / "cifar-work", tmp / "cifar-run", tmp / "cifar-sub.csv"
    truth = cifar_subset(raw)
    cli("reorg", "cifar-10", str(raw), str(work), "--folds", "0")
    secs = cli("train", "cifar-10", str(work), str(run), "--recipe", "fast")
    secs += cli("predict", "cifar-10", str(work), str(run), str(sub))
    pred = pd.read_csv(sub).set_index("id")["label"]
    acc = float((pred.loc[truth.index] == truth).mean())
    valid = last_valid_accuracy(run / "holdout")
    return [{"data": "cifar-10 2,000 (held-out 1,000)", "variant": "--recipe fast",
             "score": f"test accuracy {acc:.3f} (valid {valid:.3f})", "target": ">= 0.55 (chance 0.10)",
             "seconds": secs, "notes": notes_of(run)}]


def tiny(tmp: Path) -> list[dict]:
    """Holdout accuracy of the fast recipe on cifar-10-tiny."""
    work, run = tmp / "tiny-work", tmp / "tiny-run"
    cli("reorg", "cifar-10", str(TINY), str(work), "--folds", "0")
    secs = cli("train", "cifar-10", str(work), str(run), "--recipe", "fast")
    return [{"data": "cifar-10-tiny 900/100", "variant": "--recipe fast",
             "score": f"valid accuracy {last_valid_accuracy(run / 'holdout'):.3f}", "target": "well above 0.10",
             "seconds": secs, "notes": notes_of(run)}]


def last_valid_accuracy(member: Path) -> float:
    return float(pd.read_csv(member / "metrics.csv")["valid_accuracy"].iloc[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="dog,cifar,tiny", help="comma-separated: dog, cifar, tiny")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it")
    args = parser.parse_args()
    missing = [p for p in (DOG, CIFAR, TINY, WEIGHTS) if not p.exists()]
    if missing:
        raise SystemExit(f"shared data missing: {', '.join(map(str, missing))}")
    parts = {"dog": dog, "cifar": cifar, "tiny": tiny}
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.keep or Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        for part in args.parts.split(","):
            for row in parts[part](tmp):
                print(f"{row['data']:<34} {row['variant']:<24} {row['score']:<38} target {row['target']:<26} "
                      f"{row['seconds']:6.1f} s", flush=True)
                for note in row["notes"]:
                    print(f"    adapted: {note}", flush=True)


if __name__ == "__main__":
    main()
