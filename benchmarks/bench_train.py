"""Training throughput and peak memory per model on this machine's device.

    python benchmarks/bench_train.py [--device auto] [--steps 10] [--models fastnet resnet18_cifar ...]

Times the real training step (pipeline.train.stage.train_one_epoch: forward, loss,
backward, optimizer, EMA off) on random batches already in memory, so the
figure is the model's cost, not the loader's. Peak memory is
torch.cuda.max_memory_allocated on a GPU and the process's peak RSS on CPU.
"""
from __future__ import annotations

import argparse
import resource
import time

import torch
from torch import nn

from pipeline.config import TrainConfig
from pipeline.devices import resolve_device
from pipeline.models import create_model, freeze_backbone
from pipeline.distributed import plan_for
from pipeline.train.engine import build_optimizer, make_runtime, train_one_epoch

# (model, input side, batch size, freeze backbone)
DEFAULTS = [
    ("fastnet_s", 32, 256, False),
    ("fastnet", 32, 256, False),
    ("resnet18_cifar", 32, 128, False),
    ("timm:tf_efficientnet_lite0", 224, 32, True),
    ("timm:tf_efficientnet_lite0", 224, 32, False),
    ("resnet50", 224, 32, False),
]


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def bench(name: str, side: int, batch: int, frozen: bool, device: torch.device, steps: int) -> tuple[float, float]:
    cfg = TrainConfig(competition="bench", work_dir=".", run_dir=".", model=name, image_size=side, batch_size=batch,
                      epochs=1, freeze_backbone=frozen, device=device.type, lr=0.01)
    model = create_model(name, 10).to(device)
    if frozen:
        freeze_backbone(model)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        torch.cuda.reset_peak_memory_stats(device)
    optimizer = build_optimizer(model, cfg)
    x = torch.randn(batch, 3, side, side, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    batches = [(x, y, torch.arange(batch))] * (steps + 2)
    criterion = nn.CrossEntropyLoss()
    dplan = plan_for(cfg, device, "files")
    warm = make_runtime(cfg, device, 2, dplan)
    train_one_epoch(model, batches[:2], optimizer, criterion, cfg, warm, None, 0, torch.Generator())
    rt = make_runtime(cfg, device, steps, dplan)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    train_one_epoch(model, batches[2:], optimizer, criterion, cfg, rt, None, 0, torch.Generator())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return batch * steps / (time.perf_counter() - start), peak_memory_mib(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--models", nargs="*", help="model names (default: a representative set)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    rows = [r for r in DEFAULTS if not args.models or r[0] in args.models]
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, {args.steps} steps")
    print(f"{'model':<28} {'input':>9} {'batch':>5} {'frozen':>6} {'train img/s':>11} {'peak MiB':>9}")
    for name, side, batch, frozen in rows:
        if device.type == "cpu":
            batch = min(batch, 64)  # keep a CPU run to minutes
        speed, peak = bench(name, side, batch, frozen, device, args.steps)
        print(f"{name:<28} {f'{side}x{side}':>9} {batch:>5} {str(frozen):>6} {speed:>11.1f} {peak:>9.0f}")


if __name__ == "__main__":
    main()
