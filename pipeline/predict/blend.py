"""Blending runs: one weight per run, fitted on their out-of-fold predictions, applied to their test probabilities.

The weights (w >= 0, sum 1) minimise the log loss of the weighted average of
the runs' out-of-fold probabilities (scipy's SLSQP does the fitting), whatever
the competition's metric: log loss is smooth in the weights, accuracy-like
metrics are step functions of them. Weights fitted on all out-of-fold rows
have seen the rows they are scored on, so that score is optimistic; the
blended CV is nested instead: each fold's rows are blended with weights fitted
on the other folds, and those out-of-fold blends are scored once. The test set
gets the weights fitted on all rows. The core (:func:`fit_weights`,
:func:`nested_blend`, :func:`blend_scores`) is pure; :func:`blend` reads the
runs and writes the submission and its record.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.competition import Competition
from pipeline.config import absolute, load_resolved
from pipeline.data.items import list_split, load_reorg, read_folds
from pipeline.errors import PipelineError
from pipeline.io import atomic_write_json, read_csv
from pipeline.metrics import bootstrap_interval, score
from pipeline.workdir import SAMPLE_FILE
from pipeline.models.task import Task
from pipeline.runs import Run
from pipeline.predict import calibrate
from pipeline.predict.submission import class_difference, positive_index, submission_clip, write_checked

log = logging.getLogger("pipeline")

RECORD_SUFFIX = ".blend.json"  # OUT.csv's record: OUT.blend.json beside it
LOG_FLOOR = 1e-15  # a true-class probability of 0 would make the log loss infinite and its gradient undefined
FITTED_ON = "log_loss"
NESTED_NOTE = ("blended CV: each fold blended with weights fitted on the other folds, scored once; "
               "in-sample: weights fitted on every out-of-fold row, optimistic")


# ---------------------------------------------------------------- the pure core


def blend_probs(probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The weighted average (N, C) of the runs' probabilities ``probs`` (R, N, C)."""
    return np.tensordot(np.asarray(weights, dtype=np.float64), probs, axes=1)


def fit_weights(probs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Simplex weights (R,) minimising the log loss of the blend of ``probs`` (R, N, C) against ``targets`` (N,).

    Only each row's true-class probability enters the log loss, so the fit
    works on the (R, N) matrix of those; SLSQP keeps w in [0, 1] with sum 1.
    """
    from scipy.optimize import minimize  # lazily: scipy takes a second to import

    n_runs = probs.shape[0]
    true = np.maximum(probs[:, np.arange(len(targets)), targets], LOG_FLOOR)  # (R, N)

    def loss(w: np.ndarray) -> float:
        return float(-np.mean(np.log(np.maximum(w @ true, LOG_FLOOR))))

    def grad(w: np.ndarray) -> np.ndarray:
        return -(true / np.maximum(w @ true, LOG_FLOOR)).mean(axis=1)

    result = minimize(loss, np.full(n_runs, 1.0 / n_runs), jac=grad, method="SLSQP",
                      bounds=[(0.0, 1.0)] * n_runs, options={"ftol": 1e-12, "maxiter": 1000},
                      constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones_like(w)}])
    if not result.success:
        raise PipelineError(f"fitting the blend weights failed ({result.message}); blend fewer or other runs")
    weights = np.clip(result.x, 0.0, None)  # SLSQP may end a hair below a bound
    return weights / weights.sum()


def nested_blend(probs: np.ndarray, targets: np.ndarray, folds: np.ndarray) -> tuple[np.ndarray, dict[int, list]]:
    """Out-of-fold blended probabilities (N, C): fold k's rows with weights fitted on the other folds' rows."""
    out = np.empty(probs.shape[1:], dtype=np.float64)
    fold_weights = {}
    for k in np.unique(folds):
        inside = folds == k
        weights = fit_weights(probs[:, ~inside], targets[~inside])
        out[inside] = blend_probs(probs[:, inside], weights)
        fold_weights[int(k)] = weights.tolist()
    return out, fold_weights


def blend_scores(probs: np.ndarray, targets: np.ndarray, folds: np.ndarray, comp: Competition) -> dict:
    """Each run's CV, the weights fitted on every row, the nested (honest) blended CV and the in-sample score.

    Scored as the CV is (pipeline/predict/cv.py): the competition's metric with the
    submission's probability floor.
    """
    n_classes = probs.shape[2]
    kw = {"clip": submission_clip(comp), "positive": positive_index(comp)}
    names = tuple(dict.fromkeys(("accuracy", FITTED_ON, comp.metric)))
    weights = fit_weights(probs, targets)
    nested, fold_weights = nested_blend(probs, targets, folds)
    blended = score(nested, targets, n_classes, names, **kw)
    in_sample = score(blend_probs(probs, weights), targets, n_classes, names, **kw)
    interval = bootstrap_interval(nested, targets, n_classes, comp.metric, clip=kw["clip"], n=200)
    return {"metric": comp.metric, "fitted_on": FITTED_ON, "weights": weights.tolist(),
            "fold_weights": fold_weights, "runs": [score(p, targets, n_classes, names, **kw) for p in probs],
            "blended_cv": blended[comp.metric], "blended": blended, "interval": list(interval),
            "in_sample": in_sample[comp.metric], "in_sample_scores": in_sample, "note": NESTED_NOTE}


# ---------------------------------------------------------------- reading the runs


def run_origin(run_dir: Path) -> tuple[str, Path]:
    """The competition a run was trained for and the work folder it was trained on (absolute)."""
    cfg, _ = load_resolved(Run(run_dir).config_path)
    return cfg.competition, absolute(cfg.work_dir)


def check_run_dirs(run_dirs: list[Path]) -> list[Run]:
    """The runs, refusing fewer than two, one named twice, or a folder that is no run."""
    if len(run_dirs) < 2:
        raise PipelineError(f"blend needs two or more RUN_DIRs, got {len(run_dirs)}")
    seen: dict[Path, Path] = {}
    for run_dir in run_dirs:
        key = Path(run_dir).resolve()
        if key in seen:
            raise PipelineError(f"{run_dir} is given twice (as {seen[key]}); name each run once")
        seen[key] = run_dir
        if not Path(run_dir).is_dir():
            raise PipelineError(f"{run_dir} is not a folder; blend takes RUN_DIRs then OUT.csv (a spec file goes "
                                "after --competition)")
        if not Run(run_dir).is_run():
            raise PipelineError(f"{run_dir} is not a training run (no config); give the folders `pipeline train` wrote")
    return [Run(d) for d in run_dirs]


def read_oof(run: Run, classes: list[str], normalise: bool = True) -> pd.DataFrame:
    """A run's out-of-fold frame indexed by id: its label and the class columns in ``classes``' order (by name);
    ``normalise``: rows rescaled to sum 1 (class probabilities; not a multilabel's or a number)."""
    if not run.oof_path.is_file():
        raise PipelineError(f"{run.dir} has no out-of-fold predictions ({run.oof_path.name}); "
                            "train it with --folds K to blend it")
    frame = read_csv(run.oof_path, what="out-of-fold predictions").fillna({"label": ""})
    differ = class_difference([c for c in frame.columns if c not in ("id", "label")], classes)
    if differ or "label" not in frame.columns or "id" not in frame.columns:
        raise PipelineError(f"{run.oof_path} does not have the columns id, label and the work folder's classes "
                            f"({differ or 'id or label missing'}); blend runs of one work folder")
    if frame["id"].duplicated().any():
        raise PipelineError(f"{run.oof_path} lists id {frame['id'][frame['id'].duplicated()].iloc[0]!r} twice; "
                            "retrain the run")
    frame = frame.set_index("id")
    probs = frame[classes].astype(float)
    return pd.concat([frame[["label"]], probs.div(probs.sum(axis=1), axis=0) if normalise else probs], axis=1)


def check_same_rows(first: Run, reference: pd.DataFrame, run: Run, frame: pd.DataFrame) -> None:
    """Refuse a run whose out-of-fold ids or labels are not the first run's."""
    missing, extra = reference.index.difference(frame.index), frame.index.difference(reference.index)
    if len(missing) or len(extra):
        some = (missing if len(missing) else extra)[0]
        raise PipelineError(f"{run.oof_path} and {first.oof_path} predict other images (id {some!r}: "
                            f"{len(missing)} missing, {len(extra)} extra); blend runs of one work folder")
    labels = frame.loc[reference.index, "label"]
    differ = labels != reference["label"]
    if differ.any():
        raise PipelineError(f"{run.oof_path} labels id {labels.index[differ.to_numpy()][0]!r} otherwise than "
                            f"{first.oof_path}; blend runs trained on the same labels")


def check_folds(run: Run, folds: pd.Series, work_dir: Path) -> None:
    """Refuse a run trained on a work folder whose folds.csv assigns other folds than WORK_DIR's."""
    _, run_work = run_origin(run.dir)
    if run_work == absolute(work_dir):
        return
    if not run_work.is_dir():
        raise PipelineError(f"{run.dir} was trained on {run_work}, which is gone, so its folds cannot be checked "
                            f"against {work_dir}; restore that folder or blend runs of {work_dir}")
    theirs = read_folds(run_work)
    if not (theirs.sort_index().equals(folds.sort_index())):
        raise PipelineError(f"{run.dir} was trained on the folds of {run_work}, not those of {work_dir}; "
                            "blend runs cross-validated on the same folds (one WORK_DIR)")


def load_oofs(runs: list[Run], work_dir: Path, classes: list[str],
              task: Task | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The runs' out-of-fold probabilities (R, N, C), targets (N,) and folds (N,), rows by id, columns by name;
    for a ``task`` other than single, its outputs and targets (N, K) as pipeline/models/task.py has them."""
    folds = read_folds(work_dir)
    single = task is None or task.kind == "single"
    frames = [read_oof(run, classes, normalise=single) for run in runs]
    for run, frame in zip(runs[1:], frames[1:]):
        check_same_rows(runs[0], frames[0], run, frame)
    for run in runs:
        check_folds(run, folds, work_dir)
    ids = frames[0].index
    unknown = ids.difference(folds.index)
    if len(unknown):
        raise PipelineError(f"{runs[0].oof_path} has id {unknown[0]!r}, which {work_dir}'s folds do not; "
                            "blend with the WORK_DIR the runs were trained on")
    if not single:
        try:
            targets = task.targets_from_text(frames[0]["label"].astype(str))
        except (KeyError, ValueError) as exc:
            raise PipelineError(f"{runs[0].oof_path} has a label {exc} that {work_dir} does not have; blend with "
                                "the WORK_DIR the runs were trained on") from None
        probs = np.stack([f.loc[ids, classes].to_numpy(dtype=np.float64) for f in frames])
        return probs, targets, folds.loc[ids].to_numpy()
    targets = frames[0]["label"].map({c: i for i, c in enumerate(classes)})
    if targets.isna().any():
        raise PipelineError(f"{runs[0].oof_path} labels id {targets.index[targets.isna()][0]!r} with a class "
                            f"{work_dir} does not have; blend with the WORK_DIR the runs were trained on")
    targets = targets.to_numpy(dtype=np.int64)
    probs = np.stack([f.loc[ids, classes].to_numpy(dtype=np.float64) for f in frames])
    return probs, targets, folds.loc[ids].to_numpy()


# ---------------------------------------------------------------- test probabilities and the submission


def run_test_probs(run: Run, config: dict, items: list, work_dir: Path, info: dict, *, device: str = "auto",
                   batch_size: int = 256, num_workers: int | None = None) -> pd.DataFrame:
    """The run's averaged test probabilities (id + class columns): kept ones when they still hold, else computed.

    Made as `pipeline predict` makes them (the finished members "auto", the
    run's TTA) and kept in the run, so the next blend reads them.
    """
    from pipeline.predict.stage import keep_test_probs, predict_items, test_probs_record

    members, tta = run.finished("auto"), config.get("tta", "none")
    kept = run.read_test_probs()
    if kept is not None:
        frame, record = kept
        if (record == test_probs_record(run, members, tta, len(items), work_dir, info)
                and set(frame["id"]) == {it.id for it in items}):
            log.info("%s: kept test probabilities %s", run.dir, run.test_probs_path)
            return frame
    log.info("%s: predicting the test set (%d members, tta %s)", run.dir, len(members), tta)
    ids, probs, classes = predict_items(members, items, tta=tta, device=device, num_workers=num_workers,
                                        batch_size=batch_size)
    probs = calibrate.apply_stored(calibrate.stored(run), probs, classes)  # as predict does: its OOF is calibrated
    return keep_test_probs(run, members, ids, probs, classes, tta, work_dir, info)


@dataclass(frozen=True)
class BlendResult:
    path: Path
    record_path: Path
    rows: int
    record: dict
    seconds: float


def record_path(out_csv: Path) -> Path:
    """OUT.csv's record: OUT.blend.json beside it."""
    out_csv = Path(out_csv)
    return out_csv.with_name(out_csv.stem + RECORD_SUFFIX)


def check_outputs(out_csv: Path, force: bool) -> None:
    """Refuse, before any compute, to replace OUT.csv or its record without ``force``."""
    if Path(out_csv).is_dir():
        raise PipelineError(f"{out_csv} is a folder; give the submission file to write after the RUN_DIRs")
    for path in (Path(out_csv), record_path(out_csv)):
        if path.exists() and not force:
            raise PipelineError(f"{path} already exists; pass --force to overwrite it or choose another name")


def blend(comp: Competition, run_dirs: list[Path], out_csv: Path, work_dir: Path | None = None, *,
          force: bool = False, device: str = "auto", batch_size: int = 256,
          num_workers: int | None = None) -> BlendResult:
    """Blend the runs' test probabilities with weights fitted on their out-of-fold predictions.

    Writes the checked submission OUT.csv and OUT.blend.json (weights, each
    run's CV, the nested blended CV, the in-sample score, the interval).
    ``work_dir`` None takes the first run's.
    """
    from pipeline.predict.stage import match_run

    start = time.perf_counter()
    check_outputs(out_csv, force)
    runs = check_run_dirs(list(run_dirs))
    work_dir = absolute(work_dir) if work_dir is not None else run_origin(runs[0].dir)[1]
    info = load_reorg(work_dir)
    configs = [match_run(run, comp, work_dir, info) for run in runs]  # competition, classes, training data
    task = Task.of(info)
    probs, targets, folds = load_oofs(runs, work_dir, info["classes"], task)
    if task.kind == "single":
        scores = blend_scores(probs, targets, folds, comp)
    else:
        from pipeline.predict.blend_kinds import blend_scores_task

        scores = blend_scores_task(task, probs, targets, folds, comp.metric, comp.beta)
        task = task.with_thresholds(scores["thresholds"]) if scores["thresholds"] else task
    items = list_split(work_dir, info, "test")
    tests = [run_test_probs(run, config, items, work_dir, info, device=device, batch_size=batch_size,
                            num_workers=num_workers) for run, config in zip(runs, configs)]
    ids = [it.id for it in items]
    stacked = np.stack([t.set_index("id").loc[ids, info["classes"]].to_numpy(dtype=np.float64) for t in tests])
    frame = write_blend(comp, work_dir, info, ids, blend_probs(stacked, scores["weights"]), out_csv, force, task)
    record = {**scores, "runs": [{"run": str(run.dir), "tta": config.get("tta", "none"), **s}
                                 for run, config, s in zip(runs, configs, scores["runs"])],
              "work_dir": str(work_dir), "submission": str(out_csv), "classes": info["classes"]}
    atomic_write_json(record_path(out_csv), record)
    return BlendResult(Path(out_csv), record_path(out_csv), len(frame), record, time.perf_counter() - start)


def write_blend(comp: Competition, work_dir: Path, info: dict, ids: list[str], probs: np.ndarray,
                out_csv: Path, force: bool, task: Task | None = None) -> pd.DataFrame:
    """The blended probabilities as a checked submission (predict's builder and checker; ``task`` with the
    thresholds fitted for the blend)."""
    sample = read_csv(Path(work_dir) / SAMPLE_FILE, what="sample submission")
    return write_checked(comp, ids, probs, info["classes"], sample, info["classes"], out_csv, force, task)


def format_blend(record: dict) -> str:
    """The table of runs (CV, log loss, weight), then the blended CV with its interval and the in-sample score."""
    metric, width = record["metric"], max(len(r["run"]) for r in record["runs"])
    fitted = record.get("fitted_on", FITTED_ON)
    lines = [f"{'run':<{width}}  {metric:>9}  {fitted:>9}  {'weight':>6}"]
    for r, w in zip(record["runs"], record["weights"]):
        lines.append(f"{r['run']:<{width}}  {r[metric]:>9.4f}  {r[fitted]:>9.4f}  {w:>6.3f}")
    lo, hi = record["interval"]
    lines.append(f"blended CV {metric} {record['blended_cv']:.4f} (95% interval {lo:.4f}-{hi:.4f}; "
                 f"weights fitted inside the folds on {fitted}"
                 + (f", not {metric}" if metric != fitted else "") + ")")
    lines.append(f"in-sample {metric} {record['in_sample']:.4f} (weights fitted on every out-of-fold row: "
                 "optimistic; the test set uses these weights)")
    return "\n".join(lines)
