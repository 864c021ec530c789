"""Training tricks of issue 23: gradient accumulation (point 4) and --time-limit (point 4)."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from torch import nn

from pipeline.config import TrainConfig, resolve_config
from pipeline.errors import PipelineError
from pipeline.train.budget import time_is_up
from pipeline.train.engine import make_runtime, train_one_epoch
from pipeline.train.stage import train


def linear_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 3))  # no batch norm


def images(n=64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 4, 4, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def batches(x, y, size):
    return [(x[i:i + size], y[i:i + size], torch.arange(i, i + size)) for i in range(0, len(x), size)]


def trained(batch_size, accum, epochs=2, **kw):
    cfg = TrainConfig(model="linear", batch_size=batch_size, accum_steps=accum, lr=0.2, optimizer="sgd",
                      momentum=0.9, weight_decay=5e-4, schedule="cosine", epochs=epochs, device="cpu", **kw)
    model, (x, y) = linear_model(), images()
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    optimizer.param_groups[0]["base_lr"] = cfg.lr
    rt = make_runtime(cfg, torch.device("cpu"), len(x))
    for epoch in range(epochs):
        rt.step = epoch * rt.steps_per_epoch
        train_one_epoch(model, batches(x, y, batch_size), optimizer, nn.CrossEntropyLoss(), cfg, rt, None, epoch,
                        torch.Generator().manual_seed(epoch))
    return torch.cat([p.detach().flatten() for p in model.parameters()]), rt


@pytest.mark.parametrize("optimizer_kw", [{}, {"clip_grad": 0.5}])
def test_accumulated_batches_equal_one_big_batch(optimizer_kw):
    big, rt_big = trained(32, 1, **optimizer_kw)
    accumulated, rt_acc = trained(8, 4, **optimizer_kw)
    assert rt_big.steps_per_epoch == rt_acc.steps_per_epoch == 2 and rt_acc.step == 4  # optimizer steps
    assert torch.allclose(big, accumulated, atol=1e-5)
    small, _ = trained(8, 1, **optimizer_kw)  # 8 steps of 8: another trajectory, so the test can fail
    assert not torch.allclose(big, small, atol=1e-3)


def test_accumulation_needs_enough_images():
    cfg = TrainConfig(model="linear", batch_size=16, accum_steps=8, device="cpu")
    with pytest.raises(PipelineError, match="--accum-steps 8 x --batch-size 16"):
        make_runtime(cfg, torch.device("cpu"), 100)


@pytest.mark.parametrize("elapsed, last, limit, up", [(50, 5, 1, False), (56, 5, 1, True), (10, 100, 0, False),
                                                      (0, 61, 1, True)])
def test_time_is_up_looks_one_epoch_ahead(elapsed, last, limit, up):
    assert time_is_up(elapsed, last, limit) is up


def test_time_limit_stops_at_an_epoch_boundary_leaving_a_finished_member(toy_work, tmp_path):
    comp, work = toy_work
    run_dir = tmp_path / "run"
    flags = {"device": "cpu", "epochs": 6, "batch_size": 8, "time_limit": 1e-4}  # 6 ms: one epoch passes it
    train(resolve_config(comp, work, run_dir, None, flags))
    member = run_dir / "holdout"
    done = json.loads((member / "done.json").read_text())
    assert done["epochs"] == 1 and done["time_limit_hit"] and (member / "best.pt").is_file()
    assert len(pd.read_csv(member / "metrics.csv")) == 1
    from pipeline.predict.stage import predict

    result = predict(comp, work, run_dir, tmp_path / "sub.csv", device="cpu")  # a finished member predicts
    assert result.rows == 10
