"""What reorg's duplicate check costs: byte-identical training images across the split, on real downloads.

    python benchmarks/bench_duplicates.py [--repeats 2]

Runs :func:`pipeline.download.duplicates.duplicates_across` on ../shared/data's full CIFAR-10 train
(cifar-10-jpeg: 50,000 JPEGs) and the dog-breed sample (300 JPEGs), with the split reorg plans by
default (valid_ratio 0.1, 5 folds, seed 0). Prints, per repeat, the wall and CPU seconds, how many
files were stat-ed and how many shared a size and were read, the identical sets found and those the
split separates. The first repeat may read from disk; later ones from the page cache (as reorg does
right after its scan). Skips when ../shared/data is absent.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's pipeline, not an installed one

from pipeline.download.duplicates import duplicates_across  # noqa: E402
from pipeline.download.splits import plan_split  # noqa: E402
from pipeline.io import read_csv  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
if not SHARED.is_dir():
    SHARED = Path("/work/shared")
DOWNLOADS = {  # name: (folder, labels file, label column, image extension)
    "cifar-10-jpeg": ("cifar-10-jpeg", "trainLabels.csv", "label", ".jpg"),
    "dog-breed-identification": ("dog-breed-identification", "labels.csv", "breed", ".jpg"),
}


def bench(name: str, repeats: int) -> None:
    folder, labels_file, column, ext = DOWNLOADS[name]
    raw = SHARED / "data" / folder
    labels = read_csv(raw / labels_file, "labels file")
    paths = {i: f"{raw}/train/{i}{ext}" for i in labels["id"]}
    split = plan_split(labels["id"].to_numpy(), labels[column].to_numpy(), 0.1, 5, 0)
    for repeat in range(repeats):
        t0, c0 = time.perf_counter(), os.times()
        account = duplicates_across(paths, split.valid_ids, split.folds)
        c1 = os.times()
        wall, cpu = time.perf_counter() - t0, (c1.user + c1.system) - (c0.user + c0.system)
        example = f", e.g. {account.sets[0]}" if account.sets else ""
        print(f"{name:26s} repeat {repeat}: {wall:6.2f} s wall {cpu:6.2f} s CPU | {account.files} files, "
              f"{account.hashed} read (same size as another) | {account.identical} identical sets, "
              f"{len(account.sets)} across the split{example}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if not (SHARED / "data").is_dir():
        print(f"skipped: {SHARED / 'data'} is absent")
        return
    for name in DOWNLOADS:
        bench(name, args.repeats)


if __name__ == "__main__":
    main()
