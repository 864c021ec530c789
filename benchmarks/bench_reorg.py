"""reorg on full CIFAR-10 (60,000 PNGs): first build, no-op re-run, forced rebuild, and the tutorial's copy loop.

    python benchmarks/bench_reorg.py [DATA_DIR] [--repeats 2]

DATA_DIR is a cifar-10 download (trainLabels.csv, train/, test/,
sampleSubmission.csv); by default /tmp/cifar10full, written once with
../shared/data/cifar10_png.py. Without ../shared (and no DATA_DIR) it skips.
Each repeat times, in this process (imports done): ``reorg()`` into an empty
WORK_DIR, the same call again (the no-op), ``reorg(force=True)`` over the
existing tree, and the d2l tutorial's way (``shutil.copy`` of every file into
train_valid/, train/ or valid/ and test/unknown/ class folders). Wall and CPU
seconds are printed; on a shared machine the CPU column is the steadier one.
Each step starts after ``os.sync()``, so none pays for the previous one's writes.
The download is only read; WORK_DIRs are temporary folders beside it.
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's pipeline, not an installed one

import competitions  # noqa: E402,F401
from pipeline.competition import get_competition  # noqa: E402
from pipeline.download.reorg import reorg  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
if not SHARED.is_dir():
    SHARED = Path("/work/shared")
DEFAULT = Path("/tmp/cifar10full")


def timed(fn) -> tuple[float, float, object]:
    """(wall s, CPU s of this process, result) of ``fn()``, after the previous step's writes reach the disk.

    Without the sync, the kernel writing back 110,000 new links would be timed
    as part of the next step.
    """
    os.sync()
    t0, c0 = time.perf_counter(), os.times()
    result = fn()
    c1 = os.times()
    return time.perf_counter() - t0, (c1.user + c1.system) - (c0.user + c0.system), result


def tutorial_copy(raw: Path, out: Path, valid_ratio: float = 0.1) -> int:
    """The d2l chapter's reorg: copy every image into class folders, the first n per class to valid."""
    with open(raw / "trainLabels.csv", newline="") as fh:
        labels = {row["id"]: row["label"] for row in csv.DictReader(fh)}
    counts: dict[str, int] = {}
    for label in labels.values():
        counts[label] = counts.get(label, 0) + 1
    n_valid = max(1, int(min(counts.values()) * valid_ratio))
    taken: dict[str, int] = {}
    copied = 0
    for name in os.listdir(raw / "train"):
        label = labels[name.split(".")[0]]
        src = raw / "train" / name
        split = "valid" if taken.get(label, 0) < n_valid else "train"
        taken[label] = taken.get(label, 0) + (split == "valid")
        for folder in (out / "train_valid" / label, out / split / label):
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, folder)
            copied += 1
    (out / "test" / "unknown").mkdir(parents=True, exist_ok=True)
    for name in os.listdir(raw / "test"):
        shutil.copy(raw / "test" / name, out / "test" / "unknown")
        copied += 1
    return copied


def data_dir(arg: Path | None) -> Path | None:
    """The download to time, written from ../shared when it is the default and absent; None to skip."""
    if arg is not None:
        return arg
    if (DEFAULT / "trainLabels.csv").is_file():
        return DEFAULT
    script = SHARED / "data" / "cifar10_png.py"
    if not script.is_file():
        return None
    print(f"writing {DEFAULT} with {script} (once, about a minute)", flush=True)
    subprocess.run([sys.executable, str(script), str(DEFAULT)], check=True)
    return DEFAULT


def one_round(raw: Path, scratch: Path) -> list[tuple[str, float, float]]:
    comp, work = get_competition("cifar-10"), scratch / "work"
    wall, cpu, first = timed(lambda: reorg(comp, raw, work))
    rows = [(f"reorg, empty WORK_DIR ({first.info['link_mode']})", wall, cpu)]
    wall, cpu, again = timed(lambda: reorg(comp, raw, work))
    assert again.skipped, "the second run should be a no-op"
    rows.append(("reorg again (no-op)", wall, cpu))
    wall, cpu, _ = timed(lambda: reorg(comp, raw, work, force=True))
    rows.append(("reorg --force over the tree", wall, cpu))
    wall, cpu, n = timed(lambda: tutorial_copy(raw, scratch / "tutorial"))
    rows.append((f"tutorial shutil.copy loop ({n} copies)", wall, cpu))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, nargs="?", help=f"cifar-10 download (default {DEFAULT})")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    raw = data_dir(args.data)
    if raw is None:
        print(f"skipped: {SHARED} is absent and no DATA_DIR was given")
        return
    n_files = sum(len(os.listdir(raw / d)) for d in ("train", "test"))
    print(f"{raw}: {n_files} images; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory(dir=raw.parent, prefix="bench-reorg-") as scratch:
            for what, wall, cpu in one_round(raw, Path(scratch)):
                print(f"  round {repeat + 1}: {what:<42} {wall:7.3f} s wall {cpu:7.3f} s CPU", flush=True)


if __name__ == "__main__":
    main()
