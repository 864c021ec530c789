"""kernel build's predict-time estimate: the pure estimate, the record predict keeps, the warning."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import config_from_recipe
from pipeline.cli.app import app
from pipeline.kernel.estimate import (KAGGLE_LIMIT_HOURS, PredictEstimate, estimate_seconds, over_limit,
                                      per_image_seconds, view_count)
from pipeline.predict.stage import predict
from pipeline.runs import Run
from pipeline.train.stage import train


def test_the_estimate_scales_the_measured_time_per_image_member_and_view():
    record = {"seconds": 12.0, "images": 100, "members": 3, "views": 2}  # 12 s for 600 image passes
    assert per_image_seconds(record) == pytest.approx(0.02)
    assert estimate_seconds(0.02, 10_000, 3, 8, safety=2) == pytest.approx(0.02 * 10_000 * 3 * 8 * 2)  # 9600 s
    assert view_count("none") == 1 and view_count("flip") == 2 and view_count("d4") == 8


def test_the_warning_starts_past_the_limit():
    def est(seconds):
        return PredictEstimate(seconds, 0.01, 1000, 5, 8, 2.0, "cpu")

    assert over_limit(est(KAGGLE_LIMIT_HOURS * 3600)) is None
    warning = over_limit(est(KAGGLE_LIMIT_HOURS * 3600 + 1))
    assert warning.startswith("warning: the kernel's predict may take 9.00 h, over Kaggle's 9 h limit")
    assert over_limit(est(3 * 3600), limit_hours=2) is not None and "\n" not in warning


def test_kernel_build_estimates_from_the_runs_predict_and_warns_when_too_slow(toy_work, tmp_path, monkeypatch):
    comp, work = toy_work
    run = tmp_path / "run"
    train(config_from_recipe(comp, work, run, epochs=1, batch_size=8, device="cpu"))
    predict(comp, work, run, tmp_path / "sub.csv", device="cpu")
    record = Run(run).read_predict_time()
    assert record["images"] == 10 and record["members"] == 1 and record["views"] == 1 and record["device"] == "cpu"
    assert 0 < record["seconds"] < 60
    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)

    def build(out, *extra):
        result = CliRunner().invoke(app, ["kernel", "build", "toy", "--out", str(tmp_path / out), "--user", "me",
                                          "--run", str(run), *extra])
        assert result.exit_code == 0, result.output
        return result.output

    fast = build("k1")
    assert "predict estimate: " in fast and "10 test images x 1 member(s) x 1 view(s)" in fast
    assert "measured on cpu" in fast and "safety factor 2" in fast and "warning" not in fast
    assert "x 8 view(s)" in build("k2", "--predict-args", "--tta d4")  # the kernel's own TTA
    Run(run).write_predict_time({**record, "seconds": 20_000.0})  # a made-up slow model: 2,000 s per image
    slow = build("k3")
    assert "predict estimate: 11.11 h" in slow  # 2,000 s x 10 images x 2
    warnings = [line for line in slow.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "over Kaggle's 9 h limit" in warnings[0]
    Run(run).write_predict_time({**record, "seconds": 4000.0})  # 400 s per image: 2.22 h
    assert "warning" not in build("k4")
    warnings = [line for line in build("k5", "--kaggle-limit", "2").splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "over Kaggle's 2 h limit" in warnings[0]
    assert json.loads((tmp_path / "k5" / "kernel-metadata.json").read_text())["id"] == "me/toy-pipeline"
