"""One member plan: the batch, steps and data source a member runs are the same wherever they are shown."""
from __future__ import annotations

import json
import re

import pandas as pd
from typer.testing import CliRunner

from conftest import make_competition, write_raw
from pipeline.cli.app import app
from pipeline.competition import Recipe
from pipeline.config import resolve_config
from pipeline.data.items import load_reorg
from pipeline.download.reorg import reorg
from pipeline.runs import Run
from pipeline.train.plan import plan_run
from pipeline.train.summary import collect_warnings, log_run_summary


def uneven_folds(tmp_path):
    """A work folder whose fold 0 holds most images: its training rows are few, the other folds' many."""
    comp = make_competition("plans", recipe=Recipe(model="fastnet_s", epochs=40, batch_size=16, lr=0.1,
                                                    schedule="cosine", augment="pad_crop_flip"))
    raw = write_raw(tmp_path / "raw", comp, per_class=40)
    work = tmp_path / "work"
    reorg(comp, raw, work, valid_ratio=0.25, folds=3, seed=0)
    folds = pd.read_csv(work / "folds.csv", dtype=str, keep_default_na=False)
    folds["fold"] = ["0"] * 70 + ["1"] * 25 + ["2"] * (len(folds) - 95)  # fold 0 trains on 50 images only
    folds.to_csv(work / "folds.csv", index=False)
    return comp, work


def test_members_of_one_run_get_their_own_batch_steps_and_epochs(tmp_path):
    comp, work = uneven_folds(tmp_path)
    resolved = resolve_config(comp, work, tmp_path / "run", None, {"device": "cpu", "folds": 3})
    adapted, plans = plan_run(resolved, load_reorg(work))
    got = [(p.name, len(p.train_items), p.config.batch_size, p.steps_per_epoch, p.config.epochs, p.total_steps)
           for p in plans]
    # 50 images: batch 8 gives 6 steps an epoch, 40 epochs make 240 < 300 steps: 50 epochs; then, small data,
    # up to 1.5x the recipe's epochs for the images seen: 60. 95 images: 11 steps an epoch, 440 steps in the
    # recipe's 40 epochs, enough; the images seen raise them to 60 as well
    assert got == [("fold0", 50, 8, 6, 60, 360), ("fold1", 95, 8, 11, 60, 660), ("fold2", 95, 8, 11, 60, 660)]
    assert [(p.config.fold, p.config.folds) for p in plans] == [(0, 0), (1, 0), (2, 0)]
    assert any(n.startswith("epochs 40 -> 50") for n in adapted.notes)
    assert {p.source.kind for p in plans} == {"image_cache"}


def test_the_summary_shows_each_members_own_plan(tmp_path):
    """Today's summary gave every member the first member's batch and epochs."""
    comp, work = uneven_folds(tmp_path)
    resolved = resolve_config(comp, work, tmp_path / "run", None, {"device": "cpu", "folds": 3})
    adapted, plans = plan_run(resolved, load_reorg(work))
    text = log_run_summary(adapted, plans, load_reorg(work))
    assert "fold0: 50 train, 70 valid; batch 8, 6 steps/epoch, 360 steps in 60 epochs" in text
    assert "fold1: 95 train, 25 valid; batch 8, 11 steps/epoch, 660 steps in 60 epochs" in text
    assert "data       image_cache:" in text
    assert Run(tmp_path / "run").summary_path.read_text().strip() == text


def test_the_batch_warning_quotes_the_batch_the_member_runs(toy, tmp_path):
    """Today's check warned of the recipe's batch (16) although the member ran the adapted one (8)."""
    comp, raw = toy  # 36 images, 3 classes, recipe batch 16
    reorg(comp, raw, tmp_path / "work", valid_ratio=0.7, folds=0, seed=0)  # 10 training images
    resolved = resolve_config(comp, tmp_path / "work", tmp_path / "run", None, {"device": "cpu"})
    _, plans = plan_run(resolved, load_reorg(tmp_path / "work"))
    assert plans[0].config.batch_size == 8 and plans[0].warnings == ()
    flagged = resolve_config(comp, tmp_path / "work", tmp_path / "run", None, {"device": "cpu", "batch_size": 64})
    _, plans = plan_run(flagged, load_reorg(tmp_path / "work"))
    share = len(plans[0].train_items)
    assert plans[0].config.batch_size == share  # a flag is not adapted, but one batch is all there is
    assert plans[0].warnings == (f"holdout: {share} training images per process is less than one batch of 64; "
                                 f"using batch size {share}",)


def test_dry_run_warnings_summary_and_member_config_agree(toy, tmp_path):
    """The adapted batch, steps and data source read the same in --dry-run, the warnings, the summary and
    the member's config.json."""
    comp, raw = toy
    reorg(comp, raw, tmp_path / "work", valid_ratio=0.25, folds=0, seed=0)
    work, run = tmp_path / "work", tmp_path / "run"
    dry = CliRunner().invoke(app, ["train", "toy", str(work), str(run), "--device", "cpu", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    batch = int(re.search(r"^batch_size +(\d+) +adapted$", dry.stdout, re.M).group(1))
    epochs = int(re.search(r"^epochs +(\d+) +adapted$", dry.stdout, re.M).group(1))
    assert not run.exists()  # --dry-run writes nothing
    collect_warnings()
    result = CliRunner().invoke(app, ["train", "toy", str(work), str(run), "--device", "cpu", "--epochs", "1"])
    assert result.exit_code == 0, result.output
    plan = json.loads((run / "holdout" / "config.json").read_text())["plan"]
    member = json.loads((run / "holdout" / "config.json").read_text())["config"]
    assert member["batch_size"] == plan["batch_size"] == batch
    steps = plan["n_train"] // batch
    assert plan["steps_per_epoch"] == steps and plan["total_steps"] == steps * 1
    assert plan["source"]["kind"] == "image_cache" and plan["training"] == "sgd" and plan["weights"] == "none"
    summary = Run(run).summary_path.read_text()
    assert f"batch {batch}, {steps} steps/epoch, {steps} steps in 1 epochs" in summary
    assert f"data       image_cache: {plan['source']['reason']}" in summary
    assert f"batch_size {16} -> {batch}" in summary  # the adaptation note, once, among the warnings
    assert epochs > 1  # without --epochs the recipe's 2 epochs were raised for this small split


def test_lr_find_adapts_the_batch_as_train_does(toy, tmp_path):
    """lr-find on a download smaller than the recipe's batch used to stop: "found no full training batch"."""
    comp, raw = toy
    reorg(comp, raw, tmp_path / "work", valid_ratio=0.7, folds=0, seed=0)  # 10 training images, batch 16
    result = CliRunner().invoke(app, ["lr-find", "toy", str(tmp_path / "work"), str(tmp_path / "lr.png"),
                                      "--device", "cpu", "--steps", "12", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["steps"] == 12 and (tmp_path / "lr.png").stat().st_size > 0
