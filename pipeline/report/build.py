"""A run's report: its inputs read from the run and work folders, the PNGs and report.html written.

The tables and figures are pure functions in pipeline/report/figures.py and
the page in pipeline/report/html.py; :func:`write_report` gathers their inputs
and is the only function here that writes files. Also predictions for single
image files (predict-image).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from pipeline.config import load_resolved
from pipeline.data.items import Item, fold_split, list_split, load_reorg, read_folds, read_image, read_items
from pipeline.errors import PipelineError
from pipeline.io import atomic_save, atomic_write_text, read_csv
from pipeline.predict.stage import predict_items
from pipeline.report.facts import (SINGLE_LABEL, absent_classes, absent_labels, member_facts, split_facts,
                                   training_items, trains_over_epochs)
from pipeline.report.figures import (DPI, GRID_SIZE, image_grid, mistake_titles, most_wrong, prediction_frame,
                                     validation_figures, validation_scores, validation_tables)
from pipeline.report.html import CAPTIONS, cv_frame, members_frame, report_html, report_summary
from pipeline.report.kinds import (KindInputs, group_text, metadata_table, metadata_text, multilabel_figures,
                                   ordinal_figures, regression_figures, task_text)
from pipeline.report.training_figures import head_fit_figure, learning_curves_figure
from pipeline.competition import Competition
from pipeline.runs import FULL, HOLDOUT, Member, Run
from pipeline.models.task import Task
from pipeline.download.specfile import competition_of
from pipeline.predict.submission import class_difference, in_class_order

log = logging.getLogger("pipeline")

REPORT_PAGE = "report.html"

# ---------------------------------------------------------------- single images


def decode_image(path: Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB, or an error naming the file."""
    try:
        return read_image(Path(path))
    except Exception as exc:  # PIL raises many types for missing and broken files
        raise PipelineError(f"cannot read image {path} ({exc}); check the path and that it is an image file") from None


def run_tta(run: Run) -> str:
    """The TTA a run's scores used (its members predict with it unless told otherwise)."""
    return load_resolved(run.config_path)[0].tta


def predict_images(run_dir: Path, paths: list[Path], members: str = "auto", tta: str | None = None,
                   device: str = "auto") -> tuple[list[str], np.ndarray]:
    """Class names and (N, C) softmax of image files, averaged over the run's members."""
    items = [Item(str(path), Path(path), -1) for path in paths]
    run = Run(run_dir)
    chosen = run.finished(members)
    meta = [m for m in chosen if (m.recorded_plan() or {}).get("metadata")]
    if meta:
        columns = ", ".join(meta[0].recorded_plan()["metadata"]["columns"])
        raise PipelineError(f"{run_dir} predicts from metadata columns beside the image ({columns}), which an image "
                            "file alone does not give; use `pipeline predict` on a work folder")
    _, probs, classes = predict_items(chosen, items, tta=tta or run_tta(run), device=device)
    return classes, probs


# ---------------------------------------------------------------- a run's inputs


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
    classes, task = info["classes"], Task.of(info)
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
    tta = run_tta(run)  # the run's config, read once for every member
    for member in run.finished("all"):
        items = _valid_items(member, work_dir, info)
        if items:
            ids, probs, run_classes = predict_items([member], items, tta=tta, device=device,
                                                    unreadable="drop", work_dir=work_dir)
            differ = class_difference(run_classes, classes)
            if differ:
                raise PipelineError(f"{member.dir} was trained on other classes than {work_dir} holds ({differ}); "
                                    "pass the --work-dir the run used")
            probs = in_class_order(probs, run_classes, classes)
            if probs.shape[1] != len(classes):
                raise PipelineError(f"{member.dir} predicts {probs.shape[1]} classes, {work_dir} has {len(classes)}; "
                                    "pass the --work-dir the run used")
            target = {it.id: it.target for it in items}
            frames.append(prediction_frame(ids, [target[i] for i in ids], probs, classes,
                                           [task.target_text(target[i]) for i in ids]))
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
    """A 3 x 3 grid of random WORK_DIR/train images under their targets (class, labels, number, grade)."""
    items = list_split(work_dir, info, "train")
    rng = np.random.default_rng(seed)
    picked = [items[i] for i in rng.choice(len(items), min(GRID_SIZE, len(items)), replace=False)]
    shown = _readable(picked)
    task = Task.of(info)
    return image_grid([image for _, image in shown], [task.target_text(it.target) or "(no label)" for it, _ in shown],
                      title=f"training images ({len(shown)} of {len(items)})", empty="no readable images")


def mistakes_figure(preds: pd.DataFrame, classes: list[str], paths: dict[str, Path],
                    absent: np.ndarray | None = None) -> Figure:
    """The wrong validation images that gave the true class the least probability, the model's
    mistakes first; an image whose class its member never trained on (``absent``) is marked."""
    wrong = most_wrong(preds, classes, absent=absent)
    titles = dict(zip(wrong["id"], mistake_titles(wrong)))
    shown = _readable([Item(i, paths[i], -1) for i in wrong["id"] if i in paths])
    n_absent = int(np.sum(absent)) if absent is not None else 0
    note = (f"\n{n_absent} images of classes absent from their fold's training rows: after the model's "
            "mistakes, marked" if n_absent else "")
    return image_grid([image for _, image in shown], [titles[it.id] for it, _ in shown],
                      title=f"most wrong (validation): true → predicted (p of the true class){note}",
                      empty="every validation image is predicted correctly")


def save_figure(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as a PNG, atomically."""
    atomic_save(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    return Path(path)


def _or_none(read):
    """What ``read()`` gives, or None when the file is missing or broken (the report shows what it can)."""
    try:
        return read()
    except PipelineError:
        return None


def run_competition(config: dict, cv: dict | None) -> tuple[Competition | None, str | None]:
    """The run's competition, loaded from the slug or spec-file path the run stores, and its metric,
    else (None, the metric its cv.json names); (None, None) when neither is known."""
    try:
        comp = competition_of(str(config.get("competition", "")))
        return comp, comp.metric
    except PipelineError as exc:
        known = (cv or {}).get("metric")
        log.warning("report: the run's competition cannot be loaded (%s); scoring with %s", exc,
                    known or "accuracy and log loss only")
        return None, known


def run_facts(run_dir: Path, work_dir: Path, info: dict) -> list[dict]:
    """Every member's facts (pipeline/report/facts.py) with its training images and the classes absent
    from them; members with neither a config nor metrics (an empty folder) are left out."""
    run = Run(run_dir)
    config, document = _or_none(lambda: load_resolved(run.config_path)) or (None, {})
    run_config = config.to_json() if config is not None else {}
    found = []
    for member in run.members():
        if not (member.config_path.is_file() or member.metrics_path.is_file()):
            continue
        facts = member_facts(member, run_config, document.get("notes") or ())
        items = _or_none(lambda: training_items(member, work_dir, info))
        if items is not None:
            facts["train_images"] = facts.get("train_images") or len(items)  # older runs: from the split
            kind, targets = info.get("task", SINGLE_LABEL), [it.target for it in items]
            if kind == SINGLE_LABEL:
                facts["absent_classes"] = absent_classes(info["classes"], targets)
            elif kind == "multilabel":
                facts["absent_labels"] = absent_labels(info["classes"], targets)
        found.append(facts)
    return found


def absent_rows(preds: pd.DataFrame, run_dir: Path, work_dir: Path, info: dict, facts: list[dict]) -> np.ndarray:
    """(N,) bool over a predictions frame: the row's class is absent from the training rows of the member
    that predicted it (the fold holding the image, or the holdout member)."""
    absent = {f["member"]: set(f.get("absent_classes") or ()) for f in facts}
    of_id: dict[str, set] = {}
    for member in Run(run_dir).members():
        if absent.get(member.name):
            of_id.update({it.id: absent[member.name] for it in _or_none(lambda: _valid_items(member, work_dir, info))
                          or []})
    return np.array([label in of_id.get(i, ()) for i, label in zip(preds["id"], preds["label"])], dtype=bool)


def single_label_figures(preds: pd.DataFrame, classes: list[str], source: str, metric: str,
                         absent: np.ndarray, paths: dict[str, Path]) -> tuple[dict, dict, dict]:
    """(figures by file name, tables by heading, summary lines) of a single-label run's validation predictions."""
    scores = validation_scores(preds, classes, metric)
    summary = {f"{source} {name}": f"{value:.4f} ({len(preds)} images)" for name, value in scores.items()}
    if absent.any():
        summary["images of classes absent from training"] = (
            f"{int(absent.sum())} of {len(preds)} validation images ({preds['label'][absent].nunique()} classes): "
            "their member never trained on their class; marked in the figures and tables")
    figures = validation_figures(preds, classes, source, scores, absent)
    figures["most_wrong.png"] = mistakes_figure(preds, classes, paths, absent)
    return figures, validation_tables(preds, classes, absent), summary


# a task kind's (figures by file name, tables by heading, summary lines) of the validation predictions
TASK_FIGURES = {SINGLE_LABEL: lambda k: single_label_figures(k.preds, list(k.task.names), k.source, k.metric,
                                                             k.absent, k.paths),
                "multilabel": multilabel_figures, "regression": regression_figures, "ordinal": ordinal_figures}


def data_lines(work_dir: Path, info: dict, comp: Competition | None, facts: list[dict]) -> dict[str, str]:
    """Summary lines of what a run learned from besides the images: the task (kinds other than single), the
    metadata columns (the encoding a member fitted, from its plan, else the work folder's list) and the group
    column with how the folds keep its groups, each when there is one."""
    task = Task.of(info)
    lines = {} if task.kind == SINGLE_LABEL else {"task": task_text(task)}
    encoding = next((f["metadata"] for f in facts if f.get("metadata")), None)
    columns = info.get("metadata") or (comp.metadata if comp else ())
    if encoding or columns:
        lines["metadata columns"] = metadata_text(columns, encoding)  # per member: metadata_table
    group_column = info.get("group_column") or (comp.group_column if comp else "")
    if group_column:
        items = _or_none(lambda: read_items(work_dir))
        groups = items.set_index("id")["group"] if items is not None and "group" in items else None
        lines["group column"] = group_text(group_column, groups, _or_none(lambda: read_folds(work_dir)))
    return lines


def training_figures(metrics: dict[str, pd.DataFrame], facts: list[dict], metric: str) -> tuple[dict, dict]:
    """(figures by file name, summary lines) of how the members trained, as each member's facts allow:
    learning curves of members trained over several epochs, the inner-CV curve of fitted heads."""
    by_name = {f["member"]: f for f in facts}
    curves = {n: m for n, m in metrics.items() if trains_over_epochs(by_name.get(n, {"epochs_run": len(m)}))}
    figures, summary = {}, {}
    if curves:
        phases = {n: by_name[n]["unfreeze_after"] for n in curves if n in by_name}
        figures["learning_curves.png"] = learning_curves_figure(curves, metric, phases)
    else:
        summary["learning curves"] = "none: no member trained over several epochs (a fitted head has no curve)"
    fits = {f["member"]: f["fit_record"] for f in facts if f.get("fit_record")}
    if fits:
        figures["head_fit.png"] = head_fit_figure(fits)
    return figures, summary


def _summary(run_dir: Path, metrics: dict[str, pd.DataFrame], facts: list[dict]
             ) -> tuple[dict, dict, pd.DataFrame, dict | None, str | None, Competition | None]:
    """The report's summary of a run, the settings its members share, its members table (what differs
    between them), its CV score (None without one), its competition's metric and the competition."""
    run = Run(run_dir)
    cv = _or_none(run.read_cv)
    done = {name: _or_none(run.member(name).done) for name in metrics}
    config = _or_none(lambda: load_resolved(run.config_path)[0].to_json()) or {}
    comp, metric = run_competition(config, cv)
    shared, differing = split_facts(facts)
    return (report_summary(config, cv, done, metric, with_facts=True), shared,
            members_frame(differing, done, metric), cv, metric, comp)


def write_report(run_dir: Path, work_dir: Path, out_dir: Path, device: str = "auto") -> list[Path]:
    """The run's PNGs and report.html, the page that shows them, in ``out_dir``.

    What each member ran comes from its facts (pipeline/report/facts.py):
    they fill the summary and the members table and choose the figures
    (learning curves with the learning rate only for members trained over
    several epochs, the inner-CV curve for fitted heads). Then training
    images and, from the validation predictions, the task kind's figures:
    single-label, the confusion matrix (up to 25 classes; above, the most
    confused pairs and per-class accuracy) and the most wrong images, classes
    absent from a member's training rows marked; the other kinds,
    pipeline/report/kinds.py's.
    """
    run_dir, work_dir, out_dir = Path(run_dir), Path(work_dir), Path(out_dir)
    info = load_reorg(work_dir)
    metrics = read_metrics(run_dir)
    facts = run_facts(run_dir, work_dir, info)
    summary, settings, members, cv, metric, comp = _summary(run_dir, metrics, facts)
    task = Task.of(info)
    summary.update(data_lines(work_dir, info, comp, facts))
    figures, notes = training_figures(metrics, facts, metric or "accuracy")
    summary.update(notes)
    figures["train_images.png"] = training_images_figure(work_dir, info)
    preds, tables = validation_predictions(run_dir, work_dir, info, device), {}
    if len(preds):
        source = "out-of-fold" if Run(run_dir).oof_path.is_file() else "validation"
        paths = {it.id: it.path for it in list_split(work_dir, info, "train_valid")}
        absent = absent_rows(preds, run_dir, work_dir, info, facts) if task.kind == SINGLE_LABEL else None
        ranges = {f["member"]: tuple(f["target_range"]) for f in facts if f.get("target_range") and f["member"] != FULL}
        inputs = KindInputs(preds, task, source, metric or "accuracy", (cv or {}).get("decision"),
                            _or_none(lambda: read_folds(work_dir)), ranges, comp.beta if comp else 1.0, absent, paths,
                            lambda ids: [(it.id, im) for it, im in _readable([Item(i, paths[i], -1) for i in ids])])
        task_figures, tables, lines = TASK_FIGURES[task.kind](inputs)
        encodings = {f["member"]: f["metadata"] for f in facts if f.get("metadata")}
        if encodings:
            tables["metadata encoding (each member's, fitted on its training rows)"] = metadata_table(encodings)
        figures.update(task_figures)
        summary.update(lines)
    else:
        log.warning("%s has no validation predictions (a --full run?): no confusion matrix or mistakes", run_dir)
    written = [save_figure(fig, out_dir / name) for name, fig in figures.items()]
    images = [(CAPTIONS.get(p.name, p.stem), p.name) for p in written]
    page = report_html(f"Report of {run_dir}", summary, cv_frame(cv), images, tables, members, settings)
    atomic_write_text(out_dir / REPORT_PAGE, page)
    return [*written, out_dir / REPORT_PAGE]
