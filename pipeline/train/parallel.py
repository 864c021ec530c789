"""Members trained by separate processes at once: which members a command owns, and their locks.

`pipeline train C WORK RUN --fold K` for different K may run at the same time
on one RUN_DIR (several GPUs of a box, machines sharing the folder, the tasks
of a job array): each process locks only the members it trains, the run's own
files are written atomically, and the out-of-fold score is assembled under
the run's short lock by whichever process finishes the last fold
(:func:`pipeline.predict.cv.assemble_cv`).

The run's own records describe the run, not the process that wrote them
last: RUN_DIR/config.json names every fold of folds.csv (``--folds N``) when
a process trains one of them, and RUN_DIR/done.json lists every finished
member, written under the short lock, so the last process to finish lists
them all whatever the order.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from pipeline.config import Resolved, TrainConfig
from pipeline.data.items import n_folds
from pipeline.io import atomic_write_json
from pipeline.predict.cv import LOCK_WAIT  # as long as a finishing fold waits for another assembling the CV
from pipeline.runs import FOLD, FULL, HOLDOUT, Run, member_name

FOLD_PROCESSES = "--fold processes"  # the source of a run's --folds N when its folds were trained one by one


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


def run_resolved(resolved: Resolved) -> Resolved:
    """The run's settings: a ``--fold K`` command's recorded as the run of every fold of folds.csv (``--folds N``).

    Every process of the run then writes the same record; each member's own
    config.json keeps the one fold it trained.
    """
    cfg = resolved.config
    if cfg.fold is None:
        return resolved
    sources = {k: v for k, v in resolved.sources.items() if k != "fold"}
    return replace(resolved, config=replace(cfg, fold=None, folds=n_folds(cfg.work_dir)),
                   sources={**sources, "folds": FOLD_PROCESSES})


def write_run_config(resolved: Resolved, data: dict) -> None:
    """RUN_DIR/config.json: the run's resolved settings (:func:`run_resolved`) and what it learns from."""
    atomic_write_json(Run(resolved.config.run_dir).config_path, {**run_resolved(resolved).to_json(), "data": data})


def planned_members(cfg: TrainConfig) -> list[str]:
    """Every member of the run ``cfg`` belongs to: with ``--fold K``, every fold of folds.csv."""
    return owned_members(replace(cfg, fold=None, folds=n_folds(cfg.work_dir)) if cfg.fold is not None else cfg)


def mark_run_done(cfg: TrainConfig) -> dict:
    """RUN_DIR/done.json once a train command ends: every finished member of the run and the planned ones
    still missing. Read and written under the run's short lock: of processes finishing at once, the last
    writer sees every member the others finished."""
    run = Run(cfg.run_dir)
    with run.lock(wait=LOCK_WAIT):
        finished = [m.name for m in run.members() if m.is_finished]
        record = {"members": finished, "missing": [m for m in planned_members(cfg) if m not in finished]}
        run.mark_done(record)
    return record
