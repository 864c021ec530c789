"""Predict throughput: our loop against a bare model(x) loop, and `pipeline predict` end to end.

    python benchmarks/bench_predict.py WORK_DIR [--model fastnet] [--limit 2048] [--device auto]

WORK_DIR is a reorganised competition (e.g. the full CIFAR-10 from
../shared/data/cifar10_png.py after `pipeline reorg`). A run with a randomly
initialised model is written to a temporary folder (speed does not depend on
the weights). It prints:
- images/s of pipeline.models.inference.infer against a bare `model(x)` +
  softmax loop over the same decoded tensors (the overhead ratio);
- images/s and peak RSS of the whole `pipeline predict` over WORK_DIR/test
  (decode, transform, softmax, building, checking and writing the CSV), run in
  a subprocess; and the same over the first --small images' worth of ids, to
  show memory does not grow with the test set.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipeline.checkpoint import save_checkpoint
from pipeline.config import TrainConfig
from pipeline.data.items import ImageDataset, build_transform, list_split, load_reorg
from pipeline.devices import resolve_device
from pipeline.io import atomic_write_json
from pipeline.models import create_model
from pipeline.models.inference import infer
from pipeline.runs import HOLDOUT, Run


def write_run(work: Path, info: dict, model_name: str, side: int) -> Path:
    run = Path(tempfile.mkdtemp(prefix="bench-predict-"))
    cfg = TrainConfig(competition=info["competition"], work_dir=work, run_dir=run, model=model_name, image_size=side,
                      augment="none")
    model = create_model(model_name, len(info["classes"]))
    member = Run(run).member(HOLDOUT)
    save_checkpoint(member.best_path, {"model": model.state_dict(), "config": cfg.to_json(), "classes": info["classes"]})
    atomic_write_json(Run(run).config_path, {"config": cfg.to_json()})
    member.mark_done({"epochs": 0, "best": {"epoch": 0, "metric": 0.0, "variant": "live"}})
    return run


@torch.no_grad()
def loop_rates(model, tensors: torch.Tensor, batch: int, device: torch.device) -> tuple[float, float]:
    batches = [(tensors[i:i + batch], torch.zeros(0), torch.arange(i, min(i + batch, len(tensors))))
               for i in range(0, len(tensors), batch)]
    model(batches[0][0].to(device))  # warm-up
    start = time.perf_counter()
    for x, _, _ in batches:
        torch.softmax(model(x.to(device)), dim=1).cpu()
    bare = len(tensors) / (time.perf_counter() - start)
    start = time.perf_counter()
    infer(model, batches, device)
    ours = len(tensors) / (time.perf_counter() - start)
    return bare, ours


def run_predict(work: Path, run: Path, out: Path) -> tuple[float, float]:
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "pipeline", "-q", "predict", json.loads((work / "reorg.json").read_text())["competition"],
           str(work), str(run), str(out), "--force"]
    subprocess.run(cmd, check=True)
    return time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path)
    parser.add_argument("--model", default="fastnet")
    parser.add_argument("--side", type=int, default=32)
    parser.add_argument("--limit", type=int, default=2048, help="tensors for the loop comparison")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    info = load_reorg(args.work)
    items = list_split(args.work, info, "test")
    run = write_run(args.work, info, args.model, args.side)
    model = create_model(args.model, len(info["classes"])).eval().to(device)
    dataset = ImageDataset(items[: args.limit], build_transform("none", args.side, (0.5,) * 3, (0.5,) * 3, False), args.side)
    tensors = torch.stack([dataset[i][0] for i in range(len(dataset))])
    bare, ours = loop_rates(model, tensors, args.batch, device)
    seconds, peak = run_predict(args.work, run, run / "submission.csv")
    print(f"torch {torch.__version__}, device {device}, model {args.model} at {args.side}px, batch {args.batch}")
    print(f"{'what':<44} {'images':>7} {'img/s':>8} {'peak RSS MiB':>13}")
    print(f"{'bare model(x) + softmax loop':<44} {len(tensors):>7} {bare:>8.0f}")
    print(f"{'pipeline.models.inference.infer, same tensors':<44} {len(tensors):>7} {ours:>8.0f}   overhead x{bare / ours:.2f}")
    print(f"{'pipeline predict (files -> checked CSV)':<44} {len(items):>7} {len(items) / seconds:>8.0f} {peak:>13.0f}")


if __name__ == "__main__":
    main()
