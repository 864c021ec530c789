"""Small generated downloads of every task kind, images whose pixels carry the target (tests only).

Each writer makes a Kaggle-shaped folder and returns the spec fields that read it. The images are 16 px
squares: a model that looks at them can beat the constant prediction in a few steps.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

SIDE = 16
RECIPE = {"model": "fastnet_s", "image_size": 16, "batch_size": 8, "epochs": 2, "lr": 0.05}


def _image(path: Path, rng: np.random.Generator, channel_means: tuple[float, float, float],
           quadrants: tuple[int, ...] = ()) -> None:
    pixels = rng.normal(0, 18, (SIDE, SIDE, 3)) + np.asarray(channel_means)[None, None, :]
    half = SIDE // 2
    for q in quadrants:  # a bright quadrant per label
        r, c = divmod(q, 2)
        pixels[r * half:(r + 1) * half, c * half:(c + 1) * half] += 90
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)


def _level(value: float) -> tuple[float, float, float]:
    v = 30 + 190 * value
    return (v, v, v)


def spec_text(fields: dict, recipe: dict | None = None) -> str:
    from pipeline.download.specfile import toml_value

    lines = [f"{k} = {toml_value(v)}" for k, v in fields.items()]
    lines += ["", "[recipe]"] + [f"{k} = {toml_value(v)}" for k, v in (recipe or RECIPE).items()]
    return "\n".join(lines) + "\n"


BASE = {"title": "generated", "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "image_size": 16}


def names_download(raw: Path, n: int = 48, seed: int = 0) -> dict:
    """Label in the file name: train/<label>.<n>.png, test/<id>.png, sample id,label."""
    rng = np.random.default_rng(seed)
    labels = ["cat", "dog", "fox"]
    for i in range(n):
        k = i % 3
        _image(raw / "train" / f"{labels[k]}.{i}.png", rng, tuple(200 if c == k else 40 for c in range(3)))
    ids = [f"t{i:03d}" for i in range(12)]
    for i, image_id in enumerate(ids):
        _image(raw / "test" / f"{image_id}.png", rng, tuple(200 if c == i % 3 else 40 for c in range(3)))
    pd.DataFrame({"id": ids, "label": "cat"}).to_csv(raw / "sample_submission.csv", index=False)
    return {**BASE, "slug": "gen-names", "layout": "names", "label_pattern": r"(?P<label>[a-z]+)\.\d+",
            "id_column": "id", "train_dir": "train", "test_dir": "test", "image_ext": ".png",
            "sample_submission": "sample_submission.csv", "submission": "label", "metric": "accuracy"}


def _table_download(raw: Path, train: pd.DataFrame, test_ids: list[str], sample: pd.DataFrame,
                    images: dict[str, tuple], rng: np.random.Generator, test: pd.DataFrame | None = None) -> None:
    for image_id, (means, quads) in images.items():
        _image(raw / "images" / f"{image_id}.png", rng, means, quads)
    train.to_csv(raw / "train.csv", index=False)
    sample.to_csv(raw / "sample_submission.csv", index=False)
    if test is not None:
        test.to_csv(raw / "test.csv", index=False)


def onehot_download(raw: Path, n: int = 48, seed: int = 0, multi: bool = False) -> dict:
    """image_id + one 0/1 column per class (one-hot) or label (multi-hot, any number set)."""
    rng = np.random.default_rng(seed)
    names = ["healthy", "rust", "scab", "multiple diseases"]
    rows, images = [], {}
    for i in range(n):
        if multi:
            on = [k for k in range(4) if rng.random() < 0.35]
        else:
            on = [i % 4]
        rows.append({"image_id": f"Train_{i}", **{c: int(k in on) for k, c in enumerate(names)}})
        images[f"Train_{i}"] = ((60, 60, 60), tuple(on))
    test_ids = [f"Test_{i}" for i in range(12)]
    for i, t in enumerate(test_ids):
        images[t] = ((60, 60, 60), (i % 4,))
    sample = pd.DataFrame({"image_id": test_ids, **{c: 0.25 for c in names}})
    _table_download(raw, pd.DataFrame(rows), test_ids, sample, images, rng)
    return {**BASE, "slug": "gen-multihot" if multi else "gen-onehot", "task": "multilabel" if multi else "single",
            "layout": "csv", "labels_file": "train.csv", "label_columns": names, "id_column": "image_id",
            "train_dir": "images", "test_dir": "images", "test_file": "sample_submission.csv", "image_ext": ".png",
            "sample_submission": "sample_submission.csv", "submission": "probs",
            "metric": "mean_auc" if multi else "log_loss"}


def tags_download(raw: Path, n: int = 64, seed: int = 0) -> dict:
    """image_name,tags (space-separated), sample image_name,tags; F2 on the label sets."""
    rng = np.random.default_rng(seed)
    names = ["clear", "water", "road", "haze"]
    rows, images = [], {}
    for i in range(n):
        on = sorted({i % 4, *[k for k in range(4) if rng.random() < 0.25]})
        rows.append({"image_name": f"train_{i}", "tags": " ".join(names[k] for k in on)})
        images[f"train_{i}"] = ((60, 60, 60), tuple(on))
    test_ids = [f"test_{i}" for i in range(12)]
    for i, t in enumerate(test_ids):
        images[t] = ((60, 60, 60), (i % 4,))
    sample = pd.DataFrame({"image_name": test_ids, "tags": "clear"})
    _table_download(raw, pd.DataFrame(rows), test_ids, sample, images, rng)
    return {**BASE, "slug": "gen-tags", "task": "multilabel", "layout": "csv", "labels_file": "train.csv",
            "label_column": "tags", "label_separator": " ", "id_column": "image_name", "train_dir": "images",
            "test_dir": "images", "test_file": "sample_submission.csv", "image_ext": ".png",
            "sample_submission": "sample_submission.csv", "submission": "tags", "metric": "f_beta_samples",
            "beta": 2.0}


def regression_download(raw: Path, n: int = 60, seed: int = 0) -> dict:
    """Id, two metadata columns, Pawpularity (1..100); test.csv with the metadata; sample Id,Pawpularity."""
    rng = np.random.default_rng(seed)
    value = rng.uniform(0, 1, n)
    train = pd.DataFrame({"Id": [f"p{i}" for i in range(n)], "Eyes": rng.integers(0, 2, n),
                          "Group": rng.choice(["a", "b"], n), "Pawpularity": np.round(1 + 99 * value).astype(int)})
    images = {f"p{i}": (_level(v), ()) for i, v in enumerate(value)}
    test_ids = [f"q{i}" for i in range(10)]
    images.update({t: (_level(rng.uniform()), ()) for t in test_ids})
    test = pd.DataFrame({"Id": test_ids, "Eyes": rng.integers(0, 2, 10), "Group": rng.choice(["a", "b"], 10)})
    sample = pd.DataFrame({"Id": test_ids, "Pawpularity": 50.0})
    _table_download(raw, train, test_ids, sample, images, rng, test)
    return {**BASE, "slug": "gen-regression", "task": "regression", "layout": "csv", "labels_file": "train.csv",
            "label_column": "Pawpularity", "metadata": ["Eyes", "Group"], "id_column": "Id", "train_dir": "images",
            "test_dir": "images", "test_file": "test.csv", "image_ext": ".png",
            "sample_submission": "sample_submission.csv", "submission": "value", "metric": "rmse"}


def ordinal_download(raw: Path, n: int = 60, seed: int = 0) -> dict:
    """id_code,diagnosis (grades 0-4); sample id_code,diagnosis; QWK."""
    rng = np.random.default_rng(seed)
    grades = rng.integers(0, 5, n)
    train = pd.DataFrame({"id_code": [f"g{i}" for i in range(n)], "diagnosis": grades})
    images = {f"g{i}": (_level(g / 4), ()) for i, g in enumerate(grades)}
    test_ids = [f"h{i}" for i in range(10)]
    images.update({t: (_level(rng.integers(0, 5) / 4), ()) for t in test_ids})
    sample = pd.DataFrame({"id_code": test_ids, "diagnosis": 0})
    _table_download(raw, train, test_ids, sample, images, rng)
    return {**BASE, "slug": "gen-ordinal", "task": "ordinal", "layout": "csv", "labels_file": "train.csv",
            "label_column": "diagnosis", "id_column": "id_code", "train_dir": "images", "test_dir": "images",
            "test_file": "sample_submission.csv", "image_ext": ".png", "sample_submission": "sample_submission.csv",
            "submission": "grade", "metric": "qwk"}


def patients_download(raw: Path, n_patients: int = 20, seed: int = 0) -> dict:
    """Binary melanoma-like: image_name, patient_id (1-5 images each), sex, age, target; test.csv."""
    rng = np.random.default_rng(seed)
    rows, images = [], {}
    for p in range(n_patients):
        sick = p % 3 == 0
        for j in range(rng.integers(1, 6)):
            name = f"ISIC_{p:02d}_{j}"
            rows.append({"image_name": name, "patient_id": f"IP_{p:03d}", "sex": "male" if p % 2 else "female",
                         "age_approx": 30 + 5 * (p % 8), "target": int(sick)})
            images[name] = (_level(0.8 if sick else 0.2), ())
    test_ids = [f"ISIC_t{i}" for i in range(8)]
    images.update({t: (_level(0.8 if i % 2 else 0.2), ()) for i, t in enumerate(test_ids)})
    test = pd.DataFrame({"image_name": test_ids, "patient_id": [f"IP_{100 + i}" for i in range(8)],
                         "sex": "male", "age_approx": 50})
    sample = pd.DataFrame({"image_name": test_ids, "target": 0.0})
    _table_download(raw, pd.DataFrame(rows), test_ids, sample, images, rng, test)
    return {**BASE, "slug": "gen-patients", "layout": "csv", "labels_file": "train.csv", "label_column": "target",
            "group_column": "patient_id", "metadata": ["sex", "age_approx"], "id_column": "image_name",
            "train_dir": "images", "test_dir": "images", "test_file": "test.csv", "image_ext": ".png",
            "sample_submission": "sample_submission.csv", "submission": "binary", "metric": "roc_auc"}


WRITERS = {"names": names_download, "onehot": onehot_download,
           "multihot": lambda raw: onehot_download(raw, multi=True), "tags": tags_download,
           "regression": regression_download, "ordinal": ordinal_download, "patients": patients_download}
