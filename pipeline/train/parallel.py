"""Members trained by separate processes at once: which members a command owns, and their locks.

`pipeline train C WORK RUN --fold K` for different K may run at the same time
on one RUN_DIR (several GPUs of a box, machines sharing the folder, the tasks
of a job array): each process locks only the members it trains, the run's own
files are written atomically, and the out-of-fold score is assembled under
the run's short lock by whichever process finishes the last fold
(:func:`pipeline.predict.cv.assemble_cv`).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from pipeline.config import TrainConfig
from pipeline.runs import FOLD, FULL, HOLDOUT, Run, member_name


def owned_members(cfg: TrainConfig) -> list[str]:
    """The members this command trains, from its settings alone (``--folds N``: fold0..fold<N-1>)."""
    if cfg.mode == "full":
        return [FULL]
    if cfg.mode == "holdout":
        return [HOLDOUT]
    folds = [cfg.fold] if cfg.fold is not None else range(cfg.folds)
    return [member_name(FOLD, k) for k in folds]


@contextlib.contextmanager
def member_locks(cfg: TrainConfig, enabled: bool = True) -> Iterator[None]:
    """Hold the lock of every member this command trains, for the whole command (none when disabled:
    the other ranks of a torchrun group, whose rank 0 holds them)."""
    with contextlib.ExitStack() as stack:
        if enabled:
            run = Run(cfg.run_dir)
            for name in owned_members(cfg):
                stack.enter_context(run.member(name).lock())
        yield


def others_files(run_dir: Path, owned: list[str], path: Path) -> bool:
    """Whether ``path`` (under RUN_DIR) belongs to another process's work: a member this command does not
    train, or a run file while such a member exists. A failed command never removes those."""
    parts = Path(path).relative_to(run_dir).parts
    if not parts:
        return False
    others = [m.name for m in Run(run_dir).members() if m.name not in owned]
    if parts[0] in others:
        return True
    return len(parts) == 1 and bool(others) and Path(path).is_file()
