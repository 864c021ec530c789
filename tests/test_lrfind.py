"""`pipeline lr-find`: the learning-rate range test, its suggestion and its plot."""
from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.cli.app import app
from conftest import config_from_recipe
from pipeline.errors import PipelineError
from pipeline.train.lrfind import blown_up, centred, find_lr, lr_schedule, smooth, suggest


def test_the_schedule_is_geometric_between_its_ends():
    lrs = lr_schedule(1e-9, 1.0, 10)
    assert lrs[0] == pytest.approx(1e-9) and lrs[-1] == pytest.approx(1.0)
    assert np.allclose(lrs[1:] / lrs[:-1], 10.0)  # one decade per step
    for start, end, steps in ((1.0, 0.1, 100), (0.0, 1.0, 100), (1e-5, 1.0, 5)):
        with pytest.raises(PipelineError):
            lr_schedule(start, end, steps)


def test_the_running_average_is_debiased_and_the_centred_one_has_no_lag():
    assert np.allclose(smooth([2.0] * 20), 2.0)  # no pull towards 0 at the start
    ramp = np.arange(100, dtype=float)
    assert np.allclose(centred(ramp)[5:-5], ramp[5:-5])  # a straight line is left where it is
    assert smooth(list(ramp))[50] < 45  # while the running average trails it


def curve(lrs: np.ndarray, drop_at: float, blow_at: float) -> np.ndarray:
    """A loss that falls around ``drop_at`` and blows up past ``blow_at`` (log10 lr)."""
    x = np.log10(lrs)
    return 2.3 - 1.5 / (1 + np.exp(-4 * (x - drop_at))) + np.exp(3 * (x - blow_at))


def test_the_suggestion_is_the_steepest_fall_capped_below_the_minimum():
    lrs = lr_schedule(1e-7, 10, 300)
    values = curve(lrs, drop_at=-3, blow_at=0)
    steepest, minimum, suggested = suggest(lrs, values)
    assert 10 ** -3.3 < steepest < 10 ** -2.7
    assert minimum == lrs[np.argmin(values)] and 10 ** -2.7 < minimum < 1
    assert suggested == pytest.approx(min(steepest, minimum / 10))
    steepest, minimum, suggested = suggest(lrs, curve(lrs, drop_at=-1, blow_at=-0.5))  # falls close to the edge
    assert suggested == pytest.approx(minimum / 10) and suggested < steepest


def test_the_test_stops_once_the_loss_blows_up():
    assert not blown_up(3.0, 1.0, step=2, steps=100)  # the average is still warming up
    assert blown_up(4.5, 1.0, step=50, steps=100) and not blown_up(3.5, 1.0, step=50, steps=100)
    assert blown_up(float("nan"), 1.0, step=1, steps=100)


def test_find_lr_runs_the_training_model_and_stops_when_it_diverges(toy_work, tmp_path):
    comp, work = toy_work
    cfg = config_from_recipe(comp, work, tmp_path / "unused", batch_size=8, device="cpu").config
    result = find_lr(cfg, steps=60, start=1e-4, end=1e6)
    assert result.stopped_early and len(result.lrs) < 60  # SGD at lr 1e6 diverges long before the end
    assert result.lrs[0] == pytest.approx(1e-4) and len(result.losses) == len(result.lrs)
    assert min(result.lrs) <= result.suggested <= result.minimum / 10 * 1.0001
    assert not (tmp_path / "unused").exists()  # nothing is written to a run


def test_logreg_has_no_learning_rate_to_find(toy_work, tmp_path):
    comp, work = toy_work
    cfg = config_from_recipe(comp, work, tmp_path / "r", freeze_backbone=True, head="logreg", device="cpu").config
    with pytest.raises(PipelineError, match="logreg"):
        find_lr(cfg, steps=20)


def test_the_command_writes_a_png_and_prints_the_suggestion(toy_work, tmp_path):
    comp, work = toy_work
    png = tmp_path / "plots" / "lr.png"
    png.parent.mkdir()
    result = CliRunner().invoke(app, ["lr-find", comp.slug, str(work), str(png), "--steps", "30", "--batch-size", "8",
                                      "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shown["steps"] <= 30
    assert shown["suggested"] <= shown["minimum_over_10"] * 1.0001 and sorted(p.name for p in png.parent.iterdir()) == ["lr.png"]
    bad = CliRunner().invoke(app, ["lr-find", comp.slug, str(work), str(tmp_path / "lr.jpg")])
    assert bad.exit_code == 1 and "PNG" in bad.output


def test_lr_find_initialises_the_model_from_data_as_train_does(toy_work, tmp_path, monkeypatch):
    from pipeline.models.fastnet import FastNet

    calls = []
    original = FastNet.init_from_data
    monkeypatch.setattr(FastNet, "init_from_data", lambda self, x: calls.append(tuple(x.shape)) or original(self, x))
    comp, work = toy_work
    cfg = config_from_recipe(comp, work, tmp_path / "r", batch_size=8, device="cpu", data_init=True).config
    find_lr(cfg, steps=10, start=1e-4, end=1e-1)
    assert calls == [(8, 3, 16, 16)]  # one image batch of the training loader
