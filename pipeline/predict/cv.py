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
from pipeline.data.items import fold_split, n_folds
from pipeline.errors import PipelineError
from pipeline.metrics import bootstrap_interval, reported_metrics, score
from pipeline.predict.stage import predict_items
from pipeline.runs import FOLD, Member, Run, member_name
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
    oof, per_fold = out_of_fold(cfg, comp, info, members, "best")
    cv = {"metric": comp.metric, **_overall(oof, comp, info["classes"]), "folds": per_fold, "tta": cfg.tta,
          "clip": submission_clip(comp), "selection": cfg.select, "note": SELECTION_NOTES[cfg.select]}
    if cfg.select == "best":
        last, _ = out_of_fold(cfg, comp, info, members, "last")
        cv["last_epoch"] = _overall(last, comp, info["classes"])
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
    classes, frames, per_fold = info["classes"], [], []
    for member in members:
        _, valid_items = fold_split(cfg.work_dir, info, member.fold)
        ids, probs, run_classes = predict_items([member], valid_items, tta=cfg.tta, device=cfg.device,
                                                num_workers=cfg.num_workers, unreadable="drop", weights=weights)
        probs = in_class_order(probs, run_classes, classes)
        kept = set(ids)
        targets = np.array([it.target for it in valid_items if it.id in kept])
        scores = score(probs, targets, len(classes), reported_metrics(comp.metric), clip=submission_clip(comp),
                       positive=positive_index(comp))
        per_fold.append({"fold": member.fold, **scores, **_fold_meta(member)})
        frame = pd.DataFrame(probs, columns=classes)
        frame.insert(0, "label", [classes[t] for t in targets])
        frame.insert(0, "id", ids)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True), per_fold


def _overall(oof: pd.DataFrame, comp: Competition, classes: list[str]) -> dict:
    """The CV score of an out-of-fold frame, every metric, and a bootstrap 95% interval."""
    targets = oof["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    probs, clip = oof[classes].to_numpy(), submission_clip(comp)
    overall = score(probs, targets, len(classes), reported_metrics(comp.metric), clip=clip, positive=positive_index(comp))
    interval = bootstrap_interval(probs, targets, len(classes), comp.metric, clip=clip, n=200)
    return {"cv": overall[comp.metric], "interval": list(interval), "overall": overall}


def _fold_meta(member: Member) -> dict:
    done = member.done()
    kept = done.get("kept") or {}
    return {"epochs": done["epochs"], "best_epoch": done["best"]["epoch"], "kept_epoch": kept.get("epoch"),
            "seconds": round(float(member.metrics()["seconds"].sum()), 1)}


def format_cv_table(cv: dict) -> str:
    """The per-fold table, the out-of-fold row, the interval and what the score describes."""
    lines = [f"{'fold':>4}  {'epochs':>6}  {'kept':>4}  {'best':>4}  {'accuracy':>8}  {'log_loss':>8}  {'seconds':>8}"]
    for f in cv["folds"]:
        lines.append(f"{f['fold']:>4}  {f['epochs']:>6}  {f.get('kept_epoch') or '':>4}  {f['best_epoch']:>4}  "
                     f"{f['accuracy']:>8.4f}  {f['log_loss']:>8.4f}  {f['seconds']:>8.1f}")
    o = cv["overall"]
    lines.append(f"{'oof':>4}  {'':>6}  {'':>4}  {'':>4}  {o['accuracy']:>8.4f}  {o['log_loss']:>8.4f}")
    lo, hi = cv.get("interval", [math.nan, math.nan])
    lines.append(f"CV {cv['metric']} {cv['cv']:.4f} (95% interval {lo:.4f}-{hi:.4f}; tta {cv['tta']}; "
                 f"{cv.get('note', '')})")
    if "last_epoch" in cv:
        lines.append(f"CV {cv['metric']} of the last epochs: {cv['last_epoch']['cv']:.4f}")
    return "cross-validation (out of fold):\n" + "\n".join(lines)
