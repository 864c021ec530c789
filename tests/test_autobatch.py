"""--batch-size auto: the candidates per device kind, the probe, and halving on out-of-memory while training."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from conftest import config_from_recipe
from pipeline.cli.app import app
from pipeline.config import TrainConfig
from pipeline.devices import (A100, CPU, CUDA_MAX_BATCH, H100, P100, T4, batch_for_budget, item_bytes,
                              train_batch_candidates)
from pipeline.errors import PipelineError
from pipeline.runs import Run
from pipeline.train import autobatch
from pipeline.train.stage import train

GiB = 1024 ** 3


def test_on_cpu_auto_is_one_batch_from_the_memory_budget_never_probed():
    per_item = item_bytes(CPU, 224)
    assert train_batch_candidates(CPU, 64 * GiB, per_item, 224, limit=10_000) == (32,)  # CPU_MAX_PIXELS at 224 px
    assert train_batch_candidates(CPU, 1 * GiB, per_item, 224, limit=10_000) == (4,)  # 256 MiB / (3 x 21.2 MiB)
    assert train_batch_candidates(CPU, 64 * GiB, per_item, 224, limit=5) == (5,)  # the data's limit
    assert train_batch_candidates(CPU, 1 * GiB, per_item, 224, limit=10_000) < \
        (batch_for_budget(CPU, 1 * GiB, per_item, 224),)  # a training step costs more than inference


@pytest.mark.parametrize("acc, free_gib, top", [(P100, 15, 512), (T4, 6, 256), (A100, 38, 1024), (H100, 78, 1024)])
def test_on_cuda_auto_probes_from_twice_the_estimate_down_to_one(acc, free_gib, top):
    per_item = item_bytes(acc, 224, half_precision=True)
    candidates = train_batch_candidates(acc, free_gib * GiB, per_item, 224, limit=10_000)
    assert candidates[0] == top and candidates[-1] == 1
    assert all(a == 2 * b for a, b in zip(candidates, candidates[1:]))
    assert train_batch_candidates(acc, free_gib * GiB, per_item, 224, limit=100)[:3] == (100, 50, 25)
    assert max(train_batch_candidates(acc, 1000 * GiB, per_item, 32, limit=10 ** 6)) == CUDA_MAX_BATCH


def oom_above(limit: int, tried: list[int]):
    def try_batch(batch: int) -> None:
        tried.append(batch)
        if batch > limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
    return try_batch


def test_the_probe_takes_the_first_batch_that_completes_its_steps():
    tried = []
    assert autobatch.first_that_fits((512, 256, 128, 64, 32), oom_above(100, tried)) == 64
    assert tried == [512, 256, 128, 64]
    with pytest.raises(PipelineError, match="even 2 image"):
        autobatch.first_that_fits((8, 4, 2), oom_above(1, []))


def test_probe_steps_train_the_members_model_for_real():
    from pipeline.devices import plan_device

    cfg = TrainConfig(competition="x", work_dir=".", run_dir=".", model="fastnet_s", image_size=16, device="cpu")
    dplan = plan_device(CPU, amp="none", channels_last=None, num_workers=0, world_size=1, cpu_count=1,
                        input_kind="files")
    autobatch.probe_steps(cfg, 3, 0, torch.device("cpu"), dplan, 4)  # forward, backward, step: no error


@pytest.fixture
def a100_fitting_48(monkeypatch):
    """An A100 with 38 GiB free (simulated on the CPU) where a batch above 48 runs out of memory; the batches tried."""
    monkeypatch.setattr(autobatch, "probe", lambda device: A100)
    monkeypatch.setattr(autobatch, "resolve_device", lambda name: torch.device("cpu"))
    monkeypatch.setattr(autobatch, "available_memory", lambda device: 38 * GiB)
    tried = []
    monkeypatch.setattr(autobatch, "probe_steps", lambda cfg, n, w, d, p, b: oom_above(48, tried)(b))
    return tried


def test_on_cuda_the_plan_probes_and_keeps_what_fits(a100_fitting_48, tmp_path):
    from pipeline.runs import Member

    tried = a100_fitting_48
    cfg = TrainConfig(competition="x", work_dir=".", run_dir=".", model="fastnet_s", image_size=224, lr=0.4,
                      batch_size="auto", epochs=30)
    member = Member(tmp_path / "run", "holdout")
    out, notes = autobatch.resolve_auto(cfg, 5000, {}, n_outputs=3, meta_width=0, source_kind="files",
                                        reference=512, member=member, probe_memory=True)
    assert tried == [500, 250, 125, 62, 31] and out.batch_size == 31  # 5000 images in 30 epochs allow 500
    assert "the largest of 500, 250" in notes[0] and out.lr == pytest.approx(0.4 * 31 / 512)
    budget_only, _ = autobatch.resolve_auto(cfg, 5000, {}, n_outputs=3, meta_width=0, source_kind="files",
                                            reference=512, member=member, probe_memory=False)  # --dry-run
    assert budget_only.batch_size == 500 and len(tried) == 5


def test_with_accumulation_auto_caps_and_scales_the_steps_images(a100_fitting_48, tmp_path):
    from pipeline.runs import Member

    tried = a100_fitting_48
    cfg = TrainConfig(competition="x", work_dir=".", run_dir=".", model="fastnet_s", image_size=224, lr=0.4,
                      batch_size="auto", epochs=30, accum_steps=2)
    out, notes = autobatch.resolve_auto(cfg, 5000, {}, n_outputs=3, meta_width=0, source_kind="files",
                                        reference=512, member=Member(tmp_path / "run", "holdout"), probe_memory=True)
    assert tried[0] == 250 and out.batch_size == 31  # 500 images a step at most: 250 per micro-batch
    assert out.lr == pytest.approx(0.4 * 62 / 512) and "to 62 images a step" in notes[1]


def test_auto_on_the_command_line_and_in_recipes(toy_work, tmp_path):
    comp, work = toy_work
    result = CliRunner().invoke(app, ["train", "toy", str(work), str(tmp_path / "r"), "--batch-size", "auto",
                                      "--device", "cpu", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "batch_size auto -> " in result.output and "from the memory budget of cpu" in result.output
    bad = CliRunner().invoke(app, ["train", "toy", str(work), str(tmp_path / "r"), "--batch-size", "big", "--dry-run"])
    assert bad.exit_code == 1 and "--batch-size must be a whole number or auto, got 'big'" in bad.output
    assert TrainConfig(competition="x", work_dir=".", run_dir=".", model="m", batch_size="auto").batch_size == "auto"


def test_out_of_memory_while_training_halves_the_batch_and_the_member_finishes(toy_work, tmp_path, monkeypatch,
                                                                                caplog):
    """A simulated CUDA out-of-memory in epoch 2 at the picked batch: that epoch starts again from epoch 1's
    last.pt at half the batch, with the lr scaled; the member is complete and records the batch it used."""
    import pipeline.train.stage as stage

    comp, work = toy_work
    real, calls = stage.train_one_epoch, []

    def step_or_oom(net, loader, optimizer, criterion, cfg, rt, ema, epoch, gen):
        calls.append((epoch, cfg.batch_size))
        if epoch == 1 and cfg.batch_size == calls[0][1]:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real(net, loader, optimizer, criterion, cfg, rt, ema, epoch, gen)

    monkeypatch.setattr(stage, "train_one_epoch", step_or_oom)
    caplog.set_level("INFO", "pipeline")
    train(config_from_recipe(comp, work, tmp_path / "run", batch_size="auto", epochs=3, device="cpu", lr=0.2))
    picked = calls[0][1]
    assert picked >= 2 and calls == [(0, picked), (1, picked), (1, picked // 2), (2, picked // 2)]
    assert f"batch_size {picked} -> {picked // 2}: out of memory in epoch 2, which starts again" in caplog.text
    member = Run(tmp_path / "run").member("holdout")
    record = json.loads(member.config_path.read_text())
    assert record["plan"]["batch_size"] == picked // 2
    assert record["config"]["lr"] == pytest.approx(0.2 * (picked // 2) / picked)
    assert json.loads((member.dir / "done.json").read_text())["epochs"] == 3
    summary = Run(tmp_path / "run").summary_path.read_text()
    assert f"note: holdout: batch_size {picked} -> {picked // 2}: out of memory in epoch 2" in summary
    assert len(pd.read_csv(member.metrics_path)) == 3 and member.best_path.is_file()
    train(config_from_recipe(comp, work, tmp_path / "run", batch_size="auto", epochs=4, device="cpu", lr=0.2),
          resume=True)  # one more epoch: with the batch it trained with, not a new pick
    assert calls[-1] == (3, picked // 2)


def test_out_of_memory_with_a_fixed_batch_is_not_caught(toy_work, tmp_path, monkeypatch):
    import pipeline.train.stage as stage

    comp, work = toy_work

    def oom(*args):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(stage, "train_one_epoch", oom)
    with pytest.raises(torch.OutOfMemoryError):
        train(config_from_recipe(comp, work, tmp_path / "run", batch_size=8, epochs=2, device="cpu"))
