"""Inference and feature-extraction batches sized from a memory budget; the peak memory a command used."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from conftest import config_from_recipe, write_raw
from pipeline import devices
from pipeline.cli.app import app
from pipeline.cli.peak import format_peak, peak_memory, record_peak
from pipeline.devices import (A100, CPU, H100, P100, T4, V100, batch_for_budget, host_available, inference_batch,
                              item_bytes)
from pipeline.predict import stage as predict_stage
from pipeline.predict.stage import predict
from pipeline.runs import Run
from pipeline.train import setup as train_setup
from pipeline.train.stage import train
from test_backbone_once import counting

GiB = 1024 ** 3
IMAGE_224 = 4 * 3 * 224 * 224  # one fp32 input image


def test_one_image_costs_its_activations_and_on_cpu_its_queued_inputs():
    assert item_bytes(CPU, 224) == IMAGE_224 * (36 + 1)
    assert item_bytes(CPU, 224, workers=2) == IMAGE_224 * (36 + 2 * 4 + 1)  # each worker keeps 4 batches ready
    assert item_bytes(CPU, 224, half_precision=True) == IMAGE_224 * 37  # CPU autocast is off: fp32 activations
    assert item_bytes(T4, 224, workers=2) == IMAGE_224 * 37  # the queued batches are in host RAM, not the GPU's
    assert item_bytes(T4, 224, half_precision=True) == IMAGE_224 * 19


@pytest.mark.parametrize("free_gib, processes, expected", [
    (64, 1, 32),  # plenty of RAM: the CPU cap, 32 images of 224 px (the training batch x 2 was 256)
    (8, 1, 32),   # 2 GiB budget / 27 MB an image = 79 -> the cap
    (1, 1, 8),    # 256 MiB / 27 MB = 9 -> 8
    (8, 4, 16),   # four torchrun processes share the host's RAM: 512 MiB each -> 19 -> 16
    (0, 1, 1),    # nothing free: still one image at a time
])
def test_cpu_batch_from_the_hosts_ram(free_gib, processes, expected):
    per_item = item_bytes(CPU, 224, workers=2)
    assert batch_for_budget(CPU, free_gib * GiB, per_item, 224, processes=processes) == expected


def test_on_cpu_small_images_come_in_proportionally_larger_batches():
    assert batch_for_budget(CPU, 64 * GiB, item_bytes(CPU, 32), 32) == 1024  # 32 x 224^2 / 32^2 = 1568 -> 1024
    assert batch_for_budget(CPU, 64 * GiB, item_bytes(CPU, 448), 448) == 8  # 32 x 224^2 / 448^2 = 8


@pytest.mark.parametrize("acc, free_gib, expected", [
    (P100, 15, 256),  # fp16 autocast (capability 6.0): 19 input sizes an image, 3.75 GiB -> 351 -> 256
    (T4, 15, 256),
    (V100, 15, 256),
    (A100, 38, 512),  # 9.5 GiB -> 891 -> 512
    (H100, 78, 1024),  # 19.5 GiB -> 1830 -> the CUDA cap
    (T4, 2, 32),  # a GPU mostly taken by another process: its free memory decides, 0.5 GiB -> 46 -> 32
])
def test_cuda_batch_from_each_gpus_free_memory(acc, free_gib, expected):
    half = devices.autocast_dtype("auto", acc) is not None
    assert half  # every GPU here autocasts by default (bf16 from 8.0, fp16 before)
    per_item = item_bytes(acc, 224, half_precision=half, workers=8)
    assert batch_for_budget(acc, free_gib * GiB, per_item, 224) == expected
    # one process per GPU: the torchrun processes of a node do not share a GPU's memory
    assert batch_for_budget(acc, free_gib * GiB, per_item, 224, processes=8) == expected


def test_the_same_free_memory_gives_a_gpu_a_larger_batch_than_a_cpu():
    free = 16 * GiB
    assert batch_for_budget(CPU, free, item_bytes(CPU, 224, workers=2), 224) == 32
    assert batch_for_budget(T4, free, item_bytes(T4, 224, half_precision=True, workers=8), 224) == 256


def test_host_memory_is_the_smaller_of_memavailable_and_the_containers_limit(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32000000 kB\nMemAvailable:   20000000 kB\n")
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    assert host_available(str(meminfo), str(cgroup)) == 20000000 * 1024  # no cgroup files: no limit
    (cgroup / "memory.max").write_text("max\n")
    assert host_available(str(meminfo), str(cgroup)) == 20000000 * 1024
    (cgroup / "memory.max").write_text(f"{8 * GiB}\n")
    (cgroup / "memory.current").write_text(f"{3 * GiB}\n")
    assert host_available(str(meminfo), str(cgroup)) == 5 * GiB
    assert host_available(str(tmp_path / "none"), str(tmp_path / "none")) == 4 * GiB  # nothing to read


def test_an_explicit_batch_wins_over_the_budget(monkeypatch):
    monkeypatch.setattr(devices, "host_available", lambda: 1 * GiB)
    cfg = SimpleNamespace(image_size=224, infer_batch_size=None)
    assert inference_batch(cfg, torch.device("cpu")) == 8
    assert inference_batch(SimpleNamespace(image_size=224, infer_batch_size=100), torch.device("cpu")) == 100


def test_feature_extraction_and_predict_use_the_budget_not_the_training_batch(toy_work, tmp_path, monkeypatch):
    comp, work = toy_work  # 36 labelled images of 16 px, 10 test images
    per_item = item_bytes(CPU, 16)  # 0 workers
    monkeypatch.setattr(devices, "host_available", lambda: per_item * 8 * 4)  # a quarter of it holds 8 images
    seen: list[int] = []
    monkeypatch.setattr(train_setup, "model_from_config", counting(train_setup.model_from_config, seen))
    monkeypatch.setattr(predict_stage, "model_from_config", counting(predict_stage.model_from_config, seen))
    run = tmp_path / "run"
    train(config_from_recipe(comp, work, run, freeze_backbone=True, feature_views=0, folds=3, epochs=1,
                             batch_size=16, num_workers=0, device="cpu"))
    assert seen == [8, 8, 8, 8, 4]  # the 36 images in batches of 8, not of 2 x 16
    predict(comp, work, run, tmp_path / "sub.csv", device="cpu", num_workers=0)
    assert seen[5:] == [8, 2]  # the 10 test images


def test_infer_batch_size_overrides_the_budget(toy_work, tmp_path, monkeypatch):
    comp, work = toy_work
    seen: list[int] = []
    monkeypatch.setattr(train_setup, "model_from_config", counting(train_setup.model_from_config, seen))
    train(config_from_recipe(comp, work, tmp_path / "run", freeze_backbone=True, feature_views=0, folds=3,
                             epochs=1, batch_size=16, infer_batch_size=10, num_workers=0, device="cpu"))
    assert seen == [10, 10, 10, 6]


# ---------------------------------------------------------------- the peak


def test_the_peak_line_names_each_part():
    assert format_peak("train", {"rss": 3 * GiB // 2, "children_rss": 0}) == "peak memory (train): 1.50 GB RSS"
    line = format_peak("predict", {"rss": GiB, "children_rss": GiB // 4, "cuda_allocated": 5 * GiB})
    assert line == "peak memory (predict): 1.00 GB RSS, 0.25 GB in a worker process, 5.00 GB CUDA allocated"


def test_the_peak_grows_with_what_the_process_holds():
    before = peak_memory(torch.device("cpu"))["rss"]
    block = bytearray(300 * 1024 ** 2)  # touched: resident
    block[::4096] = b"x" * len(block[::4096])
    assert peak_memory(torch.device("cpu"))["rss"] >= before + 250 * 1024 ** 2 or before > 300 * 1024 ** 2
    del block


def test_train_and_predict_print_their_peak_and_keep_it_in_the_summary(tmp_path):
    from pipeline.competition import get_competition

    comp = get_competition("cifar-10")
    raw = write_raw(tmp_path / "raw", comp, per_class=6, n_test=5, size=32)
    work, run = tmp_path / "work", tmp_path / "run"
    runner = CliRunner()
    assert runner.invoke(app, ["reorg", "cifar-10", str(raw), str(work), "--folds", "0"]).exit_code == 0
    result = runner.invoke(app, ["train", "cifar-10", str(work), str(run), "--epochs", "1", "--device", "cpu",
                                 "--model", "fastnet_s", "--batch-size", "8", "--predict", str(tmp_path / "s.csv")])
    assert result.exit_code == 0, result.output
    assert "peak memory (train): " in result.output and "peak memory (predict): " in result.output
    summary = Run(run).summary_path.read_text()
    assert summary.startswith("run summary: ")  # the start-of-run summary, then the peaks at the end
    assert summary.splitlines()[-2].startswith("peak memory (train): ")
    assert summary.splitlines()[-1].startswith("peak memory (predict): ")
    record_peak("predict", "cpu", run)  # a second predict replaces its line
    assert Run(run).summary_path.read_text().count("peak memory (predict)") == 1
