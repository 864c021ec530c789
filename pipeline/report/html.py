"""The report's index page: a self-contained report.html built from plain values.

Pure functions of dicts, frames and file names that return strings; the caller
writes the file. The page has no external assets (styles inline, PNGs linked
relatively, so the folder can be moved or zipped as a whole), and every user
string is HTML-escaped: Kaggle class names and ids may contain ``<`` or ``&``.
"""
from __future__ import annotations

import html
import math
from urllib.parse import quote

import numpy as np
import pandas as pd

# the run's config.json keys worth a line in the summary (what each member ran comes from its facts)
RUN_KEYS = ("competition", "folds", "fold", "full", "tta", "seed")
# without member facts (a caller's own summary): the config's keys, in the order shown
SUMMARY_KEYS = ("competition", "model", "pretrained", "image_size", "augment", "epochs", "batch_size",
                "optimizer", "lr", "schedule", "weight_decay", "label_smoothing", "mixup", "cutmix", "ema",
                "folds", "fold", "full", "tta", "seed")

# under each figure of the page, by file name
CAPTIONS = {
    "learning_curves.png": "Loss, the competition's metric on validation (★ each member's best epoch) and "
                           "learning rate per epoch, one colour per member; only members trained over several "
                           "epochs (a fitted head has no curve). With --unfreeze-after a dotted line marks where "
                           "the whole model starts training; a fitted epoch has no learning rate.",
    "head_fit.png": "Fitted heads: the inner-CV loss of each regularisation strength tried on the member's training "
                    "rows (C: log loss, or per-label BCE for multi-label; ridge alpha: squared error of the "
                    "standardised target), ★ the chosen one, one colour per member.",
    "train_images.png": "Random training images under their targets (class, labels, number or grade).",
    "label_auc.png": "Multi-label: each label's ROC AUC out of fold (dotted: chance), its prevalence (diamond) and "
                     "the threshold the test set gets (fitted on every out-of-fold row).",
    "predicted_vs_true.png": "Each out-of-fold prediction against its true value; the diagonal is perfect. "
                             "Regression: dotted, the training range (predictions are clipped to it). Ordinal: the "
                             "number before it is cut into grades, dotted the fitted cuts.",
    "residuals.png": "Regression: residual (predicted - true) of each out-of-fold prediction against the "
                     "prediction, and their histogram.",
    "most_wrong_labels.png": "Multi-label: the validation images with the most labels decided wrong (the decisions "
                             "the CV scored), true labels above decided ones.",
    "largest_residuals.png": "Regression: the validation images whose prediction is furthest from the truth.",
    "most_wrong_grades.png": "Ordinal: the validation images whose decided grade is furthest from the true grade; "
                             "the number the model gave in brackets.",
    "grade_confusion.png": "Ordinal: true grade against the grade decided out of fold, each fold cut with the cuts "
                           "fitted on the other folds (the decisions the nested CV scores); colour: share of the "
                           "true grade.",
    "confusion_matrix.png": "Confusion matrix of the validation predictions, coloured by share of the true class.",
    "confused_pairs.png": "The most frequent mistakes: true class → predicted class.",
    "per_class_accuracy.png": "Accuracy per class, worst first; the tick is the mean probability of the true class. "
                              "Shaded rows, marked 'absent': classes absent from the training rows of the member "
                              "that predicted them (missing data, not a model mistake).",
    "most_wrong.png": "Wrong validation images that gave their true class the least probability, classes the "
                      "member trained on first; an image whose class was absent from its fold's training rows "
                      "is marked 'class absent from training'.",
}

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
nav a { margin-right: 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.scroll { overflow-x: auto; max-width: 100%; }
table.summary td { overflow-wrap: anywhere; }
thead th { background: #f0f0f0; position: sticky; top: 0; }
figure { margin: 1em 0 2em; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #555; font-size: 0.9em; }
"""


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _text(value: object) -> str:
    """A config or score value as one short string."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_text(v) for v in value)
    return "-" if value is None else str(value)


def _mode(config: dict) -> str:
    if config.get("full"):
        return "full"
    return "folds" if config.get("folds") or config.get("fold") is not None else "holdout"


def _best_epoch(done: dict | None, metric: str | None = None) -> str:
    """'3 of 10 (roc_auc 0.9123, ema)' from a member's done.json (training chose the epoch under the
    competition's metric and direction); 'score' when the metric is unknown; 'not finished' without one."""
    if not done:
        return "not finished"
    best = done.get("best") or {}
    text = f"{best.get('epoch', '?')} of {done.get('epochs', '?')}"
    name, metric = metric, best.get("metric")
    if isinstance(metric, (int, float)) and not math.isnan(metric):
        variant = ", ema" if best.get("variant") == "ema" else ""
        text += f" ({name or 'score'} {metric:.4g}{variant})"
    return text


def report_summary(config: dict, cv: dict | None, members: dict[str, dict | None],
                   metric: str | None = None, with_facts: bool = False) -> dict[str, str]:
    """Key values of a run: its config, the competition's metric, number of members, CV score, each
    member's best epoch.

    ``config`` is config.json's content, ``cv`` cv.json's (None without one),
    ``members`` each member's done.json by name (None while it trains) and
    ``metric`` the competition's (pipeline/metrics.py; None: unknown). ``with_facts``:
    what the members ran is shown from their facts (pipeline/report/facts.py) in
    the settings and members tables, so the summary keeps the run's own keys
    (competition, folds, tta, seed) and each member's best epoch goes to the
    members table (:func:`members_frame`); without, the recipe's settings are listed.
    """
    from pipeline.metrics import check_metric

    summary = {"mode": _mode(config)}
    if with_facts:  # a fold run's "fold: None, full: False" says nothing
        summary.update({key: _text(config[key]) for key in RUN_KEYS
                        if key in config and (key == "seed" or config[key] not in (None, False, 0))})
    else:
        summary.update({key: _text(config[key]) for key in SUMMARY_KEYS if key in config})
    if metric:
        summary["metric"] = f"{metric} ({'higher' if check_metric(metric).greater_is_better else 'lower'} is better)"
    summary["members"] = str(len(members))
    if cv and cv.get("cv") is not None:
        summary[f"CV {cv.get('metric', 'score')}"] = _text(float(cv["cv"]))
    if not with_facts:
        for name, done in members.items():
            summary[f"best epoch, {name}"] = _best_epoch(done, metric)
    return summary


def members_frame(differing: pd.DataFrame, members: dict[str, dict | None], metric: str | None = None
                  ) -> pd.DataFrame:
    """One row per member: its name, the facts that differ between members, its kept/best epoch."""
    frame = differing.copy()
    frame["best epoch"] = [_best_epoch(members.get(name), metric) for name in frame["member"]]
    return frame


def cv_frame(cv: dict | None) -> pd.DataFrame | None:
    """cv.json's per-fold rows and an 'all' row of the out-of-fold scores; None without folds."""
    if not cv or not cv.get("folds"):
        return None
    rows = [*cv["folds"], {"fold": "all", **cv.get("overall", {})}]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    # object columns: a whole number stays an int (a float column would print epoch 7 as 7.0000)
    return pd.DataFrame([[row.get(c) for c in columns] for row in rows], columns=columns, dtype=object)


def _cell(value: object) -> str:
    if value is None:
        return "<td></td>"
    if isinstance(value, (bool, np.bool_)):
        return f"<td>{_esc(value)}</td>"
    if isinstance(value, (float, np.floating)):
        return f'<td class="num">{"" if math.isnan(value) else f"{value:.4f}"}</td>'
    if isinstance(value, (int, np.integer)):
        return f'<td class="num">{value}</td>'
    return f"<td>{_esc(value)}</td>"


def table_html(frame: pd.DataFrame) -> str:
    """A frame as an HTML table: every header and cell escaped, floats to 4 decimals."""
    head = "".join(f"<th>{_esc(c)}</th>" for c in frame.columns)
    body = "\n".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>"
                     for row in frame.itertuples(index=False, name=None))
    return f'<div class="scroll"><table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table></div>'


def _summary_html(summary: dict) -> str:
    rows = "\n".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in summary.items())
    return f'<table class="summary">\n{rows}\n</table>'


def _figure_html(caption: str, filename: str) -> str:
    src = _esc(quote(filename))  # a relative link: the PNG sits beside report.html
    return (f'<figure><a href="{src}"><img src="{src}" alt="{_esc(caption)}" loading="lazy"></a>'
            f"<figcaption>{_esc(caption)}</figcaption></figure>")


def report_html(title: str, summary: dict, cv_table: pd.DataFrame | None, images: list[tuple[str, str]],
                tables: dict[str, pd.DataFrame], members: pd.DataFrame | None = None,
                settings: dict | None = None) -> str:
    """The whole report.html: summary, the settings every member ran (``settings``), the members
    (one row each: what differs between them, ``members``), CV table, every image (caption, file
    name) and table. A navigation line at the top links each section.
    """
    sections = [("summary", "Summary", _summary_html(summary))]
    if settings:
        shown = {key: _text(value) for key, value in settings.items()}
        sections.append(("settings", "What every member ran", _summary_html(shown)))
    if members is not None and len(members):
        sections.append(("members", "Members", table_html(members)))
    if cv_table is not None and len(cv_table):
        sections.append(("cv", "Cross-validation", table_html(cv_table)))
    if images:
        sections.append(("figures", "Figures", "\n".join(_figure_html(c, f) for c, f in images)))
    for i, (name, frame) in enumerate(tables.items()):
        sections.append((f"table{i}", name, table_html(frame) if len(frame) else "<p>none</p>"))
    nav = " ".join(f'<a href="#{key}">{_esc(heading)}</a>' for key, heading, _ in sections)
    body = "\n".join(f'<section id="{key}">\n<h2>{_esc(heading)}</h2>\n{content}\n</section>'
                     for key, heading, content in sections)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{_esc(title)}</title>\n'
            f"<style>{STYLE}</style>\n</head>\n<body>\n<h1>{_esc(title)}</h1>\n<nav>{nav}</nav>\n{body}\n"
            "</body>\n</html>\n")
