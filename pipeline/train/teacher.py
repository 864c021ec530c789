"""Teachers: another run's predictions as training targets (``--soft-labels``, ``--pseudo-label``).

``--soft-labels RUN``: each member trains on ``(1 - A) * label + A * p``, ``p``
the teacher's prediction of the row, matched by id and by class name. The
teacher must have cross-validated on the same folds, id by id. Where ``p``
comes from (``--teacher-source``):

- ``fold`` (default): fold k's training rows are predicted by the teacher's
  fold-k model, which trained on exactly those rows and never on fold k's
  validation rows, so no label of the validation fold reaches the student
  and its CV stays honest. (A --full student takes the out-of-fold table.)
- ``all``: the teacher's oof.csv. Each row is predicted by a model that did
  not train on it, but that did train on every other fold, fold k's
  validation rows among them: their labels reach fold k's student through
  its targets, and the CV records that it is optimistic.

The teacher may not itself have learnt from another run's predictions (a
chain would carry labels across folds).

``--pseudo-label RUN``: the work folder's test images join every member's
training rows, labelled by the teacher (``fold``: fold k's by its fold-k
model; ``all``: by its kept test predictions, test_probs.csv, what ``pipeline
predict`` averaged over members that saw fold k's validation rows), soft or,
with ``--pseudo-threshold P``, hard where the teacher is at least P sure (the
others dropped). They never enter a validation split, so they are in no score.

This module builds the training items (targets included) once per member,
for :func:`pipeline.train.plan.plan_member`; the loaders take the items'
targets as they are (a probability row instead of a class index) and the
loss takes either.
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import TrainConfig, load_resolved
from pipeline.data.items import Item, list_split, read_folds
from pipeline.errors import PipelineError
from pipeline.io import read_csv
from pipeline.models.task import Task
from pipeline.runs import Run

HARD_PSEUDO_KINDS = ("single", "multilabel")  # kinds whose predictions are probabilities a threshold can cut


def _teacher(path: Path, cfg: TrainConfig, flag: str) -> tuple[Run, TrainConfig]:
    """The teacher run and its settings; a path that is no run, or this run itself, is refused."""
    run = Run(Path(path))
    if os.path.abspath(path) == os.path.abspath(cfg.run_dir):
        raise PipelineError(f"{flag} {path} is this run itself; give another (finished) run as the teacher")
    if not run.is_run():
        raise PipelineError(f"{flag} {path}: not a training run (no {run.config_path.name}); train the teacher first")
    tcfg, _ = load_resolved(run.config_path)
    if tcfg.soft_labels or tcfg.pseudo_label:
        raise PipelineError(f"{flag} {path}: the teacher itself learnt from the predictions of "
                            f"{tcfg.soft_labels or tcfg.pseudo_label}, whose members saw every fold's labels; "
                            "use a teacher trained on its labels alone")
    return run, tcfg


def _by_name(frame: pd.DataFrame, names: tuple[str, ...], path: Path, what: str) -> pd.DataFrame:
    """``frame``'s columns ``names`` (floats), indexed by id; a missing column or a non-number is an error."""
    missing = [n for n in names if n not in frame.columns]
    if missing:
        raise PipelineError(f"{path} has no column {missing[0]!r} ({len(missing)} of this run's classes missing): "
                            f"the {what} predicts other classes; use a teacher of the same competition")
    try:
        table = frame.set_index(frame["id"].astype(str))[list(names)].astype(float)
    except ValueError:
        raise PipelineError(f"{path} holds a value that is not a number; rebuild the {what}'s predictions") from None
    if table.index.duplicated().any():
        raise PipelineError(f"{path} lists id {table.index[table.index.duplicated()][0]!r} twice; rebuild it")
    return table


def _rows(table: pd.DataFrame, items: list[Item], path: Path, what: str) -> np.ndarray:
    """The teacher's row of each item, by id; an item the teacher has no row for is an error naming it."""
    absent = next((it.id for it in items if it.id not in table.index), None)
    if absent is not None:
        raise PipelineError(f"{path} has no prediction for id {absent!r}: the {what} was made on other images; "
                            "use a teacher trained (and predicted) on this work folder")
    return table.loc[[it.id for it in items]].to_numpy(dtype=np.float64)


def check_same_folds(cfg: TrainConfig, tcfg: TrainConfig, path: Path, flag: str = "--soft-labels") -> None:
    """The teacher cross-validated on the student's folds, id by id; else an error naming an id that moved."""
    if tcfg.mode != "folds":
        raise PipelineError(f"{flag} {path} is a {tcfg.mode} run: its model trained on rows of every fold "
                            "and it has no out-of-fold predictions; train the teacher with --folds K on this "
                            "run's folds")
    ours, theirs = read_folds(cfg.work_dir), read_folds(tcfg.work_dir)
    for ident, fold in ours.items():
        if theirs.get(ident) != fold:
            where = "has no fold" if ident not in theirs.index else f"is in fold {theirs[ident]}"
            raise PipelineError(f"{flag} {path}: id {ident!r} is in fold {fold} here but {where} in the "
                                f"teacher's {tcfg.work_dir}: its out-of-fold predictions would come from models "
                                "that trained on this run's validation rows; train the teacher on these folds")


def soft_table(cfg: TrainConfig, task: Task) -> pd.DataFrame | None:
    """The teacher's out-of-fold predictions by id, one column per output name (None without --soft-labels)."""
    if cfg.soft_labels is None:
        return None
    run, tcfg = _teacher(cfg.soft_labels, cfg, "--soft-labels")
    check_same_folds(cfg, tcfg, cfg.soft_labels)
    if not run.oof_path.is_file():
        raise PipelineError(f"--soft-labels {cfg.soft_labels}: no {run.oof_path.name} yet (a fold is unfinished); "
                            f"finish its folds or run `pipeline cv {cfg.soft_labels}`")
    return _by_name(read_csv(run.oof_path, what="teacher's out-of-fold predictions"), task.names, run.oof_path,
                    "teacher's out-of-fold prediction")


def label_rows(items: list[Item], task: Task) -> np.ndarray:
    """The items' own targets as rows of the teacher's shape: one-hot rows (single) or the float targets."""
    if task.kind == "single":
        return np.eye(len(task.names))[[it.target for it in items]]
    return np.array([it.target for it in items], dtype=np.float64).reshape(len(items), -1)


def mixed(items: list[Item], teacher: np.ndarray, weight: float, task: Task) -> list[Item]:
    """Items whose targets are ``(1 - weight) * label + weight * teacher`` (float rows)."""
    targets = (1.0 - weight) * label_rows(items, task) + weight * teacher
    return [replace(it, target=tuple(float(v) for v in row)) for it, row in zip(items, targets)]


def soft_items(cfg: TrainConfig, task: Task, items: list[Item], table: pd.DataFrame | None,
               source: Path | None = None) -> list[Item]:
    """The member's training items with their targets mixed with the teacher's (as they are without one);
    ``source``: the file or member the table came from, for the errors."""
    if table is None:
        return items
    source = source or Run(cfg.soft_labels).oof_path
    return mixed(items, _rows(table, items, source, "teacher's prediction"), cfg.soft_weight, task)


def fold_table(cfg: TrainConfig, fold: int, items: list[Item], task: Task) -> tuple[pd.DataFrame, Path]:
    """--teacher-source fold: the teacher's fold-``fold`` model's predictions of ``items`` (the student's training
    rows of that fold), by id and class; an unreadable image keeps its label (the loaders leave it out)."""
    from pipeline.predict.stage import predict_items
    from pipeline.runs import FOLD, member_name

    run = Run(cfg.soft_labels)
    member = run.member(member_name(FOLD, fold))
    if not member.is_finished:
        raise PipelineError(f"--soft-labels {cfg.soft_labels}: its {member.name} is not finished; finish the "
                            "teacher's folds first")
    tcfg, _ = load_resolved(run.config_path)
    ids, probs, classes = predict_items([member], items, tta=tcfg.tta, device=cfg.device,
                                        num_workers=cfg.num_workers, unreadable="drop", work_dir=cfg.work_dir)
    frame = pd.DataFrame(probs, columns=classes)
    frame.insert(0, "id", ids)
    predicted = set(ids)
    dropped = [it for it in items if it.id not in predicted]
    if dropped:
        labels = pd.DataFrame(label_rows(dropped, task), columns=list(task.names))
        frame = pd.concat([frame, labels.assign(id=[it.id for it in dropped])], ignore_index=True)
    return _by_name(frame, task.names, member.dir, "teacher's fold model"), member.dir


def pseudo_items(cfg: TrainConfig, task: Task, info: dict) -> tuple[list[Item], dict]:
    """The test images labelled by the teacher's kept test predictions, and their record ([] without one)."""
    if cfg.pseudo_label is None:
        return [], {}
    path = cfg.pseudo_label
    run, _ = _teacher(path, cfg, "--pseudo-label")
    kept = run.read_test_probs()
    if kept is None:
        raise PipelineError(f"--pseudo-label {path} has no kept test predictions; run `pipeline predict` on it "
                            "first")
    frame, record = kept
    test = list_split(cfg.work_dir, info, "test")
    probs = _rows(_by_name(frame, task.names, run.test_probs_path, "teacher's test prediction"), test,
                  run.test_probs_path, "teacher's test prediction")
    return labelled(cfg, task, test, probs, PSEUDO_NOTE.format(run=path), record.get("members"))


def fold_pseudo_items(cfg: TrainConfig, task: Task, info: dict, fold: int) -> tuple[list[Item], dict]:
    """--teacher-source fold: the test images labelled by the teacher's fold-``fold`` model, and their record."""
    from pipeline.predict.stage import predict_items
    from pipeline.runs import FOLD, member_name

    run = Run(cfg.pseudo_label)
    tcfg, _ = load_resolved(run.config_path)
    member = run.member(member_name(FOLD, fold))
    if tcfg.mode != "folds" or not member.is_finished:
        raise PipelineError(f"--pseudo-label {cfg.pseudo_label} has no finished {member.name} to label fold "
                            f"{fold}'s test rows; train the teacher's folds, or use --teacher-source all")
    test = list_split(cfg.work_dir, info, "test")
    ids, probs, classes = predict_items([member], test, tta=tcfg.tta, device=cfg.device,
                                        num_workers=cfg.num_workers, unreadable="uniform", work_dir=cfg.work_dir)
    frame = pd.DataFrame(probs, columns=classes).assign(id=ids)
    probs = _rows(_by_name(frame, task.names, member.dir, "teacher's fold model"), test, member.dir,
                  "teacher's fold model")
    return labelled(cfg, task, test, probs, FOLD_PSEUDO_NOTE.format(run=cfg.pseudo_label), [member.name])


def labelled(cfg: TrainConfig, task: Task, test: list[Item], probs: np.ndarray, note: str,
             members) -> tuple[list[Item], dict]:
    """The test items with the teacher's rows as targets: soft, or hard where it is --pseudo-threshold sure
    (the others dropped); and the record."""
    kept_rows = np.ones(len(test), dtype=bool)
    if cfg.pseudo_threshold is not None:
        if task.kind not in HARD_PSEUDO_KINDS:
            raise PipelineError(f"--pseudo-threshold cuts probabilities; a {task.kind} teacher predicts numbers: "
                                "drop --pseudo-threshold (its predictions are used as they are)")
        if task.kind == "single":  # class indices, as the labelled rows'
            kept_rows = probs.max(axis=1) >= cfg.pseudo_threshold
            probs = probs.argmax(axis=1)[:, None]
        else:  # every label decided at 0.5, and the row kept where each is at least P sure
            kept_rows = np.maximum(probs, 1 - probs).min(axis=1) >= cfg.pseudo_threshold
            probs = (probs >= 0.5).astype(np.float64)
    hard_class = task.kind == "single" and cfg.pseudo_threshold is not None
    items = [replace(it, target=int(row[0]) if hard_class else tuple(float(v) for v in row))
             for it, row, keep in zip(test, probs, kept_rows) if keep]
    record = {"pseudo_label": str(cfg.pseudo_label), "pseudo_rows": len(items), "pseudo_test_images": len(test),
              "pseudo_threshold": cfg.pseudo_threshold, "pseudo_members": members, "pseudo_note": note}
    return items, record


def training_items(items: list[Item], pseudo: list[Item], task: Task) -> list[Item]:
    """The rows a member trains on: its own, then the pseudo-labelled ones; when some target is a probability
    row, class indices become one-hot rows too (one target shape per loader)."""
    rows = [*items, *pseudo]
    if task.kind != "single" or all(isinstance(it.target, int) for it in rows):
        return rows
    return [replace(it, target=tuple(float(v) for v in np.eye(len(task.names))[it.target]))
            if isinstance(it.target, int) else it for it in rows]


OOF_NOTE = ("; optimistic CV: each fold's soft targets came from teacher models that trained on that fold's "
            "validation rows")
FOLD_PSEUDO_NOTE = ("trained with pseudo-labels from test predictions of {run}'s model of the same fold: the test "
                    "set is not in the CV, but the model saw its images")
PSEUDO_NOTE = ("trained with pseudo-labels from test predictions of {run}: the test set is not in the CV, but the "
               "model saw its images (labelled by members that trained on every fold's rows)")


def teacher_record(cfg: TrainConfig) -> dict:
    """What --soft-labels records: the teacher, its CV and the mixing weight ({} without one)."""
    if cfg.soft_labels is None:
        return {}
    cv = Run(cfg.soft_labels).read_cv() or {}
    return {"soft_labels": str(cfg.soft_labels), "soft_weight": cfg.soft_weight, "teacher_source": cfg.teacher_source,
            "teacher_cv": cv.get("cv"), "teacher_interval": cv.get("interval"), "teacher_metric": cv.get("metric")}


class Teachers:
    """The teachers of a run, read once: the soft-label table and the pseudo-labelled test images."""

    def __init__(self, cfg: TrainConfig, soft: pd.DataFrame | None, pseudo: list[Item], pseudo_note: dict):
        self.soft, self.pseudo, self.info = soft, pseudo, None
        self.record = {**teacher_record(cfg), **pseudo_note}
        self.record["line"] = teacher_line(self.record)

    @classmethod
    def read(cls, cfg: TrainConfig, task: Task, info: dict) -> Teachers | None:
        """The run's teachers, checked (None when it has none)."""
        if cfg.soft_weight > 1 or (cfg.pseudo_threshold or 0) > 1:
            raise PipelineError("--soft-weight and --pseudo-threshold are probabilities: give a value in [0, 1]")
        if cfg.soft_labels is None and cfg.pseudo_label is None:
            return None
        if cfg.soft_labels is not None and cfg.mode == "holdout":
            raise PipelineError("--soft-labels needs fold members (--folds K) or --full: the holdout's validation "
                                "rows are training rows of the teacher's folds")
        if cfg.pseudo_label is not None and cfg.balance == "sampler":
            raise PipelineError("--balance sampler weighs labelled rows only; with --pseudo-label use "
                                "--balance loss or none")
        per_fold = cfg.teacher_source == "fold" and cfg.mode == "folds"  # else: what predict kept
        pseudo, note = ([], {}) if per_fold else pseudo_items(cfg, task, info)
        teachers = cls(cfg, soft_table(cfg, task), pseudo, note)
        if per_fold and cfg.pseudo_label is not None:  # its fold-k model labels fold k's test rows
            check_same_folds(cfg, _teacher(cfg.pseudo_label, cfg, "--pseudo-label")[1], cfg.pseudo_label,
                             "--pseudo-label")
            teachers.info = info
        return teachers

    def member_rows(self, cfg: TrainConfig, member, train_items: list[Item], task: Task) -> tuple[list[Item], dict]:
        """A member's training rows (its items with mixed targets, then the pseudo rows) and their record."""
        table, source = self.soft, None
        if self.soft is not None and cfg.teacher_source == "fold" and member.fold is not None:
            table, source = fold_table(cfg, member.fold, train_items, task)
        pseudo, record = self.pseudo, self.record
        if self.info is not None and member.fold is not None:  # --teacher-source fold
            pseudo, note = fold_pseudo_items(cfg, task, self.info, member.fold)
            record = {**record, **note}
            record["line"] = teacher_line(record)
        rows = training_items(soft_items(cfg, task, train_items, table, source), pseudo, task)
        return rows, {**record, "labelled_rows": len(train_items)}


def teacher_line(record: dict) -> str:
    """The record in words, for the run summary and the CV table (pure)."""
    parts = []
    if record.get("soft_labels"):
        cv = record.get("teacher_cv")
        score = f"its CV {record.get('teacher_metric')} {cv:.4f}" if cv is not None else "its CV unknown"
        where = {"fold": "predictions of the same fold's model of", "all": "out-of-fold predictions of"}
        parts.append(f"soft labels: (1 - {record['soft_weight']:g}) x label + {record['soft_weight']:g} x the "
                     f"{where[record.get('teacher_source', 'all')]} {record['soft_labels']} ({score})"
                     + (OOF_NOTE if record.get("teacher_source") == "all" else ""))
    if record.get("pseudo_label"):
        cut = record.get("pseudo_threshold")
        how = "soft" if cut is None else f"hard where the teacher's top probability >= {cut:g}"
        parts.append(f"{record['pseudo_rows']} of {record['pseudo_test_images']} test images added to every "
                     f"member's training rows ({how}); {record['pseudo_note']}")
    return "; ".join(parts)
