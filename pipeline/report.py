"""Pictures of a run, and predictions for single image files.

The figures are pure functions of frames and arrays that return a matplotlib
``Figure`` built without pyplot (no global state, no display: headless by
construction). :func:`write_report` gathers their inputs from a run and its
work folder and is the only function here that writes files.

A "predictions frame" has the layout of the out-of-fold predictions: columns id, label, then one
probability column per class in reorg.json's order.
"""
from __future__ import annotations

import logging
import math
import re
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from pipeline.data import (
    Item,
    fold_split,
    list_split,
    load_reorg,
    read_image,
)
from pipeline.errors import PipelineError
from pipeline.io import atomic_save, read_csv
from pipeline.predict import predict_items
from pipeline.runs import HOLDOUT, Member, Run

log = logging.getLogger("pipeline")

GRID_SIZE = 9  # images in the sample and mistake grids (3 x 3, as in the tutorial)
ANNOTATE_MAX_CLASSES = 20  # above this the confusion matrix shows colour only
TICKS_MAX_CLASSES = 150  # above this its class names are left out
DPI = 120


# ---------------------------------------------------------------- pure core


def top_k(probs: np.ndarray, classes: list[str], k: int) -> list[tuple[str, float]]:
    """The ``k`` most probable classes of one (C,) row, most probable first."""
    order = np.argsort(-probs, kind="stable")[:k]
    return [(classes[i], float(probs[i])) for i in order]


def confusion_counts(preds: pd.DataFrame, classes: list[str]) -> np.ndarray:
    """(C, C) counts of a predictions frame: row = true class, column = argmax class."""
    index = {c: i for i, c in enumerate(classes)}
    true = preds["label"].map(index)
    if true.isna().any():
        bad = preds["label"][true.isna()].iloc[0]
        raise PipelineError(f"label {bad!r} is not a class of this work folder; pass the --work-dir the run used")
    predicted = preds[classes].to_numpy(dtype=np.float64).argmax(axis=1)
    matrix = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(matrix, (true.to_numpy(dtype=np.int64), predicted), 1)
    return matrix


def confidently_wrong(preds: pd.DataFrame, classes: list[str], k: int = GRID_SIZE) -> pd.DataFrame:
    """The ``k`` wrong predictions with the highest probability on the predicted class.

    Columns id, label, predicted, probability; most confident first.
    """
    probs = preds[classes].to_numpy(dtype=np.float64)
    frame = pd.DataFrame({"id": preds["id"].to_numpy(), "label": preds["label"].to_numpy(),
                          "predicted": np.asarray(classes)[probs.argmax(axis=1)],
                          "probability": probs.max(axis=1)})
    wrong = frame[frame["predicted"] != frame["label"]]
    return wrong.sort_values("probability", ascending=False, kind="stable").head(k).reset_index(drop=True)


def prediction_frame(ids: list[str], targets: list[int], probs: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """A predictions frame from ids, class indices and (N, C) probabilities."""
    frame = pd.DataFrame(probs, columns=classes)
    frame.insert(0, "label", [classes[t] for t in targets])
    frame.insert(0, "id", ids)
    return frame


# ---------------------------------------------------------------- figures


def learning_curves_figure(metrics: dict[str, pd.DataFrame]) -> Figure:
    """Loss per epoch (train solid, valid dashed) and valid accuracy, one colour per member.

    For a log-loss competition the metric is the valid loss of the left panel.
    """
    has_valid = any("valid_accuracy" in m for m in metrics.values())
    fig = Figure(figsize=(11 if has_valid else 6, 4.2), layout="constrained")
    axes = fig.subplots(1, 2 if has_valid else 1, squeeze=False)[0]
    colours = colormaps["tab10"]
    for i, (name, m) in enumerate(metrics.items()):
        style = dict(color=colours(i % 10), marker="o" if len(m) <= 30 else None, markersize=3)
        axes[0].plot(m["epoch"], m["train_loss"], label=name, **style)
        if "valid_loss" in m:
            axes[0].plot(m["epoch"], m["valid_loss"], linestyle="--", **style)
        if has_valid and "valid_accuracy" in m:
            axes[-1].plot(m["epoch"], m["valid_accuracy"], label=name, **style)
    axes[0].set(title="loss", xlabel="epoch", ylabel="cross-entropy")
    kinds = [Line2D([], [], color="black", label="train loss"),
             Line2D([], [], color="black", linestyle="--", label="valid loss")]
    members, _ = axes[0].get_legend_handles_labels()
    fig.legend(handles=members + (kinds if has_valid else kinds[:1]), loc="outside right upper", fontsize=8)
    if has_valid:
        axes[1].set(title="valid accuracy", xlabel="epoch", ylabel="accuracy")
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    return fig


def confusion_figure(matrix: np.ndarray, classes: list[str], title: str = "") -> Figure:
    """The confusion matrix, coloured by share of each true class; counts written up to 20 classes."""
    n = len(classes)
    side = min(18.0, max(5.0, 2.5 + 0.12 * n))
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    ax = fig.subplots()
    totals = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, shrink=0.6, aspect=30, label="share of the true class")
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    if n <= TICKS_MAX_CLASSES:
        size = 9 if n <= ANNOTATE_MAX_CLASSES else 6 if n <= 60 else 4
        ax.set_xticks(range(n), classes, rotation=90, fontsize=size)
        ax.set_yticks(range(n), classes, fontsize=size)
    else:
        ax.set(xticks=[], yticks=[])
    if n <= ANNOTATE_MAX_CLASSES:
        for i, j in zip(*np.nonzero(matrix)):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if share[i, j] > 0.5 else "black")
    return fig


def image_grid(images: list[np.ndarray], titles: list[str], title: str = "", empty: str = "no images",
               cols: int = 3) -> Figure:
    """(H, W, 3) uint8 images as they are on disk, ``cols`` a row, each under its title."""
    if not images:
        fig = Figure(figsize=(6, 2.5), layout="constrained")
        fig.text(0.5, 0.5, f"{title}\n{empty}" if title else empty, ha="center", va="center")
        return fig
    cols = min(cols, len(images))
    rows = math.ceil(len(images) / cols)
    fig = Figure(figsize=(3.0 * cols, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, image, text in zip(axes, images, titles):
        # tiny images (CIFAR's 32 px) show their pixels instead of a blur
        ax.imshow(image, interpolation="nearest" if max(image.shape[:2]) < 128 else "antialiased")
        lines = [part for line in text.splitlines() for part in textwrap.wrap(line, 32, break_on_hyphens=False)]
        ax.set_title("\n".join(lines), fontsize=9)
    if title:
        fig.suptitle(title)
    return fig


# ---------------------------------------------------------------- single images


def decode_image(path: Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB, or an error naming the file."""
    try:
        return read_image(Path(path))
    except Exception as exc:  # PIL raises many types for missing and broken files
        raise PipelineError(f"cannot read image {path} ({exc}); check the path and that it is an image file") from None


def predict_images(run_dir: Path, paths: list[Path], members: str = "auto", tta: str = "none",
                   device: str = "auto") -> tuple[list[str], np.ndarray]:
    """Class names and (N, C) softmax of image files, averaged over the run's members."""
    items = [Item(str(path), Path(path), -1) for path in paths]
    _, probs, classes = predict_items(Run(run_dir).finished(members), items, tta=tta, device=device)
    return classes, probs


# ---------------------------------------------------------------- a run's inputs


def _natural_key(name: str) -> tuple:
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def read_metrics(run_dir: Path) -> dict[str, pd.DataFrame]:
    """Every member's metrics.csv, by member name (holdout, fold0, ..., full)."""
    found = {m.name: m.metrics() for m in Run(run_dir).members() if m.metrics_path.is_file()}
    if not found:
        raise PipelineError(f"no member with metrics under {run_dir}; is it a training run that finished an epoch?")
    return found


def _valid_items(member: Member, work_dir: Path, info: dict) -> list[Item]:
    if member.fold is not None:
        return fold_split(work_dir, info, member.fold)[1]
    return list_split(work_dir, info, "valid") if member.kind == HOLDOUT else []


def validation_predictions(run_dir: Path, work_dir: Path, info: dict, device: str = "auto") -> pd.DataFrame:
    """The run's predictions frame over validation images: oof.csv, else computed per member.

    Computing covers a holdout run and folds still training; a --full member
    has no validation images and adds nothing.
    """
    classes = info["classes"]
    run = Run(run_dir)
    oof_path = run.oof_path
    if oof_path.is_file():
        frame = read_csv(oof_path, what="out-of-fold predictions")
        missing = [c for c in ("id", "label", *classes) if c not in frame.columns]
        if missing:
            raise PipelineError(f"{oof_path} lacks columns {missing[:5]}; pass the --work-dir the run used")
        frame[classes] = frame[classes].astype(np.float64)
        return frame
    frames = []
    for member in run.finished("all"):
        items = _valid_items(member, work_dir, info)
        if items:
            ids, probs, _ = predict_items([member], items, device=device, unreadable="drop")
            if probs.shape[1] != len(classes):
                raise PipelineError(f"{member.dir} predicts {probs.shape[1]} classes, {work_dir} has {len(classes)}; "
                                    "pass the --work-dir the run used")
            target = {it.id: it.target for it in items}
            frames.append(prediction_frame(ids, [target[i] for i in ids], probs, classes))
    if not frames:
        return prediction_frame([], [], np.zeros((0, len(classes))), classes)
    return pd.concat(frames, ignore_index=True)


def _readable(items: list[Item]) -> list[tuple[Item, np.ndarray]]:
    """Decoded images of ``items``; a broken file is skipped (training skips it too)."""
    out = []
    for item in items:
        try:
            out.append((item, decode_image(item.path)))
        except PipelineError as exc:
            log.warning("report: %s", exc)
    return out


# ---------------------------------------------------------------- writing


def training_images_figure(work_dir: Path, info: dict, seed: int = 0) -> Figure:
    """A 3 x 3 grid of random WORK_DIR/train images under their class names."""
    items = list_split(work_dir, info, "train")
    rng = np.random.default_rng(seed)
    picked = [items[i] for i in rng.choice(len(items), min(GRID_SIZE, len(items)), replace=False)]
    shown = _readable(picked)
    return image_grid([image for _, image in shown], [info["classes"][it.target] for it, _ in shown],
                      title=f"training images ({len(shown)} of {len(items)})", empty="no readable images")


def mistakes_figure(preds: pd.DataFrame, classes: list[str], paths: dict[str, Path]) -> Figure:
    """The most confidently wrong validation images with true and predicted class."""
    wrong = confidently_wrong(preds, classes)
    rows = {r.id: r for r in wrong.itertuples(index=False)}
    shown = _readable([Item(i, paths[i], -1) for i in wrong["id"] if i in paths])
    titles = [f"{it.id}: true {rows[it.id].label}\npredicted {rows[it.id].predicted} {rows[it.id].probability:.3f}"
              for it, _ in shown]
    return image_grid([image for _, image in shown], titles, title="most confidently wrong (validation)",
                      empty="every validation image is predicted correctly")


def save_figure(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as a PNG, atomically."""
    atomic_save(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    return Path(path)


def write_report(run_dir: Path, work_dir: Path, out_dir: Path, device: str = "auto") -> list[Path]:
    """The run's four PNGs in ``out_dir``: curves, confusion matrix, training images, mistakes."""
    run_dir, work_dir, out_dir = Path(run_dir), Path(work_dir), Path(out_dir)
    info = load_reorg(work_dir)
    classes = info["classes"]
    figures = {"learning_curves.png": learning_curves_figure(read_metrics(run_dir)),
               "train_images.png": training_images_figure(work_dir, info)}
    preds = validation_predictions(run_dir, work_dir, info, device)
    if len(preds):
        matrix = confusion_counts(preds, classes)
        source = "out-of-fold" if Run(run_dir).oof_path.is_file() else "validation"
        title = f"{source}: {len(preds)} images, accuracy {np.trace(matrix) / len(preds):.4f}"
        figures["confusion_matrix.png"] = confusion_figure(matrix, classes, title)
        paths = {it.id: it.path for it in list_split(work_dir, info, "train_valid")}
        figures["most_wrong.png"] = mistakes_figure(preds, classes, paths)
    else:
        log.warning("%s has no validation predictions (a --full run?): no confusion matrix or mistakes", run_dir)
    return [save_figure(fig, out_dir / name) for name, fig in figures.items()]
