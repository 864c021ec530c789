"""Wall time of each stage of the CIFAR-10 chain (what `make cifar10-submit` runs).

    python benchmarks/bench_e2e.py [RAW] [--model fastnet] [--epochs 1] [--device auto] [other train options]

RAW defaults to the full CIFAR-10 PNGs written from ../shared/data. Stages run
as the CLI (subprocesses), in a fresh temporary WORK/RUN: reorg, train (its
first epoch, with cache building and warm-up, apart from the rest, from
metrics.csv), predict (test folder to a checked CSV, written atomically).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def stage(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline", "-q", *args], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("raw", type=Path, nargs="?")
    parser.add_argument("--model", default="fastnet")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--device", default="auto")
    args, extra = parser.parse_known_args()  # unknown options go to `pipeline train` (e.g. --recipe fast)
    raw = args.raw or Path(tempfile.gettempdir()) / "cifar10-png"
    if not (raw / "trainLabels.csv").is_file():
        subprocess.run([sys.executable, str(SHARED / "cifar10_png.py"), str(raw)], check=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    work, run, sub = tmp / "work", tmp / "run", tmp / "submission.csv"
    times = {"reorg": stage("reorg", "cifar-10", str(raw), str(work), "--folds", "0")}
    times["train (total)"] = stage("train", "cifar-10", str(work), str(run), "--model", args.model, "--epochs",
                                   str(args.epochs), "--device", args.device, *extra)
    metrics = pd.read_csv(run / "metrics.csv")
    times["  first epoch (cache, warm-up)"] = float(metrics["seconds"].iloc[0])
    times["  other epochs"] = float(metrics["seconds"].iloc[1:].sum())
    times["predict + check + write"] = stage("predict", "cifar-10", str(work), str(run), str(sub))
    total = times["reorg"] + times["train (total)"] + times["predict + check + write"]
    print(f"cifar-10 at {raw}: model {args.model}, {args.epochs} epochs, device {args.device}, "
          f"best valid accuracy {metrics['valid_accuracy'].max():.4f}")
    if extra:
        print(f"train options: {' '.join(extra)}")
    for name, seconds in times.items():
        print(f"{name:<32} {seconds:>8.1f} s")
    print(f"{'end to end':<32} {total:>8.1f} s")


if __name__ == "__main__":
    main()
