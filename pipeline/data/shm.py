"""Shared memory for DataLoader workers: sized up front, and its exhaustion named when it happens anyway.

DataLoader workers hand batches to the main process through shared memory
(``/dev/shm`` on Linux). Docker gives a container 64 MB there by default;
workers then die while passing batches ("Bus error", "No space left on
device"). :func:`plan_sharing` is the pure decision (free shared memory,
open-file limit, workers asked, bytes a batch takes -> workers and sharing
strategy, and the one warning); :func:`loader_workers` probes and applies it
where the loaders are made; :func:`guard` turns a worker that ran out anyway
into one line naming the cause and the fixes.
"""
from __future__ import annotations

import contextlib
import logging
import os
import resource
from collections.abc import Iterator
from dataclasses import dataclass

from pipeline.errors import PipelineError

log = logging.getLogger("pipeline")

SHM_PATH = "/dev/shm"
HEADROOM = 1  # x the batches each worker prefetches: what is in /dev/shm at once (raise for a margin)
FDS_PER_BATCH = 4  # the file_descriptor strategy holds an open file per shared tensor of a batch
MORE_SHM = ("give the container more shared memory (`docker run --shm-size=8g ...`; Kubernetes: an emptyDir of "
            "medium Memory at /dev/shm)")
FIX = f"{MORE_SHM}, or use fewer workers (--num-workers 0)"
_WARNED: set[str] = set()


@dataclass(frozen=True)
class SharingPlan:
    """How many workers a loader gets, how they share tensors, and what to tell the user (None: nothing)."""

    workers: int
    strategy: str  # "file_descriptor" (torch's default on Linux) | "file_system"
    warning: str | None = None


def plan_sharing(shm_free: int | None, open_files: int | None, workers: int, batch_bytes: int,
                 prefetch: int) -> SharingPlan:
    """The workers that fit in ``shm_free`` bytes of shared memory (None: unknown, no limit) and the
    sharing strategy the open-file limit allows (pure)."""
    if workers <= 0:
        return SharingPlan(0, "file_descriptor")
    per_worker = max(1, HEADROOM * prefetch * batch_bytes)
    fit = workers if shm_free is None else min(workers, shm_free // per_worker)
    warning = None
    if fit < workers:
        warning = (f"{SHM_PATH} has {_mb(shm_free)} free, too little for {workers} DataLoader worker(s) passing "
                   f"{_mb(batch_bytes)} batches (about {_mb(per_worker)} each): using {fit}; {MORE_SHM}")
    strategy = "file_descriptor"
    if open_files is not None and open_files < fit * prefetch * FDS_PER_BATCH * HEADROOM + 256:
        strategy = "file_system"  # names in /dev/shm instead of one open file per tensor
    return SharingPlan(int(fit), strategy, warning)


def _mb(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**20:.0f} MB"


def shm_free(path: str = SHM_PATH) -> int | None:
    """Free bytes of shared memory (None where there is no /dev/shm to measure)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def open_files_limit() -> int | None:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY else int(soft)


def loader_workers(workers: int, batch_bytes: int, prefetch: int) -> int:
    """The workers a DataLoader gets here: the decision applied, its strategy set, its warning given once."""
    plan = plan_sharing(shm_free(), open_files_limit(), workers, batch_bytes, prefetch)
    if plan.warning and plan.warning not in _WARNED:
        _WARNED.add(plan.warning)
        log.warning("warning: %s", plan.warning)
    if plan.workers and plan.strategy != "file_descriptor":
        import torch.multiprocessing as mp

        mp.set_sharing_strategy(plan.strategy)
    return plan.workers


_SIGNS = ("shared memory", "Bus error", "/torch_", "ancdata", "shm")


def is_shm_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a DataLoader worker that failed passing a batch through shared memory."""
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(sign in text for sign in _SIGNS) and (
        "DataLoader worker" in text or "shared memory" in text or "No space left" in text)


@contextlib.contextmanager
def guard(resume_hint: str = "") -> Iterator[None]:
    """A worker out of shared memory inside the block becomes one line: the cause, then the fixes."""
    try:
        yield
    except RuntimeError as exc:
        if not is_shm_failure(exc):
            raise
        raise PipelineError(f"DataLoader workers ran out of shared memory ({SHM_PATH}: {_mb(shm_free())} free); "
                            f"{FIX}{resume_hint}") from exc
