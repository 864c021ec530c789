"""How far the scores a run prints are from the true test score, on a small set (issue 13, points 3 and 4).

A two-class set is cut from ../shared/data/cifar-10-jpeg (cat vs dog): 120
labelled training images and 600 test images whose labels only this script
knows, written as a Kaggle download (labels CSV, train/, test/, a sample
submission with one probability column per class, scored by log loss).
EfficientNet-Lite0 with the shared ImageNet weights, frozen, a linear head,
224 px, trains on it twice: a holdout run (its validation log loss, 24
images) and a 3-fold run (its CV log loss); each run's submission is scored
against the hidden test labels. The same chain runs with another checkout's
package (`--code DIR`, e.g. a worktree of commit 8914f4d) for a before/after.

    python benchmarks/bench_honest_scores.py [--code DIR] [--epochs 10] [--lr 0.01]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pandas as pd
from sklearn.metrics import log_loss

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CIFAR = SHARED / "data" / "cifar-10-jpeg"
WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0.mlillustrated_in1k.safetensors"
CLASSES = ["cat", "dog"]

# Registers the competition and runs reorg, train (holdout and folds) and predict with
# whichever API the package on PYTHONPATH has (the redesign's or 8914f4d's).
DRIVER = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    import competitions  # noqa: F401
    from pipeline.competition import Competition, Recipe, register
    from pipeline.download.reorg import reorg
    from pipeline.predict.stage import predict
    from pipeline.train.stage import train
    import pipeline.config as config

    raw, out, weights, epochs = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
    recipe = dict(model="timm:tf_efficientnet_lite0", freeze_backbone=True, head="linear", epochs=epochs,
                  batch_size=16, lr=float(sys.argv[5]), optimizer="sgd", momentum=0.9, weight_decay=1e-4, schedule="cosine",
                  augment="resized_crop_flip_jitter")
    comp = register(Competition(slug="cats-dogs-small", title="cats and dogs", labels_file="labels.csv",
        id_column="id", label_column="label", sample_submission="sample_submission.csv", submission="probs",
        metric="log_loss", image_size=224, image_ext=".jpg", mean=(0.5,) * 3, std=(0.5,) * 3,
        recipe=Recipe(**recipe)))
    reorg(comp, raw, out / "work", valid_ratio=0.2, folds=3, seed=0)
    for name, mode in (("holdout", {}), ("folds", {"folds": 3})):
        options = dict(weights=weights, device="cpu", **mode)
        from pipeline.models import weights_data_config

        cfg = config.resolve_config(comp, out / "work", out / name, None, options, weights_config=weights_data_config)
        train(cfg)
        predict(comp, out / "work", out / name, out / (name + ".csv"), device="cpu")
''')


def write_download(root: Path, n_train: int = 120, n_test: int = 600, seed: int = 0) -> pd.Series:
    """The small download under ``root``; returns the hidden test labels by id."""
    labels = pd.read_csv(CIFAR / "trainLabels.csv", dtype={"id": str})
    labels = labels[labels["label"].isin(CLASSES)].sample(frac=1.0, random_state=seed)
    train, test = labels.iloc[:n_train], labels.iloc[n_train:n_train + n_test]
    for split, frame in (("train", train), ("test", test)):
        (root / split).mkdir(parents=True)
        for image_id in frame["id"]:
            os.link(CIFAR / "train" / f"{image_id}.jpg", root / split / f"{image_id}.jpg")
    train.to_csv(root / "labels.csv", index=False)
    pd.DataFrame({"id": test["id"], "cat": 0.5, "dog": 0.5}).to_csv(root / "sample_submission.csv", index=False)
    return test.set_index("id")["label"]


def test_log_loss(csv: Path, truth: pd.Series) -> float:
    sub = pd.read_csv(csv, dtype={"id": str}).set_index("id").loc[truth.index]
    return float(log_loss(truth.map({c: i for i, c in enumerate(CLASSES)}), sub[CLASSES].to_numpy(), labels=[0, 1]))


def printed_scores(out: Path) -> tuple[float, float]:
    """The holdout run's validation log loss as it reports it, and the fold run's CV log loss."""
    holdout = out / "holdout"
    done = holdout / "holdout" / "done.json"
    if done.is_file():  # the member layout: the kept weights' score
        record = json.loads(done.read_text())
        valid = (record.get("kept") or {}).get("metric", record["best"]["metric"])
    else:  # 8914f4d: the best epoch's score at the run's root
        valid = json.loads((holdout / "done.json").read_text())["best"]["metric"]
    return float(valid), float(json.loads((out / "folds" / "cv.json").read_text())["cv"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--code", type=Path, default=ROOT, help="the checkout whose package runs the chain")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.01)
    args = parser.parse_args()
    if not (CIFAR.is_dir() and WEIGHTS.is_file()):
        print(f"skipped: {CIFAR} or {WEIGHTS} is absent")
        return
    tmp = Path(tempfile.mkdtemp(prefix="bench-honest-"))
    truth = write_download(tmp / "raw")
    env = {**os.environ, "PYTHONPATH": str(args.code.resolve())}
    subprocess.run([sys.executable, "-c", DRIVER, str(tmp / "raw"), str(tmp), str(WEIGHTS), str(args.epochs), str(args.lr)],
                   check=True, env=env, cwd=args.code)
    valid, cv = printed_scores(tmp)
    print(f"code {args.code.resolve()}, {args.epochs} epochs at lr {args.lr}, 120 training images, 600 test images")
    print(f"{'run':<10} {'printed log loss':>17} {'test log loss':>14} {'gap':>8}")
    for name, printed, csv in (("holdout", valid, "holdout.csv"), ("3 folds", cv, "folds.csv")):
        true = test_log_loss(tmp / csv, truth)
        print(f"{name:<10} {printed:>17.4f} {true:>14.4f} {true - printed:>+8.4f}")


if __name__ == "__main__":
    main()
