"""The cross-validation score: out-of-fold predictions of every fold, scored once all are finished.

Each fold's model predicts its own validation fold through
:func:`pipeline.predict.stage.predict_items`, the path the submission takes, with
the run's TTA; oof.csv and cv.json are written through the run layout.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd

from pipeline.competition import Competition
from pipeline.config import TrainConfig
from pipeline.data.views import eval_geometry
from pipeline.data.items import fold_split, n_folds, read_folds
from pipeline.errors import PipelineError
from pipeline.metrics import bootstrap_interval, reported_metrics, score
from pipeline.predict.decide import decision_interval, needs_decision, nested_decision
from pipeline.predict.calibrate import calibrate_oof, is_on, paired_change_interval
from pipeline.predict.stage import predict_items
from pipeline.runs import FOLD, Member, Run, member_name
from pipeline.models.task import Task
from pipeline.predict.submission import in_class_order, positive_index, submission_clip

log = logging.getLogger("pipeline")


LOCK_WAIT = 3600.0  # seconds a finishing fold waits for another process assembling the CV


def assemble_cv(cfg: TrainConfig, comp: Competition, info: dict, force: bool = False,
                required: bool = False) -> dict | None:
    """oof.csv and cv.json once every fold of folds.csv has a finished model, written exactly once.

    Folds may train in separate processes (``--fold K`` on several GPUs,
    machines or job-array tasks sharing RUN_DIR): each calls this when its fold
    is done, under the run's short lock. Whichever finds every fold finished
    first writes the CV; cv.json records the weights it scored (each fold's
    best.pt stamp), so later callers find it current and skip it, and a
    retrained fold makes it stale. ``force``: assemble again anyway;
    ``required``: a fold still missing is an error, not a wait.
    """
    run = Run(cfg.run_dir)
    with run.lock(wait=LOCK_WAIT):
        members = [run.member(member_name(FOLD, k)) for k in range(n_folds(cfg.work_dir))]
        missing = [m.name for m in members if not m.is_finished]
        if missing and required:
            raise PipelineError(f"{run.dir}: no CV yet, {', '.join(missing)} not finished; train them "
                                f"(`pipeline train ... --fold K`) and run this again")
        if missing:
            log.info("out-of-fold score waits for %s", ", ".join(missing))
            return None
        stamps = {m.name: m.weights_stamp() for m in members}
        current = run.read_cv()
        if current is not None and current.get("weights") == stamps and not force:
            log.info("CV already assembled from these folds' weights: %s", run.cv_path)
            return current
        return write_cv(cfg, comp, info, members, stamps)


def write_cv(cfg: TrainConfig, comp: Competition, info: dict, members: list[Member], stamps: dict) -> dict:
    """Score the finished folds out of fold and write oof.csv and cv.json (call :func:`assemble_cv`).

    The CV score is computed the way the submission is: the weights predict
    keeps, the run's TTA, the submission's probability floor. With --select
    best those weights were picked on each fold's own validation data, so the
    score is optimistic: the last epoch's CV is computed and reported beside it.
    """
    run = Run(cfg.run_dir)
    task = Task.of(info)
    calibrate = is_on(cfg.calibrate, comp.metric) and task.kind == "single"
    oof, per_fold = out_of_fold(cfg, comp, info, members, "best")
    calibration, oof = calibrated(cfg, comp, info, oof) if calibrate else (None, oof)
    cv = {"metric": comp.metric, **_overall(oof, comp, info, cfg), "folds": per_fold, "tta": cfg.tta,
          "test_side": eval_geometry(cfg)[0],  # the side the views were decoded at (--test-size)
          "clip": submission_clip(comp), "selection": cfg.select, "note": SELECTION_NOTES[cfg.select],
          "calibration": calibration}
    if task.kind != "single":
        cv["task"] = task.kind
    teacher = (members[0].recorded_plan() or {}).get("teacher")  # --soft-labels / --pseudo-label, as trained
    if teacher:
        cv["teacher"] = teacher
    if cfg.select == "best":
        last, _ = out_of_fold(cfg, comp, info, members, "last")
        cv["last_epoch"] = _overall(calibrated(cfg, comp, info, last)[1] if calibrate else last, comp, info, cfg)
    cv["weights"] = stamps
    run.write_cv(cv, oof)
    log.info("CV %s %.4f out of fold: %s, %s", comp.metric, cv["cv"], run.oof_path, run.cv_path)  # the table: stdout
    return cv


SELECTION_NOTES = {
    "last": "every fold's last epoch: no selection on the data the score is computed on",
    "best": "every fold's best epoch, chosen on its own validation fold: optimistic; last_epoch is the honest figure",
}


def out_of_fold(cfg: TrainConfig, comp: Competition, info: dict, members: list[Member],
                weights: str) -> tuple[pd.DataFrame, list[dict]]:
    """The out-of-fold predictions frame (id, label, one column per class) and per-fold scores."""
    classes, frames, per_fold, task = info["classes"], [], [], Task.of(info)
    for member in members:
        _, valid_items = fold_split(cfg.work_dir, info, member.fold)
        ids, probs, run_classes = predict_items([member], valid_items, tta=cfg.tta, device=cfg.device,
                                                num_workers=cfg.num_workers, unreadable="drop", weights=weights,
                                                work_dir=cfg.work_dir)
        probs = in_class_order(probs, run_classes, classes)
        kept = set(ids)
        targets = np.array([it.target for it in valid_items if it.id in kept])
        scores = score(probs, targets, len(classes), reported_metrics(comp.metric, task.kind),
                       clip=submission_clip(comp), positive=positive_index(comp), task=task, beta=comp.beta)
        per_fold.append({"fold": member.fold, **scores, **_fold_meta(member)})
        frame = pd.DataFrame(probs, columns=classes)
        frame.insert(0, "label", [task.target_text(t) for t in targets])
        frame.insert(0, "id", ids)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True), per_fold


def calibrated(cfg: TrainConfig, comp: Competition, info: dict, oof: pd.DataFrame) -> tuple[dict, pd.DataFrame]:
    """What calibration stores (its values, the uncalibrated and in-sample scores) and the nested calibrated OOF.

    The frame returned (what oof.csv keeps and blend reads) is the nested one:
    fold k's rows calibrated with values fitted on the other folds.
    """
    classes = info["classes"]
    targets = oof["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    folds = read_folds(cfg.work_dir).loc[oof["id"]].to_numpy()
    raw = oof[classes].to_numpy(dtype=np.float64)
    nested, in_sample, record = calibrate_oof(raw, targets, folds, classes)
    frame = oof.copy()
    frame[classes] = nested
    in_sample_frame = oof.copy()
    in_sample_frame[classes] = in_sample
    return {**record, "uncalibrated": _overall(oof, comp, info, cfg)["cv"], "in_sample": _overall(
        in_sample_frame, comp, info, cfg)["cv"], "change_interval": paired_change_interval(raw, nested, targets),
        "note": CALIBRATION_NOTE}, frame


CALIBRATION_NOTE = ("calibrated nested: each fold calibrated with a temperature and prior weight fitted on the other "
                    "folds; in_sample: fitted on every out-of-fold row, optimistic; the test set gets those values")


def _overall(oof: pd.DataFrame, comp: Competition, info: dict, cfg: TrainConfig) -> dict:
    """The CV score of an out-of-fold frame, every metric, and a bootstrap 95% interval.

    A metric scored on decisions that thresholds fitted out of fold improve (pipeline/predict/decide.py) is
    reported nested, with the thresholds' record under ``decision``; the interval is of those decisions.
    """
    classes, task = info["classes"], Task.of(info)
    targets = task.targets_from_text(oof["label"])
    probs, clip = oof[classes].to_numpy(), submission_clip(comp)
    overall = score(probs, targets, len(classes), reported_metrics(comp.metric, task.kind), clip=clip,
                    positive=positive_index(comp), task=task, beta=comp.beta)
    result = {"cv": overall[comp.metric], "overall": overall}
    if needs_decision(task, comp.metric):
        folds = read_folds(cfg.work_dir).loc[oof["id"]].to_numpy()
        decision, decided = nested_decision(task, probs, targets, folds, comp.metric, comp.beta)
        overall[comp.metric] = result["cv"] = decision["nested"]
        result["decision"] = decision
        return {**result, "interval": list(decision_interval(task, targets, decided, comp.metric, comp.beta))}
    interval = bootstrap_interval(probs, targets, len(classes), comp.metric, clip=clip, n=200, task=task,
                                  beta=comp.beta)
    return {**result, "interval": list(interval)}


def _fold_meta(member: Member) -> dict:
    done = member.done()
    kept = done.get("kept") or {}
    return {"epochs": done["epochs"], "best_epoch": done["best"]["epoch"], "kept_epoch": kept.get("epoch"),
            "seconds": round(float(member.metrics()["seconds"].sum()), 1)}


def format_cv_table(cv: dict) -> str:
    """The per-fold table, the out-of-fold row, the interval and what the score describes."""
    o = cv["overall"]
    names = [n for n in o if n != cv["metric"]][:2]  # the task's usual two (single: accuracy, log loss)
    lines = [f"{'fold':>4}  {'epochs':>6}  {'kept':>4}  {'best':>4}  " + "  ".join(f"{n:>8}" for n in names)
             + f"  {'seconds':>8}"]
    for f in cv["folds"]:
        lines.append(f"{f['fold']:>4}  {f['epochs']:>6}  {f.get('kept_epoch') or '':>4}  {f['best_epoch']:>4}  "
                     + "  ".join(f"{f[n]:>8.4f}" for n in names) + f"  {f['seconds']:>8.1f}")
    lines.append(f"{'oof':>4}  {'':>6}  {'':>4}  {'':>4}  " + "  ".join(f"{o[n]:>8.4f}" for n in names))
    lo, hi = cv.get("interval", [math.nan, math.nan])
    side = f" at side {cv['test_side']}" if "test_side" in cv else ""  # the test images' side (--test-size)
    lines.append(f"CV {cv['metric']} {cv['cv']:.4f} (95% interval {lo:.4f}-{hi:.4f}; tta {cv['tta']}{side}; "
                 f"{cv.get('note', '')})")
    decision = cv.get("decision")
    if decision:
        lines.append(f"  thresholds fitted out of fold, scored nested {decision['nested']:.4f}; in-sample "
                     f"{decision['in_sample']:.4f} (optimistic); default thresholds {decision['default']:.4f}")
    cal = cv.get("calibration")
    if cal:
        lines.append(f"  calibrated nested (temperature {cal['temperature']:.3f}, prior weight {cal['weight']:.3f} "
                     f"fitted on the other folds); uncalibrated {cal['uncalibrated']:.4f}; "
                     f"in-sample calibrated {cal['in_sample']:.4f} (optimistic); log loss change by calibration "
                     f"{cal['change_interval'][0]:+.4f} to {cal['change_interval'][1]:+.4f} (paired 95% interval)")
    if "last_epoch" in cv:
        lines.append(f"CV {cv['metric']} of the last epochs: {cv['last_epoch']['cv']:.4f}")
    if cv.get("teacher"):
        lines.append(f"  {cv['teacher']['line']}")
    return "cross-validation (out of fold):\n" + "\n".join(lines)
