"""--unfreeze-after: the head on a frozen backbone, then the whole model, in one resumable run."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from conftest import config_from_recipe
from pipeline.config import TrainConfig
from pipeline.train.engine import phase, phase_span
from pipeline.errors import PipelineError
from pipeline.models.weights import head_names, in_head
from pipeline.models import model_from_config as build_model
from pipeline.train.stage import train


def cfg_for(comp, work, run, **kw):
    base = dict(epochs=3, batch_size=8, device="cpu", unfreeze_after=1, backbone_lr_scale=0.1)
    return config_from_recipe(comp, work, run, **{**base, **kw})


def plain(**kw) -> TrainConfig:
    return TrainConfig(competition="x", work_dir=".", run_dir=".", model="m", **kw)


def test_phases_freeze_then_unfreeze_with_their_own_schedules():
    cfg = plain(epochs=5, unfreeze_after=2, head="mlp")
    assert [phase(cfg, e).freeze_backbone for e in range(5)] == [True, True, False, False, False]
    assert {phase(cfg, e).head for e in range(5)} == {"mlp"}
    fitted = plain(epochs=3, unfreeze_after=1, head="logreg")
    assert [phase(fitted, e).head for e in range(3)] == ["logreg", "linear", "linear"]  # fitted, then trained
    assert [phase_span(cfg, e) for e in (0, 1, 2, 4)] == [(0, 2), (0, 2), (2, 3), (2, 3)]
    off = plain(epochs=5, freeze_backbone=True)
    assert phase(off, 4) is off and phase_span(off, 4) == (0, 5)


@pytest.mark.parametrize("kw, message", [
    (dict(epochs=3, unfreeze_after=3), "leaves no epoch"),
    (dict(epochs=5, unfreeze_after=2, head="logreg"), "--unfreeze-after 1"),
])
def test_impossible_fine_tuning_is_refused(kw, message):
    with pytest.raises(PipelineError, match=message):
        plain(**kw)


def test_logreg_then_fine_tuning_needs_no_freeze_flag():
    assert plain(epochs=3, unfreeze_after=1, head="logreg").head == "logreg"


def backbone(model) -> dict[str, torch.Tensor]:
    heads = head_names(model)
    return {k: v.detach().clone() for k, v in model.named_parameters() if not in_head(k, heads)}


def test_the_backbone_stays_put_then_trains_at_a_scaled_lr(toy_work, tmp_path, monkeypatch):
    import pipeline.train.stage as train_module

    comp, work = toy_work
    cfg = cfg_for(comp, work, tmp_path / "run").config
    seen = []
    saved = train_module._save

    def record(member, st, *args):
        groups = {g["name"]: g["base_lr"] for g in st.optimizer.param_groups}
        seen.append((backbone(st.model), groups, st.data.source.kind, st.rt.total_steps, st.rt.steps_per_epoch))
        saved(member, st, *args)

    monkeypatch.setattr(train_module, "_save", record)
    train(cfg)
    torch.manual_seed(cfg.seed)
    start = backbone(build_model(phase(cfg, 0), 3))
    (b1, g1, kind1, total1, spe), (b2, g2, kind2, total2, _), (b3, *_) = seen
    assert all(torch.equal(start[k], b1[k]) for k in start)  # epoch 1: frozen
    assert not all(torch.equal(b1[k], b2[k]) for k in b1) and not all(torch.equal(b2[k], b3[k]) for k in b2)
    assert set(g1) <= {"head", "head_no_decay"}  # only the head trains in phase 1
    assert g2["backbone"] == pytest.approx(cfg.lr * 0.1) and g2["head"] == pytest.approx(cfg.lr)
    assert kind1 == "features" and kind2 != "features"  # the frozen phase trains on cached features
    assert total1 == spe and total2 == 2 * spe  # each phase's schedule spans that phase only


@pytest.mark.parametrize("cut", [1, 2])  # at the phase boundary, and inside the fine-tuning phase
def test_interrupted_fine_tuning_resumes_exactly(toy_work, tmp_path, monkeypatch, cut):
    import pipeline.train.stage as train_module
    from pipeline.checkpoint import load_checkpoint

    import pipeline.train.setup as setup_module

    comp, work = toy_work
    options = dict(epochs=3, ema=0.8, optimizer="adamw", lr=0.01)
    plans, runtime = [], setup_module.make_runtime  # the device plan each phase of each run computes with
    monkeypatch.setattr(setup_module, "make_runtime",
                        lambda cfg, dev, spe, dplan, epoch=0: plans.append((epoch, dplan)) or runtime(cfg, dev, spe,
                                                                                                      dplan, epoch))
    train(cfg_for(comp, work, tmp_path / "whole", **options))
    whole_plans, plans[:] = dict(plans), []
    saved = train_module._save

    def save_then_stop(member, st, *args):
        saved(member, st, *args)
        if len(st.history) == cut:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "_save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train(cfg_for(comp, work, tmp_path / "cut", **options))
    monkeypatch.setattr(train_module, "_save", saved)
    plans[:] = []
    train(cfg_for(comp, work, tmp_path / "cut", **options), resume=True)
    (epoch, resumed), = plans  # set up once, in the phase it resumes in: the plan the switch took
    assert whole_plans[0].channels_last is False and resumed == whole_plans[1 if epoch >= 1 else 0]
    whole, cut_run = (pd.read_csv(tmp_path / n / "holdout" / "metrics.csv").drop(columns="seconds")
                      for n in ("whole", "cut"))
    pd.testing.assert_frame_equal(whole, cut_run)
    a, b = (load_checkpoint(tmp_path / n / "holdout" / "last.pt") for n in ("whole", "cut"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_fine_tuned_folds_keep_their_own_backbones_at_predict(toy_work, tmp_path):
    from pipeline.data.plan import shared_backbone_groups
    from pipeline.predict.stage import load_member
    from pipeline.runs import Run

    comp, work = toy_work
    train(cfg_for(comp, work, tmp_path / "run", folds=3))
    members = Run(tmp_path / "run").finished("folds")
    configs = [load_member(m, torch.device("cpu")).config for m in members]
    assert [c.freeze_backbone for c in configs] == [False] * 3  # the kept weights were fine-tuned
    assert shared_backbone_groups(configs) == [[0], [1], [2]]  # so predict never shares one backbone


def test_the_run_summary_states_the_two_phases():
    from pipeline.train.summary import training_plan

    tuned = training_plan(plain(epochs=5, unfreeze_after=2, backbone_lr_scale=0.1, schedule="onecycle"))
    assert tuned.startswith("epochs 1-2: the linear head alone, backbone frozen; epochs 3-5: the whole model")
    assert "onecycle schedule" in tuned and "backbone lr x 0.1" in tuned
    assert training_plan(plain(epochs=3, unfreeze_after=1, head="logreg")).startswith("epoch 1: a logistic regression")
    assert training_plan(plain(epochs=1, freeze_backbone=True, head="logreg")).endswith("no SGD steps")
    assert training_plan(plain(epochs=3)) == ""


def test_data_init_needs_images_and_is_not_rerun_when_the_backbone_unfreezes(toy_work, tmp_path, caplog,
                                                                              monkeypatch):
    from pipeline.models.fastnet import FastNet

    calls = []
    original = FastNet.init_from_data
    monkeypatch.setattr(FastNet, "init_from_data", lambda self, x: calls.append(x.ndim) or original(self, x))
    comp, work = toy_work
    train(cfg_for(comp, work, tmp_path / "tuned", data_init=True))  # the frozen phase trains on cached features
    assert calls == [] and "--data-init skipped" in caplog.text
    train(cfg_for(comp, work, tmp_path / "plain", data_init=True, unfreeze_after=0))
    assert calls == [4]  # an image batch, once
