"""--track mlflow: a run, its members, its CV and its outputs in an MLflow tracking store.

One MLflow run per RUN_DIR (named after it, in the experiment
``pipeline-<competition>``) holds the resolved settings with the source of
each as params (``lr`` and ``source.lr``), the CV and its interval as metrics,
and the summary, config, cv.json, then the report and submissions as
artifacts; one nested run per member holds the member's own settings, its
per-epoch metrics (metrics.csv, step = epoch) and its kept score, tagged with
the competition and the member. Folds trained by separate processes add their
members to the same MLflow run (RUN_DIR/tracking.json, written under the
run's short lock).

The store is ``MLFLOW_TRACKING_URI`` when set (a server, a database), else a
SQLite database inside the run (RUN_DIR/mlflow/), so it works offline. MLflow
is an optional extra: ``pip install kaggle-pipeline[mlflow]``.
"""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError, check_choice
from pipeline.io import atomic_write_json, read_json
from pipeline.runs import Run

TRACKERS = ("none", "mlflow")
_MEMBER_CHOICE = ("folds", "fold", "full")  # differ between the processes of one run: on the member runs only
_LOCK_WAIT = 600.0


def wanted(track: str) -> bool:
    """Whether --track asks for MLflow; checked to be installed before anything runs."""
    check_choice("--track", track, TRACKERS)
    if track == "mlflow":
        require_mlflow()
    return track == "mlflow"


def require_mlflow():
    """The mlflow module, or a one-line error saying how to install it (checked before training starts)."""
    try:
        import mlflow
    except ImportError:
        raise PipelineError("--track mlflow needs MLflow, which is not installed: "
                            "pip install kaggle-pipeline[mlflow]") from None
    return mlflow


def store_uri(run: Run) -> str:
    """MLFLOW_TRACKING_URI, else a SQLite store in the run's own folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{run.tracking_dir.resolve() / 'mlflow.db'}"


def _client(run: Run):
    require_mlflow()
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=store_uri(run))


def track_training(run_dir: Path, members: list[str]) -> str:
    """Log the run (once: params; each time: CV, summary) and a nested run for each of ``members``."""
    run = Run(run_dir)
    client = _client(run)
    doc = read_json(run.config_path, "train the run first", "retrain into a new RUN_DIR")
    parent = _parent_run(client, run, doc)
    competition = _competition(doc)
    for name in members:
        _track_member(client, run, parent, name, competition)
    cv = run.read_cv()
    if cv is not None:
        values = {"cv": cv["cv"], "cv_low": cv["interval"][0], "cv_high": cv["interval"][1]}
        _log_metrics(client, parent, {f"{k}_{cv['metric']}": v for k, v in values.items()}, step=0)
    for path in (run.summary_path, run.config_path, run.cv_path):
        if path.is_file():
            client.log_artifact(parent, str(path))
    client.set_terminated(parent)
    return parent


def track_outputs(run_dir: Path, paths: list[Path], folder: str) -> str:
    """Add files (a submission) or folders (a report) to the run's MLflow run, under ``folder``."""
    run = Run(run_dir)
    client = _client(run)
    parent = _parent_run(client, run, read_json(run.config_path, "train the run first", "retrain into a new RUN_DIR"))
    for path in paths:
        if Path(path).is_dir():
            client.log_artifacts(parent, str(path), artifact_path=f"{folder}/{Path(path).name}")
        else:
            client.log_artifact(parent, str(path), artifact_path=folder)
    return parent


def _parent_run(client, run: Run, doc: dict) -> str:
    """The MLflow run of RUN_DIR in this store: created (with the settings as params) by the first caller."""
    uri = store_uri(run)
    with run.lock(wait=_LOCK_WAIT):
        known = read_json(run.tracking_path, "", "delete it to track the run anew") \
            if run.tracking_path.is_file() else {}
        if uri in known:
            return known[uri]["run_id"]
        competition = _competition(doc)
        experiment = _experiment(client, f"pipeline-{competition}", run)
        created = client.create_run(experiment, run_name=run.dir.name,
                                    tags={"competition": competition, "run_dir": str(run.dir.resolve()),
                                          "recipe": str(doc.get("recipe") or "default")})
        run_id = created.info.run_id
        config = {k: v for k, v in doc["config"].items() if k not in _MEMBER_CHOICE}
        sources = {f"source.{k}": v for k, v in doc.get("sources", {}).items() if k not in _MEMBER_CHOICE}
        _log_params(client, run_id, {**config, **sources})
        atomic_write_json(run.tracking_path, {**known, uri: {"experiment_id": experiment, "run_id": run_id}})
        return run_id


def _experiment(client, name: str, run: Run) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None if os.environ.get("MLFLOW_TRACKING_URI") else (run.tracking_dir / "artifacts").resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # another process created it meanwhile
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _track_member(client, run: Run, parent: str, name: str, competition: str) -> None:
    member = run.member(name)
    child = client.create_run(client.get_run(parent).info.experiment_id, run_name=f"{run.dir.name}/{name}",
                              tags={"competition": competition, "member": name, "mlflow.parentRunId": parent})
    run_id = child.info.run_id
    if member.config_path.is_file():
        _log_params(client, run_id, json.loads(member.config_path.read_text(encoding="utf-8"))["config"])
    if member.metrics_path.is_file():
        with open(member.metrics_path, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                epoch = int(float(row.pop("epoch")))
                _log_metrics(client, run_id, row, step=epoch)
    if member.is_finished:
        kept = member.done().get("kept") or {}
        if kept.get("metric") is not None:
            _log_metrics(client, run_id, {"kept_metric": kept["metric"]}, step=int(kept.get("epoch") or 0))
    client.set_terminated(run_id, "FINISHED" if member.is_finished else "KILLED")


def _log_params(client, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in params.items()]
    for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=items[start:start + 100])


def _log_metrics(client, run_id: str, values: dict[str, Any], step: int) -> None:
    """Every finite number of ``values`` (CSV strings included) at ``step``."""
    import time

    from mlflow.entities import Metric

    now, metrics = int(time.time() * 1000), []
    for key, value in values.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            metrics.append(Metric(key, number, now, step))
    if metrics:
        client.log_batch(run_id, metrics=metrics)


def _competition(doc: dict) -> str:
    competition = doc["config"]["competition"]
    return Path(competition).stem if competition.endswith(".toml") else competition
