"""Cache storage: keys of the files a cache was built from, and the files themselves (WORK_DIR/cache/).

- Decoded images: every image decoded once into a uint8 array (N, H, W, 3),
  memory-mapped, keyed on the files and the side, so a changed input builds a
  new one.
- Tensors (frozen-backbone features): saved once under a key the data plan
  builds (pipeline/data/plan.py), read back on every later run.

Nothing here runs a model: the plan decides what to cache and under which
key, pipeline/data/features.py computes features.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch

from pipeline.data.items import Item, read_image
from pipeline.io import allocate, atomic_path, atomic_write_json
from pipeline.progress import track
from pipeline.workdir import CACHE_DIR

log = logging.getLogger("pipeline")

MAX_CACHED_SIDE = 64  # "auto" caches images up to this side; larger ones stream from disk


def items_key(items: list[Item], *extra) -> str:
    """A digest of the files behind ``items`` (name, size, mtime) and any extra settings."""
    digest = hashlib.sha256(json.dumps([str(e) for e in extra]).encode())
    for it in items:
        st = os.stat(it.path)
        digest.update(f"{it.id}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def _decode_chunk(job: tuple[list[str], int, str, int]) -> list[str]:
    """Decode paths into rows [start, start+len) of the memmap; returns unreadable paths."""
    paths, side, out_path, start = job
    array = np.load(out_path, mmap_mode="r+")
    bad = []
    for offset, path in enumerate(paths):
        try:
            image = read_image(Path(path), min_side=side)
        except Exception:  # noqa: BLE001 - any decode failure marks the row
            bad.append(path)
            continue
        if image.shape[:2] != (side, side):
            image = cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA)
        array[start + offset] = image
    array.flush()
    return bad


def image_cache(work_dir: Path, items: list[Item], side: int, workers: int = 0) -> tuple[np.ndarray, set[int]]:
    """The (N, side, side, 3) uint8 array of ``items`` (memory-mapped) and unreadable rows.

    Built once, in parallel processes, into a temporary file renamed into
    place; later calls with the same files and side only map it.
    """
    key = items_key(items, side, "rgb-uint8-v1")
    folder = Path(work_dir) / CACHE_DIR
    path, bad_path = folder / f"images-{side}-{key}.npy", folder / f"images-{side}-{key}.bad.json"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(items), side, side, 3)).flush()
            allocate(tmp, tmp.stat().st_size)  # a full disk is an error now, not a SIGBUS in a decoding process
            chunk = 2048
            jobs = [([str(it.path) for it in items[i:i + chunk]], side, str(tmp), i) for i in range(0, len(items), chunk)]
            workers = workers or min(8, os.cpu_count() or 1)
            with ProcessPoolExecutor(max_workers=workers) as pool:
                done = track(zip(jobs, pool.map(_decode_chunk, jobs)), "caching images", len(items),
                             count=lambda job_bad: len(job_bad[0][0]))
                bad = [p for _, part in done for p in part]
            atomic_write_json(bad_path, bad)
        log.info("cached %d images at %dx%d in %s", len(items), side, side, path)
    bad = set(json.loads(bad_path.read_text())) if bad_path.is_file() else set()
    rows = {i for i, it in enumerate(items) if str(it.path) in bad}
    return np.load(path, mmap_mode="r"), rows


def stored_tensors(path: Path, build: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The tensors saved at ``path``, or ``build()``'s, saved there first (atomically: all or nothing)."""
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    tensors = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(tensors, tmp)
    return tensors


def cache_path(root: Path, kind: str, key: str, suffix: str = ".pt") -> Path:
    """Where a cache of ``kind`` with ``key`` lives under ``root`` (a work or run folder)."""
    return Path(root) / CACHE_DIR / f"{kind}-{key}{suffix}"
