"""The report's pure core: tables and matplotlib figures of predictions frames and metrics.

Every function here is a pure function of frames and arrays; figures are built
without pyplot (no global state, no display: headless by construction).
pipeline/report/build.py reads a run and writes these out.

A "predictions frame" has the layout of the out-of-fold predictions: columns
id, label, then one probability column per class in reorg.json's order.
"""
from __future__ import annotations

import math
import textwrap

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pipeline.errors import PipelineError

GRID_SIZE = 9  # images in the sample and mistake grids (3 x 3, as in the tutorial)
ANNOTATE_MAX_CLASSES = 20  # above this the confusion matrix shows colour only
TICKS_MAX_CLASSES = 150  # above this its class names are left out
DPI = 120
CONFUSION_MAX_CLASSES = 25  # above this the matrix is unreadable: confused pairs and per-class accuracy instead
PAIRS_SHOWN = 20  # most confused pairs in their figure and table
WORST_SHOWN, BEST_SHOWN = 30, 10  # classes in the per-class figure when there are more
PATH_TITLE_CHARS = 70  # a predict-image title keeps this many characters of the path, its end


# ---------------------------------------------------------------- pure core


def top_k(probs: np.ndarray, classes: list[str], k: int) -> list[tuple[str, float]]:
    """The ``k`` most probable classes of one (C,) row, most probable first."""
    order = np.argsort(-probs, kind="stable")[:k]
    return [(classes[i], float(probs[i])) for i in order]


def _targets_and_probs(preds: pd.DataFrame, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(N,) true class indices and (N, C) probabilities of a predictions frame."""
    index = {c: i for i, c in enumerate(classes)}
    true = preds["label"].map(index)
    if true.isna().any():
        bad = preds["label"][true.isna()].iloc[0]
        raise PipelineError(f"label {bad!r} is not a class of this work folder; pass the --work-dir the run used")
    return true.to_numpy(dtype=np.int64), preds[classes].to_numpy(dtype=np.float64)


def confusion_counts(preds: pd.DataFrame, classes: list[str]) -> np.ndarray:
    """(C, C) counts of a predictions frame: row = true class, column = argmax class."""
    true, probs = _targets_and_probs(preds, classes)
    matrix = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(matrix, (true, probs.argmax(axis=1)), 1)
    return matrix


def top_confused_pairs(preds: pd.DataFrame, classes: list[str], k: int = PAIRS_SHOWN) -> pd.DataFrame:
    """The ``k`` most frequent mistakes: columns true, predicted, count, share.

    share is count over the true class's images. Most frequent first; ties go
    to the larger share, then to the class order.
    """
    matrix = confusion_counts(preds, classes)
    totals = matrix.sum(axis=1)
    np.fill_diagonal(matrix, 0)  # right predictions are not pairs
    true, predicted = np.nonzero(matrix)  # row-major: the class order breaks the remaining ties
    names = np.asarray(classes, dtype=object)
    counts = matrix[true, predicted]
    frame = pd.DataFrame({"true": names[true], "predicted": names[predicted], "count": counts,
                          "share": counts / np.maximum(totals[true], 1)})
    return frame.sort_values(["count", "share"], ascending=False, kind="stable").head(k).reset_index(drop=True)


def per_class_accuracy(preds: pd.DataFrame, classes: list[str], absent: np.ndarray | None = None) -> pd.DataFrame:
    """Accuracy of each true class, worst first: columns class, n, accuracy, mean_p_true, absent.

    mean_p_true is the mean probability given to the true class (ties in
    accuracy go to the lower one). A class without images has n 0 and NaN, last.
    ``absent`` (N,) marks the rows whose class was absent from the training rows of
    the member that predicted them; the column ``absent`` counts them per class.
    """
    true, probs = _targets_and_probs(preds, classes)
    c = len(classes)
    n = np.bincount(true, minlength=c)
    right = np.bincount(true, weights=(probs.argmax(axis=1) == true).astype(np.float64), minlength=c)
    p_true = np.bincount(true, weights=probs[np.arange(len(true)), true], minlength=c)
    missing = np.bincount(true, weights=_absent(absent, len(true)), minlength=c).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        frame = pd.DataFrame({"class": classes, "n": n, "accuracy": right / n, "mean_p_true": p_true / n,
                              "absent": missing})
    return frame.sort_values(["accuracy", "mean_p_true"], kind="stable", na_position="last").reset_index(drop=True)


def _absent(absent: np.ndarray | None, n: int) -> np.ndarray:
    """(N,) bool: the rows whose class the predicting member never trained on (none when unknown)."""
    return np.zeros(n, dtype=bool) if absent is None else np.asarray(absent, dtype=bool)


def most_wrong(preds: pd.DataFrame, classes: list[str], k: int = GRID_SIZE,
               absent: np.ndarray | None = None) -> pd.DataFrame:
    """The ``k`` wrong predictions that gave the true class the least probability.

    Columns id, label, predicted, p_true, p_predicted, absent; lowest p_true
    first (ties keep the frame's order). ``absent`` (N,) marks rows whose class
    the predicting member never trained on: missing data, not a model mistake,
    so they come after the model's mistakes (and their column says so).
    """
    true, probs = _targets_and_probs(preds, classes)
    predicted = probs.argmax(axis=1)
    rows = np.arange(len(true))
    frame = pd.DataFrame({"id": preds["id"].to_numpy(), "label": preds["label"].to_numpy(),
                          "predicted": np.asarray(classes, dtype=object)[predicted],
                          "p_true": probs[rows, true], "p_predicted": probs[rows, predicted],
                          "absent": _absent(absent, len(true))})
    wrong = frame[predicted != true]
    return wrong.sort_values(["absent", "p_true"], kind="stable").head(k).reset_index(drop=True)


def accuracy_of(preds: pd.DataFrame, classes: list[str]) -> float:
    """Share of a predictions frame's rows whose most probable class is the label (NaN if none)."""
    true, probs = _targets_and_probs(preds, classes)
    return float((probs.argmax(axis=1) == true).mean()) if len(true) else math.nan


def validation_scores(preds: pd.DataFrame, classes: list[str], metric: str = "accuracy") -> dict[str, float]:
    """Accuracy, log loss and the competition's ``metric`` of a predictions frame, by name (NaN if empty).

    Binary competitions order their classes [other, positive], so roc_auc scores the second.
    """
    from pipeline.metrics import score  # sklearn loads only when the report scores

    true, probs = _targets_and_probs(preds, classes)
    from pipeline.metrics import reported_metrics

    names = tuple(dict.fromkeys((metric, *reported_metrics(metric))))  # the competition's first, once
    return score(probs, true, len(classes), names)


def best_epoch(frame: pd.DataFrame, metric: str) -> int | None:
    """The epoch of a metrics.csv frame with the best ``valid_<metric>`` in the metric's direction;
    None without that column or a finite value (the first epoch wins a tie, as in training)."""
    from pipeline.metrics import check_metric

    column = f"valid_{metric}"
    if column not in frame or "epoch" not in frame:
        return None
    values = pd.to_numeric(frame[column], errors="coerce")
    values = values[np.isfinite(values)]
    if values.empty:
        return None
    at = values.idxmax() if check_metric(metric).greater_is_better else values.idxmin()
    return int(frame.loc[at, "epoch"])


ABSENT_COLUMN = "class absent from training"  # the tables' name for the ``absent`` column


def validation_tables(preds: pd.DataFrame, classes: list[str],
                      absent: np.ndarray | None = None) -> dict[str, pd.DataFrame]:
    """The report's tables of a predictions frame, by heading (``absent``: see :func:`most_wrong`)."""
    wrong = most_wrong(preds, classes, PAIRS_SHOWN, absent).rename(columns={"label": "true", "absent": ABSENT_COLUMN})
    per_class = per_class_accuracy(preds, classes, absent).rename(columns={"absent": f"{ABSENT_COLUMN} (images)"})
    return {"most confused pairs": top_confused_pairs(preds, classes),
            "most wrong (lowest probability on the true class; the model's mistakes first)": wrong,
            "per-class accuracy (worst first)": per_class}


def mistake_titles(wrong: pd.DataFrame) -> list[str]:
    """'id' over 'true → predicted (p_true)' for each row of :func:`most_wrong`; a row whose class its
    member never trained on says so."""
    return [f"{r.id}\n{r.label} → {r.predicted} ({_probability(r.p_true)})"
            + ("\nclass absent from training" if getattr(r, "absent", False) else "")
            for r in wrong.itertuples(index=False)]


def _probability(p: float) -> str:
    # a confident mistake gives its true class 1e-5, which three decimals would show as 0.000
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def shorten_left(text: str, width: int = PATH_TITLE_CHARS) -> str:
    """``text`` in at most ``width`` characters, cut from the left: a path keeps its file name."""
    return text if len(text) <= width else "…" + text[len(text) - width + 1:]


def prediction_frame(ids: list[str], targets: list[int], probs: np.ndarray, classes: list[str],
                     labels: list[str] | None = None) -> pd.DataFrame:
    """A predictions frame from ids, class indices and (N, C) probabilities; ``labels``: the targets as text
    already (the other task kinds: pipeline/models/task.py's target_text), else the class names of ``targets``."""
    frame = pd.DataFrame(probs, columns=classes)
    frame.insert(0, "label", labels if labels is not None else [classes[t] for t in targets])
    frame.insert(0, "id", ids)
    return frame


# ---------------------------------------------------------------- figures


def confusion_figure(matrix: np.ndarray, classes: list[str], title: str = "", axis: str = "class") -> Figure:
    """The confusion matrix, coloured by share of each true class; counts written up to 20 classes.
    ``axis`` names what the rows and columns are (class, grade)."""
    n = len(classes)
    side = min(18.0, max(5.0, 2.5 + 0.12 * n))
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    ax = fig.subplots()
    totals = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, shrink=0.6, aspect=30, label=f"share of the true {axis}")
    ax.set(xlabel=f"predicted {axis}", ylabel=f"true {axis}", title=title)
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


def message_figure(title: str, text: str) -> Figure:
    """A small figure that says ``text`` (under ``title``): nothing to draw."""
    fig = Figure(figsize=(6, 2.5), layout="constrained")
    fig.text(0.5, 0.5, f"{title}\n{text}" if title else text, ha="center", va="center")
    return fig


def _show(ax, image: np.ndarray) -> None:
    # tiny images (CIFAR's 32 px) show their pixels instead of a blur
    ax.imshow(image, interpolation="nearest" if max(image.shape[:2]) < 128 else "antialiased")
    ax.axis("off")


def _ranked_bars(ax, labels: list[str], values, texts: list[str], colour) -> None:
    """Horizontal bars, the first on top, each labelled at its end."""
    bars = ax.barh(range(len(labels)), values, color=colour)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.bar_label(bars, texts, fontsize=7, padding=2)
    ax.grid(axis="x", alpha=0.3)


def confused_pairs_figure(pairs: pd.DataFrame, title: str = "") -> Figure:
    """Bars of :func:`top_confused_pairs`: 'true → predicted' by count, the most frequent on top."""
    heading = "most confused pairs (true → predicted)" + (f"\n{title}" if title else "")
    if pairs.empty:
        return message_figure(heading, "no mistakes")
    fig = Figure(figsize=(8, 1.4 + 0.26 * len(pairs)), layout="constrained")
    ax = fig.subplots()
    _ranked_bars(ax, [f"{t} → {p}" for t, p in zip(pairs["true"], pairs["predicted"])], pairs["count"],
                 [f"{c} ({s:.0%} of its class)" for c, s in zip(pairs["count"], pairs["share"])], "tab:red")
    ax.margins(x=0.3)  # room for the bar labels
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="validation images", title=heading)
    return fig


def per_class_figure(table: pd.DataFrame, worst: int = WORST_SHOWN, best: int = BEST_SHOWN) -> Figure:
    """Accuracy bars of a :func:`per_class_accuracy` table, worst on top, mean p(true) as a tick.

    With more classes than ``worst + best`` only the worst and the best are
    drawn, a dotted line between them, so every label stays readable.
    """
    scored = table[table["n"] > 0]
    if scored.empty:
        return message_figure("per-class accuracy", "no validation images")
    cut = len(scored) > worst + best
    shown = pd.concat([scored.head(worst), scored.tail(best)]) if cut else scored
    fig = Figure(figsize=(8, 1.6 + 0.24 * len(shown)), layout="constrained")
    ax = fig.subplots()
    accuracy = shown["accuracy"].to_numpy()
    missing = shown["absent"].to_numpy() if "absent" in shown else np.zeros(len(shown), dtype=int)
    labels = [f"{c} ({k})" + (" absent" if m else "") for c, k, m in zip(shown["class"], shown["n"], missing)]
    _ranked_bars(ax, labels, accuracy, [f"{a:.2f}" for a in accuracy], colormaps["RdYlGn"](accuracy))
    for row, (bar, m) in enumerate(zip(ax.patches, missing)):
        if m:  # missing data, not a model mistake: a shaded row (a 0-accuracy bar has no width to hatch)
            bar.set_hatch("//")
            ax.axhspan(row - 0.45, row + 0.45, color="0.88", zorder=0)
    ax.plot(shown["mean_p_true"], range(len(shown)), "k|", markersize=9, label="mean p(true class)")
    if cut:
        ax.axhline(worst - 0.5, color="black", linestyle=":")
    which = f"; the worst {worst} and best {best} shown" if cut else ""
    n_absent = int((scored["absent"] > 0).sum()) if "absent" in scored else 0
    note = (f"\nshaded, 'absent': {n_absent} classes absent from the training rows\nof the member that "
            "predicted them (missing data, not mistakes)" if n_absent else "")
    ax.set(xlim=(0, 1.12), xlabel="accuracy (validation images of the class in brackets)",
           title=f"per-class accuracy, worst first\n({len(scored)} classes{which}){note}")
    ax.legend(loc="lower right", fontsize=8)
    return fig


def prediction_figure(image: np.ndarray, path_label: str, top: list[tuple[str, float]]) -> Figure:
    """An image beside bars of its top classes, titled with its path (shortened from the left)."""
    return predictions_figure([(image, path_label, top)])


def predictions_figure(entries: list[tuple[np.ndarray, str, list[tuple[str, float]]]]) -> Figure:
    """:func:`prediction_figure` for several (image, path, top) entries, one row each."""
    if not entries:
        return message_figure("", "no images")
    k = max(len(top) for _, _, top in entries)
    fig = Figure(figsize=(9, len(entries) * (1.0 + max(2.6, 0.3 * k))), layout="constrained")
    for row, (image, path_label, top) in zip(fig.subfigures(len(entries), 1, squeeze=False).ravel(), entries):
        ax_image, ax_bars = row.subplots(1, 2, width_ratios=[1, 1.4])
        _show(ax_image, image)
        _ranked_bars(ax_bars, [name for name, _ in top], [p for _, p in top], [f"{p:.3f}" for _, p in top],
                     "tab:blue")
        ax_bars.set(xlim=(0, 1.15), xlabel="probability")
        row.suptitle(shorten_left(path_label), fontsize=10)
    return fig


def validation_figures(preds: pd.DataFrame, classes: list[str], source: str,
                       scores: dict[str, float] | None = None, absent: np.ndarray | None = None
                       ) -> dict[str, Figure]:
    """Figures of a predictions frame by file name: the confusion matrix up to
    CONFUSION_MAX_CLASSES classes, else the most confused pairs and per-class accuracy.
    Titled with ``scores`` (:func:`validation_scores`; default: the accuracy); ``absent``
    (see :func:`most_wrong`) marks classes a member never trained on."""
    scores = scores if scores is not None else {"accuracy": accuracy_of(preds, classes)}
    title = f"{source}: {len(preds)} images, " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
    table = per_class_accuracy(preds, classes, absent)
    if len(classes) <= CONFUSION_MAX_CLASSES:
        marked = set(table.loc[table["absent"] > 0, "class"])
        names = [f"{c} (absent)" if c in marked else c for c in classes]
        return {"confusion_matrix.png": confusion_figure(confusion_counts(preds, classes), names, title)}
    return {"confused_pairs.png": confused_pairs_figure(top_confused_pairs(preds, classes), title),
            "per_class_accuracy.png": per_class_figure(table)}


def image_grid(images: list[np.ndarray], titles: list[str], title: str = "", empty: str = "no images",
               cols: int = 3) -> Figure:
    """(H, W, 3) uint8 images as they are on disk, ``cols`` a row, each under its title."""
    if not images:
        return message_figure(title, empty)
    cols = min(cols, len(images))
    rows = math.ceil(len(images) / cols)
    fig = Figure(figsize=(3.0 * cols, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, image, text in zip(axes, images, titles):
        _show(ax, image)
        lines = [part for line in text.splitlines() for part in textwrap.wrap(line, 32, break_on_hyphens=False)]
        ax.set_title("\n".join(lines), fontsize=9)
    if title:  # wrapped to the grid's width
        fig.suptitle("\n".join(textwrap.fill(line, 24 * cols + 4) for line in title.splitlines()))
    return fig
