"""The cross-validation score: out-of-fold predictions of every fold, scored once all are finished.

Each fold's model predicts its own validation fold through
:func:`pipeline.predict.predict_items`, the path the submission takes, with
the run's TTA; oof.csv and cv.json are written through the run layout.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from pipeline.competition import Competition
from pipeline.config import TrainConfig
from pipeline.data import fold_split, n_folds
from pipeline.metrics import score
from pipeline.predict import predict_items
from pipeline.runs import FOLD, Member, Run, member_name

log = logging.getLogger("pipeline")


def write_cv(cfg: TrainConfig, comp: Competition, info: dict) -> dict | None:
    """oof.csv and cv.json, once every fold of folds.csv has a finished model."""
    run = Run(cfg.run_dir)
    members = [run.member(member_name(FOLD, k)) for k in range(n_folds(cfg.work_dir))]
    missing = [m.name for m in members if not m.is_finished]
    if missing:
        log.info("out-of-fold score waits for %s", ", ".join(missing))
        return None
    classes = info["classes"]
    frames, per_fold = [], []
    for member in members:
        _, valid_items = fold_split(cfg.work_dir, info, member.fold)
        ids, probs, _ = predict_items([member], valid_items, tta=cfg.tta, device=cfg.device,
                                      num_workers=cfg.num_workers, unreadable="drop")
        kept = set(ids)
        targets = np.array([it.target for it in valid_items if it.id in kept])
        per_fold.append({"fold": member.fold, **score(probs, targets, len(classes)), **_fold_meta(member)})
        frame = pd.DataFrame(probs, columns=classes)
        frame.insert(0, "label", [classes[t] for t in targets])
        frame.insert(0, "id", ids)
        frames.append(frame)
    oof = pd.concat(frames, ignore_index=True)
    targets = oof["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    overall = score(oof[classes].to_numpy(), targets, len(classes))
    cv = {"metric": comp.metric, "cv": overall[comp.metric], "overall": overall, "folds": per_fold, "tta": cfg.tta}
    run.write_cv(cv, oof)
    log.info("CV %s %.4f out of fold: %s, %s", comp.metric, cv["cv"], run.oof_path, run.cv_path)  # the table: stdout
    return cv


def _fold_meta(member: Member) -> dict:
    done = member.done()
    return {"epochs": done["epochs"], "best_epoch": done["best"]["epoch"],
            "seconds": round(float(member.metrics()["seconds"].sum()), 1)}


def format_cv_table(cv: dict) -> str:
    lines = [f"{'fold':>4}  {'epochs':>6}  {'best':>4}  {'accuracy':>8}  {'log_loss':>8}  {'seconds':>8}"]
    for f in cv["folds"]:
        lines.append(f"{f['fold']:>4}  {f['epochs']:>6}  {f['best_epoch']:>4}  {f['accuracy']:>8.4f}  "
                     f"{f['log_loss']:>8.4f}  {f['seconds']:>8.1f}")
    o = cv["overall"]
    lines.append(f"{'oof':>4}  {'':>6}  {'':>4}  {o['accuracy']:>8.4f}  {o['log_loss']:>8.4f}")
    return "cross-validation (out of fold):\n" + "\n".join(lines)
