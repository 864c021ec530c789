"""Training-loader throughput: ours against torchvision ImageFolder + DataLoader.

    python benchmarks/bench_data.py [--cifar RAW] [--dogs RAW] [--workers 2] [--batches 40]

For each dataset it reorganises the download into a temporary WORK_DIR, then
times batches of decode + augment + collate from
- the baseline: torchvision.datasets.ImageFolder over WORK_DIR/train with the
  same albumentations transform, in a DataLoader with the same worker count;
- ours: what `pipeline train` uses for that image size (the uint8 cache with
  batch augmentation for small images; ImageDataset with JPEG draft decoding,
  per-sample seeds and persistent workers for large ones).
Prints images/s and the ratio ours/baseline. Defaults: the full CIFAR-10 PNGs
(written once from ../shared/data with its cifar10_png.py) and the dog JPEGs.

Then, at 224 px on the dog JPEGs, the training loader (decode +
resized_crop_flip_jitter + collate) with each JPEG decoder: PIL (with draft
scaling), torchvision.io.decode_jpeg on the CPU (libjpeg-turbo, full size) and
the pipeline's read_image (draft where it shrinks, else torchvision), with 0
workers (the old default) and with the default of pipeline/devices.py for this
machine's cores. ``--only-decoders`` skips the comparison above.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

import competitions  # noqa: F401
from pipeline.data.cache import image_cache
from pipeline.data.loaders import TensorBatchLoader, make_loader
from pipeline.data.plan import cached_targets
from pipeline.competition import get_competition
from pipeline.data.items import ImageDataset, build_transform, list_split, load_reorg, read_image
from pipeline.devices import CPU, available_cpus, default_workers
from pipeline.download.reorg import reorg

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


class AlbumentationsOnPIL:
    """The albumentations pipeline as a torchvision-style transform of a PIL image."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, img):
        return self.transform(image=np.asarray(img.convert("RGB")))["image"]


def rate(loader, batches: int, warmup: int = 3) -> float:
    """Images per second over ``batches`` batches after ``warmup`` (worker start-up excluded)."""
    batches = min(batches, len(loader) - warmup)  # a small set has few batches
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    start, seen = time.perf_counter(), 0
    for _ in range(batches):
        x = next(it)[0]
        seen += x.shape[0]
    return seen / (time.perf_counter() - start)


def bench(slug: str, raw: Path, side: int, augment: str, workers: int, batches: int, batch_size: int) -> tuple:
    comp = get_competition(slug)
    work = Path(tempfile.mkdtemp(prefix=f"bench-{slug}-"))
    reorg(comp, raw, work, folds=0)
    info = load_reorg(work)
    items = list_split(work, info, "train")
    tf = build_transform(augment, side, comp.mean, comp.std, train=True, seed=0)
    folder = ImageFolder(str(work / "train"), transform=AlbumentationsOnPIL(tf), allow_empty=True)  # breeds with no image
    base = DataLoader(folder, batch_size=batch_size,
                      shuffle=True, num_workers=workers, persistent_workers=workers > 0, drop_last=True)
    baseline = rate(base, batches)
    if side <= 64:
        start = time.perf_counter()
        pool = list_split(work, info, "train_valid")
        array, bad = image_cache(work, pool, side)
        built = time.perf_counter() - start
        ours_loader = TensorBatchLoader(torch.from_numpy(np.array(array)), cached_targets(pool, bad), batch_size,
                                        shuffle=True, augment=augment, mean=comp.mean, std=comp.std,
                                        device=torch.device("cpu"), drop_last=True)
        kind = f"uint8 cache + batch aug (cache built in {built:.1f}s)"
    else:
        ours_loader = make_loader(ImageDataset(items, tf, side), batch_size, True, workers, 0, drop_last=True)
        kind = "ImageDataset + draft decode + persistent workers"
    ours = rate(ours_loader, batches)
    return slug, side, len(items), baseline, ours, kind


def decode_pil(path: Path, min_side: int | None = None) -> np.ndarray:
    return read_image(path, min_side, fast=False)


def decode_torchvision(path: Path, min_side: int | None = None) -> np.ndarray:
    """Full-size libjpeg-turbo decode on the CPU (no EXIF handling, no draft scaling)."""
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    return decode_jpeg(read_file(str(path)), mode=ImageReadMode.RGB).permute(1, 2, 0).numpy()


DECODERS = {"PIL (draft)": decode_pil, "torchvision decode_jpeg": decode_torchvision, "pipeline read_image": read_image}


def bench_decoders(raw: Path, side: int, batches: int, batch_size: int) -> list[tuple[str, int, float]]:
    """(decoder, workers, loader images/s) at ``side`` px for each decoder, 0 workers and the device default."""
    comp = get_competition("dog-breed-identification")
    work = Path(tempfile.mkdtemp(prefix="bench-decoders-"))
    reorg(comp, raw, work, folds=0)
    items = list_split(work, load_reorg(work), "train_valid")
    tf = build_transform("resized_crop_flip_jitter", side, comp.mean, comp.std, train=True, seed=0)
    default = default_workers(available_cpus(), CPU, 1, "files")
    rows = []
    for workers in sorted({0, default}):
        for name, decode in DECODERS.items():
            loader = make_loader(ImageDataset(items, tf, side, decode=decode), batch_size, True, workers, 0,
                                 drop_last=True)
            rows.append((name, workers, rate(loader, batches, warmup=1)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cifar", type=Path, help="unzipped cifar-10 download (PNG); default: written from ../shared")
    parser.add_argument("--dogs", type=Path, default=SHARED / "dog-breed-identification")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--only-decoders", action="store_true", help="only the 224-px decoder comparison")
    args = parser.parse_args()
    if not args.only_decoders:
        compare_loaders(args)
    print(f"\nloader images/s at 224 px, {args.dogs.name} train+valid JPEGs, batch 32, "
          f"{torch.get_num_threads()} threads, {available_cpus()} cores")
    for name, workers, value in bench_decoders(args.dogs, 224, min(args.batches, 8), 32):
        print(f"{name:<26} workers {workers}  {value:>7.0f} img/s")


def compare_loaders(args) -> None:
    """Ours against ImageFolder + DataLoader at 32 px (CIFAR-10) and 224 px (dogs)."""
    cifar = args.cifar
    if cifar is None:
        cifar = Path(tempfile.gettempdir()) / "cifar10-png"
        if not (cifar / "trainLabels.csv").is_file():
            subprocess.run([sys.executable, str(SHARED / "cifar10_png.py"), str(cifar)], check=True)
    rows = [bench("cifar-10", cifar, 32, "pad_crop_flip", args.workers, args.batches, 256),
            bench("dog-breed-identification", args.dogs, 224, "resized_crop_flip_jitter", args.workers,
                  min(args.batches, 8), 32)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.workers} workers")
    print(f"{'dataset':<26} {'side':>4} {'images':>7} {'baseline img/s':>15} {'ours img/s':>11} {'ratio':>6}  ours is")
    for slug, side, n, baseline, ours, kind in rows:
        print(f"{slug:<26} {side:>4} {n:>7} {baseline:>15.0f} {ours:>11.0f} {ours / baseline:>6.1f}  {kind}")


if __name__ == "__main__":
    main()
