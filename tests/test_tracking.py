"""--track mlflow against MLflow's own local store (SQLite in the run), read back with MLflow's client."""
from __future__ import annotations

import sys

import pytest
from typer.testing import CliRunner

from pipeline.cli.app import app
from pipeline.runs import Run

mlflow = pytest.importorskip("mlflow", reason="the mlflow extra is not installed (pip install .[mlflow])")


def ok(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.slow  # a 3-fold run, a prediction and MLflow's SQLite store created for real (about 30 s)
def test_a_tracked_run_reads_back_from_the_local_store(toy_work, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    comp, work = toy_work
    run = Run(tmp_path / "run")
    ok("train", comp.slug, work, run.dir, "--folds", "3", "--epochs", "2", "--batch-size", "8", "--device", "cpu",
       "--lr", "0.05", "--track", "mlflow")
    submission = tmp_path / "submissions" / "toy.csv"
    ok("predict", comp.slug, work, run.dir, submission, "--device", "cpu", "--track", "mlflow")
    client = MlflowClient(tracking_uri=f"sqlite:///{run.dir.resolve()}/mlflow/mlflow.db")
    experiment = client.get_experiment_by_name(f"pipeline-{comp.slug}")
    found = client.search_runs([experiment.experiment_id])
    parent = [r for r in found if "member" not in r.data.tags]
    assert len(parent) == 1 and len(found) == 4  # the run and its three folds
    parent = parent[0]
    params, cv = parent.data.params, run.read_cv()
    assert (params["lr"], params["source.lr"]) == ("0.05", "flag")  # the resolved value and where it came from
    assert (params["epochs"], params["model"], params["source.model"]) == ("2", "fastnet_s", "competition")
    assert parent.data.tags["competition"] == comp.slug
    assert parent.data.metrics["cv_accuracy"] == pytest.approx(cv["cv"])
    assert parent.data.metrics["cv_low_accuracy"] == pytest.approx(cv["interval"][0])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"summary.txt", "config.json", "cv.json", "submissions"} <= artifacts
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "submissions")] == ["submissions/toy.csv"]
    local = client.download_artifacts(parent.info.run_id, "submissions/toy.csv", str(tmp_path / "back"))
    assert open(local).read() == submission.read_text()
    for k in range(3):
        child = next(r for r in found if r.data.tags.get("member") == f"fold{k}")
        member = run.member(f"fold{k}")
        assert child.data.tags["competition"] == comp.slug
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.params["fold"] == str(k) and child.info.status == "FINISHED"
        history = client.get_metric_history(child.info.run_id, "valid_accuracy")
        expected = member.metrics()
        assert [m.step for m in history] == expected["epoch"].tolist()  # every epoch, in order
        assert [m.value for m in history] == pytest.approx(expected["valid_accuracy"].tolist())


def test_a_missing_mlflow_is_one_line_naming_the_extra(toy_work, tmp_path, monkeypatch):
    comp, work = toy_work
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now raises ImportError
    result = CliRunner().invoke(app, ["train", comp.slug, str(work), str(tmp_path / "run"), "--epochs", "1",
                                      "--device", "cpu", "--track", "mlflow"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "error: --track mlflow needs MLflow, which is not installed: pip install kaggle-pipeline[mlflow]"]
    assert not (tmp_path / "run").exists()  # refused before anything was written
