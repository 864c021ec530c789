"""Folds trained in separate Kaggle kernels (or anywhere else), gathered into one run with its CV.

Each fold kernel (`pipeline kernel build --train --fold K`) leaves its run
folder, holding one finished fold, in its output. :func:`gather` reads those
outputs (folders, e.g. from `kaggle kernels output`), shows that every fold
was trained for this competition, on this work folder's training data and its
fold K, with the same settings, copies the folds into RUN_DIR, writes the
run's config.json for this machine's folders and assembles the CV once every
fold is there; `pipeline predict` then works as on a run trained here.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.competition import Competition
from pipeline.config import TrainConfig, absolute, load_resolved
from pipeline.download.kaggle import CREDENTIALS_HELP, credentials_present, run_kaggle
from pipeline.data.items import fold_split, load_reorg, n_folds, training_fingerprint
from pipeline.errors import PipelineError
from pipeline.io import atomic_save, atomic_write_json
from pipeline.kernel.dataset import ref_problem
from pipeline.predict.cv import LOCK_WAIT, assemble_cv
from pipeline.runs import DONE_FILE, LOCK_FILE, Member, Run
from pipeline.train.parallel import mark_run_done
from pipeline.train.plan import ids_digest

log = logging.getLogger("pipeline")

# Settings that may differ between the folds of one run: where it lives, which member, which hardware.
NOT_COMPARED = frozenset({"competition", "work_dir", "run_dir", "fold", "folds", "full", "device", "num_workers"})
GATHERED_KEY = "gathered"  # RUN_DIR/config.json: which folder each gathered fold came from
SEARCH_DEPTH = 3  # how deep below a kernel's output its run folder may lie


@dataclass(frozen=True)
class Source:
    """One kernel's output: the folder given, the run found in it, its config.json and its finished folds."""

    folder: Path
    run: Run
    doc: dict
    members: tuple[Member, ...]


def find_run(folder: Path) -> Run:
    """The run in a kernel's output: the folder itself, else the shallowest folder below it (hidden ones
    skipped) holding a run's config.json beside a fold folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PipelineError(f"{folder} is not a folder; give the kernels' output folders "
                            "(`kaggle kernels output USER/KERNEL -p FOLDER`)")
    found = []
    for root, dirs, _ in os.walk(folder):
        depth = len(Path(root).relative_to(folder).parts)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if depth < SEARCH_DEPTH else []
        run = Run(Path(root))
        if run.is_run() and any(m.fold is not None for m in run.members()):
            found.append((depth, str(root), run))
    if not found:
        raise PipelineError(f"{folder} holds no run with a fold (a run folder with a fold<K> folder in it); "
                            "is it the output of a fold kernel that finished?")
    return min(found, key=lambda f: f[:2])[2]


def read_source(folder: Path) -> Source:
    """The finished folds of the run in ``folder`` (a fold still training there is an error)."""
    run = find_run(folder)
    _, doc = load_resolved(run.config_path)
    folds = [m for m in run.members() if m.fold is not None]
    unfinished = [m.name for m in folds if not m.is_finished]
    if unfinished:
        raise PipelineError(f"{run.dir}: {', '.join(unfinished)} did not finish (no {DONE_FILE}); rerun that fold's "
                            "kernel and download its output again")
    return Source(Path(folder), run, doc, tuple(folds))


def check_sources(sources: list[Source], comp: Competition, work_dir: Path, info: dict,
                  reference: dict | None) -> None:
    """Refuse, naming the folder and the difference, folds that would not make one run with this work folder.

    ``reference``: the settings the folds must share (RUN_DIR's own, when it already holds other folds).
    """
    fingerprint, total = training_fingerprint(work_dir, info), n_folds(work_dir)
    reference = reference or sources[0].doc["config"]
    seen: dict[str, Path] = {}
    for source in sources:
        data, config = source.doc.get("data") or {}, source.doc["config"]
        where = f"{source.folder} (run {source.run.dir})"
        if data.get("competition") != comp.slug:
            raise PipelineError(f"{where} was trained for {data.get('competition')!r}, not {comp.slug!r}")
        if data.get("fingerprint") != fingerprint:
            raise PipelineError(f"{where} was trained on other training data than {work_dir} holds; reorganise the "
                                "same download here")
        if config.get("folds") and config["folds"] != total:  # (older runs recorded a --fold K process's own fold)
            raise PipelineError(f"{where} belongs to a run of {config['folds']} folds but {work_dir}/folds.csv "
                                f"has {total}; reorganise with `pipeline reorg ... --folds {config['folds']}`")
        differ = [k for k in sorted((set(config) | set(reference)) - NOT_COMPARED)
                  if _comparable(k, config.get(k)) != _comparable(k, reference.get(k))]
        if differ:
            k = differ[0]
            raise PipelineError(f"{where} was trained with {k}={config.get(k)!r}, the other folds with "
                                f"{reference.get(k)!r}: the folds of one run share their settings")
        for member in source.members:
            if member.name in seen:
                raise PipelineError(f"{member.name} is in both {seen[member.name]} and {source.folder}; give each "
                                    "fold once")
            seen[member.name] = source.folder
            check_fold(member, work_dir, info, where)


def _comparable(key: str, value):
    """A setting as the folds must share it: a weights file by its name (each machine has its own path to it)."""
    return Path(value).name if key == "weights" and value else value


def check_fold(member: Member, work_dir: Path, info: dict, where: str) -> None:
    """The member validated on this work folder's fold K (the same images), by the digest its plan recorded."""
    plan = member.recorded_plan() or {}
    _, valid = fold_split(work_dir, info, member.fold)
    recorded, here = plan.get("valid_ids"), ids_digest(valid)
    if recorded is None:
        raise PipelineError(f"{member.dir} records no digest of its validation images (trained by an older "
                            "pipeline): retrain that fold")
    if recorded != here:
        raise PipelineError(f"{member.name} of {where} validated on other images than fold {member.fold} of "
                            f"{work_dir}/folds.csv: reorganise with the kernels' --folds and --seed")


def check_free(member: Member, dest: Member, force: bool) -> None:
    """A fold already trained in the run is replaced only with --force."""
    if (dest.is_finished or dest.is_started or dest.best_path.is_file()) and not force:
        raise PipelineError(f"{dest.dir} already holds a trained fold; pass --force to replace it with "
                            f"{member.dir}")


def copy_member(member: Member, dest: Member) -> None:
    """Copy a finished member into the run, under the member's lock; its done.json last, so an interrupted
    copy leaves an unfinished member, never a finished one with missing files."""
    with dest.lock():
        dest.clear()
        files = sorted((p for p in member.dir.rglob("*") if p.is_file() and p.name != LOCK_FILE),
                       key=lambda p: p.name == DONE_FILE and p.parent == member.dir)
        for path in files:
            atomic_save(dest.dir / path.relative_to(member.dir), lambda tmp, src=path: shutil.copy2(src, tmp))


def gathered_config(reference: dict, comp_arg: str, work_dir: Path, run_dir: Path, device: str) -> dict:
    """The run's settings on this machine: its folders, the competition as named here, every fold of the run."""
    return replace(TrainConfig.from_json(reference), competition=comp_arg, work_dir=absolute(work_dir), run_dir=absolute(run_dir),
                   device=device, fold=None, full=False, folds=n_folds(work_dir)).to_json()


@dataclass(frozen=True)
class Gathered:
    members: list[str]  # the folds copied in
    missing: list[str]  # the run's folds not there yet
    cv: dict | None  # cv.json's record once every fold is there


@contextlib.contextmanager
def download_outputs(refs: list[str], run_dir: Path) -> Iterator[list[Path]]:
    """Each kernel's output, `kaggle kernels output USER/KERNEL -p DIR`, in a temporary folder beside RUN_DIR
    (the same disk, removed afterwards)."""
    if not refs:
        yield []
        return
    problems = [p for p in (ref_problem("--kernel", ref, 5) for ref in refs) if p]
    if problems:
        raise PipelineError(f"{problems[0]}; give the kernel as USER/KERNEL, as `kaggle kernels list --mine` shows it")
    if not credentials_present():
        raise PipelineError(f"no Kaggle credentials found: {CREDENTIALS_HELP}")
    parent = absolute(run_dir).parent
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gather-", dir=parent) as tmp:
        folders = []
        for ref in refs:
            dest = Path(tmp) / ref.replace("/", "--")
            dest.mkdir()
            log.info("downloading the output of kernel %s", ref)
            run_kaggle(["kernels", "output", ref, "-p", str(dest)])
            folders.append(dest)
        yield folders


def gather(comp: Competition, comp_arg: str, work_dir: Path, run_dir: Path, folders: list[Path],
           device: str = "auto", force: bool = False) -> Gathered:
    """Copy the finished folds of ``folders`` into RUN_DIR and assemble the CV once every fold is there.

    ``comp_arg``: the competition as this machine names it (a slug, or a spec file's path).
    """
    if not folders:
        raise PipelineError("nothing to gather: give the fold kernels' output folders, or --kernel USER/KERNEL")
    info = load_reorg(work_dir, comp.slug)
    sources = [read_source(folder) for folder in folders]
    run = Run(absolute(run_dir))
    incoming = {m.name for s in sources for m in s.members}
    kept = [m for m in run.members() if m.is_finished and m.name not in incoming]
    reference = load_resolved(run.config_path)[1] if kept and run.is_run() else sources[0].doc
    check_sources(sources, comp, work_dir, info, reference["config"])
    members = [(member, run.member(member.name)) for source in sources for member in source.members]
    for member, dest in members:  # every refusal before the first copy
        check_free(member, dest, force)
    for member, dest in members:
        copy_member(member, dest)
        log.info("gathered %s from %s", member.name, member.dir)
    with run.lock(wait=LOCK_WAIT):
        where = {**(reference.get(GATHERED_KEY) or {}),
                 **{m.name: str(absolute(s.folder)) for s in sources for m in s.members}}
        doc = {**reference, "config": gathered_config(reference, comp_arg, work_dir, run.dir, device),
               "sources": {**reference.get("sources", {}), "device": "kernel gather --device"}, GATHERED_KEY: where}
        atomic_write_json(run.config_path, doc)
    cfg = TrainConfig.from_json(doc)
    missing = mark_run_done(cfg)["missing"]
    return Gathered(sorted(incoming), missing, assemble_cv(cfg, comp, info))
