"""--average-last K: the average of the last K epochs' weights, its BatchNorm statistics, predict and resume."""
from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from conftest import config_from_recipe
from pipeline.config import TrainConfig
from pipeline.errors import PipelineError
from pipeline.train.averaging import EpochAverage, recompute_bn, training_norms
from pipeline.train.stage import train


def cfg_for(comp, work, run, **kw):
    base = dict(epochs=3, batch_size=8, device="cpu", augment="none", average_last=2)
    return config_from_recipe(comp, work, run, **{**base, **kw})


def tiny_net(bn: bool) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 4, 3), *([nn.BatchNorm2d(4)] if bn else []), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)]
    return nn.Sequential(*layers)


def batches(n: int = 5, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 3, 8, 8, generator=g) * 2 + 1, torch.randint(3, (6,), generator=g), torch.arange(6))
            for _ in range(n)]


def sgd_epoch(net: nn.Module, opt, data) -> None:
    for x, y, _ in data:
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()


def test_the_average_of_k_epochs_is_the_mean_of_their_saved_weights():
    net, data = tiny_net(bn=False), batches()
    opt = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9)
    avg, saved = EpochAverage(net, k=3), []
    for epoch in range(5):
        sgd_epoch(net, opt, data)
        saved.append(copy.deepcopy(net.state_dict()))
        assert avg.update(net, epoch, total_epochs=5) == (epoch >= 2)  # the window: epochs 3-5
    assert avg.epochs == [2, 3, 4]
    for name, value in avg.module.state_dict().items():
        expected = torch.stack([s[name] for s in saved[2:]]).mean(0)
        assert torch.allclose(value, expected, atol=1e-6), name
        assert not torch.allclose(value, saved[-1][name], atol=1e-4), name  # the last epoch alone differs


def test_an_average_outside_its_window_starts_again():
    net = tiny_net(bn=False)
    avg = EpochAverage(net, k=2)
    for epoch in (3, 4):  # a run of 5 epochs averaged epochs 4-5; --resume --epochs 7 moves the window to 6-7
        avg.update(net, epoch, total_epochs=5)
    assert not avg.update(net, 4, total_epochs=7)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    assert avg.update(net, 5, total_epochs=7) and avg.epochs == [5]
    assert all(torch.equal(a, b) for a, b in zip(avg.module.parameters(), net.parameters()))  # not mixed with 4-5


def test_batchnorm_statistics_are_recomputed_as_torchs_update_bn():
    from torch.optim.swa_utils import update_bn

    net, data = tiny_net(bn=True), batches()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    avg = EpochAverage(net, k=2)
    for epoch in range(2):
        sgd_epoch(net, opt, data)
        avg.update(net, epoch, 2)
    reference = copy.deepcopy(avg.module)
    update_bn([x for x, _, _ in data], reference)
    avg.module.eval()
    seen = recompute_bn(avg.module, avg.module, data, torch.device("cpu"), training_norms(net))
    assert seen == 30
    mine, theirs, live = (m[1] for m in (avg.module, reference, net))
    assert torch.allclose(mine.running_mean, theirs.running_mean, atol=1e-6)
    assert torch.allclose(mine.running_var, theirs.running_var, atol=1e-6)
    assert not torch.allclose(mine.running_mean, live.running_mean, atol=1e-3)  # not the live net's momentum stats
    assert mine.momentum == 0.1 and not avg.module.training  # restored as they were


def test_a_frozen_backbones_batchnorm_is_left_alone():
    from pipeline.models import model_from_config

    cfg = TrainConfig(competition="x", work_dir=".", run_dir=".", model="fastnet_s", freeze_backbone=True)
    net = model_from_config(cfg, 3)
    assert training_norms(net) == set()  # set_train_mode keeps a frozen backbone's norms in eval
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    before = [m.running_mean.clone() for m in norms]
    data = [(torch.randn(4, 3, 16, 16), torch.zeros(4), torch.arange(4))]
    assert norms and recompute_bn(net, net, data, torch.device("cpu"), training_norms(net)) == 0
    assert all(torch.equal(m.running_mean, b) for m, b in zip(norms, before))
    unfrozen = model_from_config(TrainConfig(competition="x", work_dir=".", run_dir=".", model="fastnet_s"), 3)
    assert len(training_norms(unfrozen)) == len(norms)
    assert recompute_bn(unfrozen, unfrozen, data, torch.device("cpu"), training_norms(unfrozen)) == 4


@pytest.mark.parametrize("options, message", [
    (dict(average_last=4, epochs=3), "--average-last 4 needs"),
    (dict(average_last=2, epochs=3, unfreeze_after=2, freeze_backbone=False), "--unfreeze-after 2"),
    (dict(average_last=2, epochs=3, ema=0.9), "not with --ema"),
    (dict(average_last=2, epochs=3, select="best"), "--select best"),
    (dict(average_last=1, epochs=1, head="logreg", freeze_backbone=True), "drop --average-last"),
    (dict(average_last=-1), "--average-last must be >= 0"),
])
def test_averaging_refuses_what_it_cannot_average(options, message):
    with pytest.raises(PipelineError, match=message):
        TrainConfig(competition="x", work_dir=".", run_dir=".", model="m", **options)


def test_a_run_keeps_and_predicts_the_average_with_recomputed_batchnorm(toy_work, tmp_path, monkeypatch, caplog):
    """Training with --average-last 2 of 3 epochs: best.pt holds the mean of epochs 2-3's weights with BN
    statistics as torch's update_bn gives them on the same training batches; predict scores exactly those."""
    import pipeline.train.stage as stage
    from torch.optim.swa_utils import update_bn
    from pipeline.checkpoint import load_checkpoint
    from pipeline.cli.train import result_line
    from pipeline.data.items import list_split, load_reorg
    from pipeline.data.plan import eval_loader
    from pipeline.distributed import plan_for
    from pipeline.models import model_from_config, set_train_mode
    from pipeline.models.inference import infer
    from pipeline.predict.stage import predict_items
    from pipeline.runs import Run

    comp, work = toy_work
    live, expected = [], {}
    saved = stage._save

    def capture(member, st, cfg, data, variant):
        live.append({k: v.clone() for k, v in st.model.state_dict().items()})
        if len(live) == 3:  # the training batches of the last epoch, replayed by torch's update_bn
            reference = copy.deepcopy(st.average.module)
            update_bn([x for x, _, _ in st.data.train], reference)
            expected.update(reference.state_dict())
        saved(member, st, cfg, data, variant)

    monkeypatch.setattr(stage, "_save", capture)
    caplog.set_level("INFO", "pipeline")
    results = train(cfg_for(comp, work, tmp_path / "run"))
    member = Run(tmp_path / "run").member("holdout")
    best = load_checkpoint(member.best_path)["model"]
    for name, value in best.items():
        if name.endswith(("running_mean", "running_var")):
            assert torch.allclose(value, expected[name], atol=1e-5), name
            assert not torch.allclose(value, live[-1][name], atol=1e-4), name  # recomputed, not the live ones
        elif value.is_floating_point():
            assert torch.allclose(value, (live[1][name] + live[2][name]) / 2, atol=1e-6), name
    assert "the kept weights are the average of epochs 2-3, its BatchNorm statistics recomputed on" in caplog.text
    done = json.loads((member.dir / "done.json").read_text())
    assert done["kept"]["variant"] == "average" and done["kept"]["averaged_epochs"] == [2, 3]
    metrics = pd.read_csv(member.dir / "metrics.csv")
    assert metrics["valid_accuracy_average"].isna().tolist() == [True, False, False]
    assert done["kept"]["metric"] == pytest.approx(metrics["valid_accuracy_average"].iloc[-1])
    line = result_line(results[0], "accuracy")  # what `pipeline train` prints
    assert f"kept the average of epochs 2-3 (last): accuracy {done['kept']['metric']:.4f}" in line

    state = load_checkpoint(member.best_path)
    cfg = TrainConfig.from_json(state["config"])
    model = model_from_config(cfg, 3, initial_weights=False)
    model.load_state_dict({**best, **{k: v for k, v in expected.items() if k in best}})
    set_train_mode(model, False)
    items = list_split(work, load_reorg(work, comp.slug), "test")
    ids, probs, _ = predict_items([member], items, device="cpu")
    plan = plan_for(cfg, torch.device("cpu"), "files")
    p, _, _ = infer(model, eval_loader(cfg, items, 4, plan, strict=True), torch.device("cpu"))
    assert ids == [it.id for it in items]
    np.testing.assert_allclose(probs, p, atol=1e-5)
    last_probs = predict_items([member], items, device="cpu", weights="last")[1]
    np.testing.assert_allclose(last_probs, p, atol=1e-5)  # last.pt's weights, as predict reads them: the average


def test_interrupted_mid_average_then_resumed_equals_uninterrupted(toy_work, tmp_path, monkeypatch):
    import pipeline.train.stage as stage
    from pipeline.checkpoint import load_checkpoint

    comp, work = toy_work
    options = dict(epochs=4, average_last=3)
    train(cfg_for(comp, work, tmp_path / "whole", **options))
    saved = stage._save

    def save_then_stop(member, st, *args):
        saved(member, st, *args)
        if len(st.history) == 3:
            raise KeyboardInterrupt  # after epoch 3: the average holds epochs 2-3

    monkeypatch.setattr(stage, "_save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train(cfg_for(comp, work, tmp_path / "cut", **options))
    assert load_checkpoint(tmp_path / "cut" / "holdout" / "last.pt")["average"]["epochs"] == [1, 2]
    monkeypatch.setattr(stage, "_save", saved)
    train(cfg_for(comp, work, tmp_path / "cut", **options), resume=True)
    a, b = (load_checkpoint(tmp_path / n / "holdout" / "best.pt")["model"] for n in ("whole", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    whole, cut = (pd.read_csv(tmp_path / n / "holdout" / "metrics.csv").drop(columns="seconds")
                  for n in ("whole", "cut"))
    pd.testing.assert_frame_equal(whole, cut)
