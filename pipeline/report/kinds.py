"""The report's tables and figures for the task kinds other than single-label (pure, like figures.py).

A predictions frame here has oof.csv's layout for every kind: id, label (the
target as text: labels joined by LABEL_JOIN, a number, a grade; pipeline/models/task.py's
``target_text``), then one column per output name. What each kind shows:

- multilabel: per label its prevalence, out-of-fold ROC AUC, the threshold the
  test set gets (fitted on every out-of-fold row, cv.json's ``decision``), the
  thresholds each fold was decided with and that label's F-beta of the nested
  decisions; the decision's nested, in-sample and default-threshold scores.
- regression: predicted against true and the residuals, out of fold, RMSE and
  MAE, each member's training range (predictions are clipped to it).
- ordinal: the confusion matrix of grades (true grade x the grade the nested
  decision gives: each fold cut with the cuts fitted on the other folds, the
  decision the nested QWK scores), the cuts, the decision's scores.

The nested decisions are remade from what cv.json records (each fold's
thresholds, by folds.csv's fold of each row) with Task.decide, the function
that made them; without a fitted decision the task's thresholds (default) decide.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from pipeline.report.figures import GRID_SIZE, confusion_figure, image_grid, message_figure
from pipeline.models.task import LABEL_JOIN, Task

DECISION_ROWS = (("nested", "fitted on the other folds of each row's fold (the CV reported)"),
                 ("in_sample", "fitted on every out-of-fold row: optimistic (the test set gets these)"),
                 ("default", "the defaults: {default}"))
DEFAULTS = {"multilabel": "0.5 per label", "ordinal": "cuts half-way between grades"}
SCATTER_MAX_POINTS = 20_000  # above this the scatter draws a random sample (every point still scored)
LARGEST_SHOWN = 20  # rows of the largest-residuals table


@dataclass(frozen=True)
class KindInputs:
    """What a kind's figures read: the validation predictions and what the run recorded about them."""

    preds: pd.DataFrame  # id, label, one column per output name
    task: Task  # the work folder's (pipeline/models/task.py)
    source: str  # "out-of-fold" or "validation"
    metric: str  # the competition's
    decision: dict | None = None  # cv.json's fitted decision
    folds: pd.Series | None = None  # fold by image id (folds.csv)
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)  # member -> training range
    beta: float = 1.0
    absent: np.ndarray | None = None  # single-label: rows whose class their member never trained on
    paths: dict[str, Path] = field(default_factory=dict)  # image file by id
    read: Callable[[list[str]], list[tuple[str, np.ndarray]]] | None = None  # ids -> their readable images


# ---------------------------------------------------------------- every kind


def outputs_and_targets(preds: pd.DataFrame, task: Task) -> tuple[np.ndarray, np.ndarray]:
    """(N, K) outputs (columns by the task's names) and targets (the task's shape) of a predictions frame."""
    return preds[list(task.names)].to_numpy(dtype=np.float64), task.targets_from_text(preds["label"])


def decided(task: Task, outputs: np.ndarray, ids, decision: dict | None, folds: pd.Series | None) -> np.ndarray:
    """The decisions the CV scored: with cv.json's ``decision``, each row by the thresholds fitted without
    its fold (nested); otherwise the task's own thresholds."""
    per_fold = (decision or {}).get("per_fold") or {}
    if not per_fold or folds is None:
        return task.decide(outputs).reshape(len(outputs), -1)
    fold_of = folds.loc[list(ids)].to_numpy()
    out = np.zeros((len(outputs), outputs.shape[1] if task.kind == "multilabel" else 1))
    for fold, cuts in per_fold.items():
        rows = fold_of == int(fold)
        if rows.any():
            out[rows] = task.with_thresholds(cuts).decide(outputs[rows]).reshape(int(rows.sum()), -1)
    return out


def decision_table(decision: dict | None, metric: str, kind: str) -> pd.DataFrame:
    """cv.json's decision scores, one row each: nested (reported), in-sample (optimistic), default."""
    if not decision:
        return pd.DataFrame(columns=["thresholds", metric, "what"])
    return pd.DataFrame([{"thresholds": key.replace("_", "-"), metric: float(decision[key]),
                          "what": what.format(default=DEFAULTS.get(kind, ""))}
                         for key, what in DECISION_ROWS if key in decision])


def decision_line(decision: dict | None, metric: str) -> str | None:
    """One summary line of the decision's scores (None without a fitted decision)."""
    if not decision:
        return None
    return (f"{metric} {decision['nested']:.4f} nested (thresholds fitted on the other folds); "
            f"in-sample {decision['in_sample']:.4f} (optimistic); default thresholds {decision['default']:.4f}")


def task_text(task: Task) -> str:
    """'multilabel: 4 labels', 'regression of Pawpularity', 'ordinal: 5 grades (0 .. 4) of diagnosis'."""
    if task.kind == "multilabel":
        return f"multilabel: {len(task.names)} labels, a sigmoid each"
    if task.kind == "regression":
        return f"regression of {task.names[0]} ({task.loss} loss)"
    if task.kind == "ordinal":
        return (f"ordinal: {len(task.grades)} grades ({task.grades[0]} .. {task.grades[-1]}) of {task.names[0]}, "
                f"read as a number ({task.loss} loss) and cut into grades")
    return f"single-label: {len(task.names)} classes"


def metadata_text(columns, encoding: dict | None = None) -> str:
    """The metadata columns a run used: the work folder's list, or how a member encoded each (its plan's
    MetaEncoder record: numeric columns standardised on its training rows, others one-hot over their categories)."""
    if not encoding:
        return ", ".join(columns) + " (not encoded by any member)" if columns else "none"
    numeric = {c for c, _, _ in encoding.get("numeric", ())}
    categories = {c: list(v) for c, v in encoding.get("categorical", ())}
    shown = []
    for c in encoding.get("columns") or [*numeric, *categories]:
        if c in numeric:
            shown.append(f"{c} (standardised)")
        else:
            v = categories.get(c, [])
            shown.append(f"{c} (one-hot: {', '.join(map(str, v[:6]))}{', ...' if len(v) > 6 else ''})")
    return ", ".join(shown)


def metadata_table(encodings: dict[str, dict]) -> pd.DataFrame:
    """One row per member, one column per metadata column: the mean and std it standardised with, or the
    categories it one-hot encoded (each member fits its own on its training rows)."""
    rows = []
    for member, enc in encodings.items():
        row = {"member": member}
        row.update({c: f"mean {float(m):.4g}, std {float(s):.4g}" for c, m, s in enc.get("numeric", ())})
        row.update({c: f"{len(v)} categories" for c, v in enc.get("categorical", ())})
        rows.append(row)
    return pd.DataFrame(rows)


def group_text(column: str, groups: pd.Series | None, folds: pd.Series | None) -> str:
    """'patient_id: 20 groups over 65 images; none in two folds' (``groups``: group by image id)."""
    if not column:
        return "none (rows split independently)"
    if groups is None:
        return f"{column} (the spec's)"
    groups = groups[groups.astype(str) != ""]
    text = f"{column}: {groups.nunique()} groups over {len(groups)} images"
    if folds is not None:
        both = pd.DataFrame({"group": groups, "fold": folds.reindex(groups.index)}).dropna()
        spread = int((both.groupby("group")["fold"].nunique() > 1).sum())
        text += "; no group in two folds" if not spread else f"; {spread} groups in more than one fold"
    return text


# ---------------------------------------------------------------- multilabel


def label_table(preds: pd.DataFrame, task: Task, decision: dict | None, folds: pd.Series | None,
                beta: float = 1.0) -> pd.DataFrame:
    """One row per label: images, positives, prevalence, out-of-fold ROC AUC (NaN when the label is all one
    side), the threshold the test set gets, each fold's threshold and F-beta of the decisions the CV scored."""
    from sklearn.metrics import fbeta_score, roc_auc_score  # lazily: sklearn takes seconds to import

    outputs, targets = outputs_and_targets(preds, task)
    made = decided(task, outputs, preds["id"], decision, folds)
    chosen = (decision or {}).get("thresholds") or list(task.thresholds or task.default_thresholds())
    per_fold = (decision or {}).get("per_fold") or {}
    rows = []
    for k, name in enumerate(task.names):
        truth = targets[:, k] > 0.5
        both = truth.any() and not truth.all()
        rows.append({"label": name, "images": len(truth), "positives": int(truth.sum()),
                     "prevalence": float(truth.mean()) if len(truth) else math.nan,
                     "roc_auc": float(roc_auc_score(truth, outputs[:, k])) if both else math.nan,
                     "threshold": float(chosen[k]),
                     "fold thresholds": ", ".join(f"{f}: {float(c[k]):g}" for f, c in per_fold.items()) or "-",
                     f"f{beta:g} (decisions scored)": float(fbeta_score(truth, made[:, k] > 0.5, beta=beta,
                                                                       zero_division=0)) if len(truth) else math.nan})
    return pd.DataFrame(rows)


def label_figure(table: pd.DataFrame, title: str = "") -> Figure:
    """Per label: its out-of-fold ROC AUC (bars, 0.5 = chance dotted) and its prevalence (ticks)."""
    if table.empty:
        return message_figure("per-label ROC AUC", "no labels")
    fig = Figure(figsize=(8, 1.6 + 0.3 * len(table)), layout="constrained")
    ax = fig.subplots()
    auc = table["roc_auc"].to_numpy(dtype=np.float64)
    y = np.arange(len(table))
    bars = ax.barh(y, np.nan_to_num(auc), color="tab:blue", alpha=0.8, label="ROC AUC (out of fold)")
    texts = [f"{a:.3f}" if np.isfinite(a) else "n/a (one side only)" for a in auc]
    texts = [f"{t}  prev {p:.0%}  thr {th:.2f}" for t, p, th in zip(texts, table["prevalence"], table["threshold"])]
    ax.bar_label(bars, texts, fontsize=7, padding=2)
    ax.plot(table["prevalence"], y, "D", color="tab:orange", markersize=5, label="prevalence")
    ax.axvline(0.5, color="grey", linestyle=":")
    ax.set_yticks(y, table["label"], fontsize=8)
    ax.invert_yaxis()
    ax.set(xlim=(0, 1.6), xlabel="ROC AUC; prevalence (share of images with the label)",
           title="per-label ROC AUC and prevalence" + (f"\n{title}" if title else ""))
    ax.legend(loc="lower right", fontsize=8)
    return fig


# ---------------------------------------------------------------- regression


def residual_frame(preds: pd.DataFrame, task: Task) -> pd.DataFrame:
    """id, true, predicted, residual (predicted - true) of each row."""
    outputs, targets = outputs_and_targets(preds, task)
    true, predicted = targets.reshape(-1), outputs.reshape(-1)
    return pd.DataFrame({"id": preds["id"].to_numpy(), "true": true, "predicted": predicted,
                         "residual": predicted - true})


def regression_scores(frame: pd.DataFrame) -> dict[str, float]:
    """RMSE and MAE of a :func:`residual_frame` (pipeline/metrics.py's, as the CV computes them)."""
    from pipeline.metrics import METRICS

    t, p = frame["true"].to_numpy()[:, None], frame["predicted"].to_numpy()[:, None]
    if not len(t):
        return {"rmse": math.nan, "mae": math.nan}
    return {name: METRICS[name].fn(t, p, 1, None) for name in ("rmse", "mae")}


def _sample(frame: pd.DataFrame) -> pd.DataFrame:
    return frame if len(frame) <= SCATTER_MAX_POINTS else frame.sample(SCATTER_MAX_POINTS, random_state=0)


def scatter_figure(frame: pd.DataFrame, target: str, lines=(), lines_label: str = "training range (clip)",
                   title: str = "") -> Figure:
    """Predicted against true, one point per row, the diagonal (perfect) and dotted horizontal ``lines``:
    the training range (predictions are clipped to it) or the grade cuts."""
    if frame.empty:
        return message_figure("predicted vs true", "no validation predictions")
    fig = Figure(figsize=(6.5, 6), layout="constrained")
    ax = fig.subplots()
    shown = _sample(frame)
    ax.scatter(shown["true"], shown["predicted"], s=10, alpha=0.6, color="tab:blue", label="image")
    lo = float(min(frame["true"].min(), frame["predicted"].min()))
    hi = float(max(frame["true"].max(), frame["predicted"].max()))
    ax.plot([lo, hi], [lo, hi], color="black", linewidth=1, label="predicted = true")
    for v in lines:
        ax.axhline(v, color="tab:red", linestyle=":", linewidth=1)
    if len(lines):
        ax.plot([], [], color="tab:red", linestyle=":", label=lines_label)
    sampled = f" ({len(shown)} of {len(frame)} drawn)" if len(shown) < len(frame) else ""
    ax.set(xlabel=f"true {target}", ylabel=f"predicted {target}", title=f"predicted vs true{sampled}\n{title}")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def residuals_figure(frame: pd.DataFrame, target: str, title: str = "") -> Figure:
    """Residuals (predicted - true) against the prediction, and their histogram."""
    if frame.empty:
        return message_figure("residuals", "no validation predictions")
    fig = Figure(figsize=(10, 4.5), layout="constrained")
    ax, hist = fig.subplots(1, 2, width_ratios=[2, 1])
    shown = _sample(frame)
    ax.scatter(shown["predicted"], shown["residual"], s=10, alpha=0.6, color="tab:purple")
    ax.axhline(0, color="black", linewidth=1)
    ax.set(xlabel=f"predicted {target}", ylabel="residual (predicted - true)", title=f"residuals\n{title}")
    ax.grid(alpha=0.3)
    hist.hist(frame["residual"], bins=min(40, max(5, len(frame) // 5)), orientation="horizontal", color="tab:purple")
    hist.axhline(0, color="black", linewidth=1)
    hist.set(xlabel="images", title=f"mean {frame['residual'].mean():+.3g}")
    return fig


def range_text(ranges: dict[str, tuple[float, float]]) -> str | None:
    """'fold0 1-100, fold1 2-99' of each member's training range (None when none is recorded)."""
    if not ranges:
        return None
    return ", ".join(f"{name} {lo:g} to {hi:g}" for name, (lo, hi) in ranges.items())


# ---------------------------------------------------------------- ordinal


def grade_confusion(true: np.ndarray, grades: np.ndarray, n: int) -> np.ndarray:
    """(G, G) counts: row = true grade index, column = decided grade index."""
    matrix = np.zeros((n, n), dtype=np.int64)
    np.add.at(matrix, (np.asarray(true, dtype=np.int64).reshape(-1), np.asarray(grades, dtype=np.int64).reshape(-1)), 1)
    return matrix


def cuts_table(task: Task, decision: dict | None) -> pd.DataFrame:
    """One row per cut between two grades: the default (half-way), the fitted one (every out-of-fold row: the
    test set's) and each fold's (fitted on the other folds)."""
    default = task.default_thresholds()
    fitted = (decision or {}).get("thresholds") or list(task.thresholds or default)
    per_fold = (decision or {}).get("per_fold") or {}
    rows = []
    for k, d in enumerate(default):
        row = {"between grades": f"{task.grades[k]} and {task.grades[k + 1]}", "default": float(d),
               "fitted (test set)": float(fitted[k])}
        row.update({f"fold {f}": float(c[k]) for f, c in per_fold.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def grade_figure(matrix: np.ndarray, grades, title: str = "") -> Figure:
    """The confusion matrix of grades, coloured by share of the true grade."""
    return confusion_figure(matrix, [str(g) for g in grades], title, axis="grade")


# ---------------------------------------------------------------- each kind's figures, tables and summary lines


def worst_grid(k: KindInputs, ids, titles, heading: str, empty: str) -> Figure:
    """The images of ``ids`` (worst first) under their ``titles``; a broken file is left out."""
    if k.read is None:
        return message_figure(heading, "images not available")
    by_id = dict(zip(ids, titles))
    shown = k.read(list(ids))
    return image_grid([image for _, image in shown], [by_id[i] for i, _ in shown], title=heading, empty=empty)


def _title(k: KindInputs, scores: dict[str, float]) -> str:
    return f"{k.source}: {len(k.preds)} images, " + ", ".join(f"{n} {v:.4f}" for n, v in scores.items())


def multilabel_figures(k: KindInputs) -> tuple[dict, dict, dict]:
    """Per-label AUC, prevalence and thresholds; the decision's scores."""
    table = label_table(k.preds, k.task, k.decision, k.folds, k.beta)
    scored = table["roc_auc"].dropna()
    mean_auc = float(scored.mean()) if len(scored) else math.nan  # metrics.py's mean_auc: labels with both sides
    summary = {f"{k.source} mean ROC AUC": f"{mean_auc:.4f} over {len(scored)} of {len(table)} labels "
                                           f"({len(k.preds)} images)"}
    tables = {"per-label ROC AUC, prevalence and thresholds (out of fold)": table}
    if k.decision:
        summary["fitted thresholds"] = decision_line(k.decision, k.metric)
        tables["the thresholds' scores: nested, in-sample, default"] = decision_table(k.decision, k.metric, "multilabel")
    outputs, targets = outputs_and_targets(k.preds, k.task)
    made = decided(k.task, outputs, k.preds["id"], k.decision, k.folds)
    wrong = (made != (targets > 0.5)).sum(axis=1)
    order = np.lexsort((-np.abs(outputs - targets).sum(axis=1), -wrong))  # most wrong labels, then furthest
    order = [i for i in order[:GRID_SIZE] if wrong[i] > 0]
    names = np.asarray(k.task.names, dtype=object)
    titles = [f"{k.preds['id'].iloc[i]}\ntrue: {', '.join(k.preds['label'].iloc[i].split(LABEL_JOIN)) or '(none)'}"
              f"\ndecided: {', '.join(names[made[i] > 0.5]) or '(none)'}" for i in order]
    return {"label_auc.png": label_figure(table, _title(k, {"mean AUC": mean_auc})),
            "most_wrong_labels.png": worst_grid(k, [k.preds["id"].iloc[i] for i in order], titles,
                                                f"{k.source}: the images with the most wrong labels (decisions as "
                                                "scored)", "every image's labels decided right")}, tables, summary


def regression_figures(k: KindInputs) -> tuple[dict, dict, dict]:
    """Predicted vs true and residuals, RMSE and MAE, the training range."""
    frame = residual_frame(k.preds, k.task)
    scores = regression_scores(frame)
    target = k.task.names[0]
    span = (min(lo for lo, _ in k.ranges.values()), max(hi for _, hi in k.ranges.values())) if k.ranges else ()
    summary = {f"{k.source} {n}": f"{v:.4f} ({len(frame)} images)" for n, v in scores.items()}
    if k.ranges:
        summary["training range (predictions clipped to it)"] = range_text(k.ranges)
    largest = frame.reindex(frame["residual"].abs().sort_values(ascending=False, kind="stable").index)
    figures = {"predicted_vs_true.png": scatter_figure(frame, target, span, title=_title(k, scores)),
               "residuals.png": residuals_figure(frame, target, _title(k, scores))}
    worst = largest.head(GRID_SIZE)
    figures["largest_residuals.png"] = worst_grid(
        k, list(worst["id"]), [f"{r.id}\ntrue {r.true:g} → predicted {r.predicted:.4g}" for r in worst.itertuples()],
        f"{k.source}: the largest residuals", "no images")
    return figures, {"largest residuals (out of fold)": largest.head(LARGEST_SHOWN).reset_index(drop=True)}, summary


def ordinal_figures(k: KindInputs) -> tuple[dict, dict, dict]:
    """The confusion matrix of the grades the CV scored, the cuts, the decision's scores."""
    from pipeline.metrics import METRICS

    outputs, targets = outputs_and_targets(k.preds, k.task)
    grades = decided(k.task, outputs, k.preds["id"], k.decision, k.folds)
    n = len(k.task.grades)
    matrix = grade_confusion(targets, grades, n)
    qwk = METRICS["grade_qwk"].fn(targets, grades, n, None) if len(targets) else math.nan
    how = "nested cuts (each fold cut by cuts fitted on the other folds)" if k.decision else "the default cuts"
    summary = {f"{k.source} qwk of the grades shown": f"{qwk:.4f} ({len(targets)} images, {how})"}
    if k.decision:
        summary["fitted cuts"] = decision_line(k.decision, k.metric)
    frame = residual_frame(k.preds, k.task)
    cuts = cuts_table(k.task, k.decision)
    tables = {"cuts between grades": cuts,
              "grade confusion (rows: true grade, columns: decided grade)": pd.DataFrame(
                  matrix, columns=list(k.task.grades)).assign(**{"true grade": list(k.task.grades)})[
                  ["true grade", *k.task.grades]]}
    if k.decision:
        tables["the cuts' scores: nested, in-sample, default"] = decision_table(k.decision, k.metric, "ordinal")
    figures = {"grade_confusion.png": grade_figure(matrix, k.task.grades, f"{k.source}: {len(targets)} images, "
                                                   f"qwk {qwk:.4f}\n{how}"),
               "predicted_vs_true.png": scatter_figure(frame, f"{k.task.names[0]} (grade index)",
                                                       cuts["fitted (test set)"].to_numpy(), "fitted cuts",
                                                       _title(k, regression_scores(frame)))}
    off = np.abs(grades.reshape(-1) - targets.reshape(-1))
    order = [i for i in np.lexsort((-np.abs(frame["residual"].to_numpy()), -off))[:GRID_SIZE] if off[i] > 0]
    g = np.asarray(k.task.grades, dtype=object)
    titles = [f"{frame['id'].iloc[i]}\ntrue {g[int(targets[i, 0])]} → {g[int(grades[i, 0])]} "
              f"({frame['predicted'].iloc[i]:.2f})" for i in order]
    figures["most_wrong_grades.png"] = worst_grid(k, [frame["id"].iloc[i] for i in order], titles,
                                                  f"{k.source}: the grades furthest off (true → decided (number))",
                                                  "every grade decided right")
    return figures, tables, summary
