"""Prediction: a run's finished members over a set of images, and the submission CSV.

:func:`predict_items` is the one way probabilities of trained members are
made, for the out-of-fold predictions that the CV scores (pipeline/predict/cv.py),
the test predictions that are submitted, and predict-image: the same data
source, TTA and averaging, so the CV score measures what is sent. Members that
share a frozen backbone run it once per image and TTA view. Building a
submission frame is pure; only :func:`write_submission` touches the disk.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.data import shm
from pipeline.competition import Competition
from pipeline.config import TrainConfig, load_resolved
from pipeline.data.items import Item, list_split, load_reorg, training_fingerprint, unreadable_message
from pipeline.data.features import backbone_views
from pipeline.data.loaders import FeatureViews
from pipeline.data.plan import cached_views, eval_loader, shared_backbone_groups, test_sized
from pipeline.models.heads import FeatureHead
from pipeline.devices import inference_batch, probe, resolve_device
from pipeline.distributed import plan_for
from pipeline.errors import PipelineError, check_choice, tta_views
from pipeline.models.views import first_view_share
from pipeline.models.inference import infer, normalise_rows, unreadable_positions
from pipeline.io import read_csv
from pipeline.models import model_from_config, set_train_mode
from pipeline.workdir import SAMPLE_FILE
from pipeline.runs import Member, Run, load_best, load_last
from pipeline.models.task import Task
from pipeline.data.metadata import MetaEncoder, meta_tensor
from pipeline.predict import calibrate
from pipeline.predict.submission import class_difference, write_checked

log = logging.getLogger("pipeline")

UNREADABLE_CHOICES = ("error", "uniform", "drop")


@dataclass
class LoadedMember:
    member: Member
    model: torch.nn.Module
    config: TrainConfig
    classes: list[str]
    amp: str = "none"  # the precision it was trained in (bf16, fp16, none): predict computes in it too
    task: Task | None = None  # its outputs' kind and mapping (a regression's standardisation: its own)
    metadata: MetaEncoder | None = None  # how it encodes the metadata columns (fitted on its training rows)


def trained_amp(member: Member, cfg: TrainConfig) -> str:
    """The autocast dtype the member trained with, from its config.json; older runs: their --amp setting."""
    recorded = member.recorded_device()
    return recorded["amp_dtype"] if recorded else cfg.amp


def load_member(member: Member, device: torch.device, weights: str = "best") -> LoadedMember:
    """The kept weights of one finished member (or its last epoch's), ready for inference."""
    state = load_best(member) if weights == "best" else load_last(member)
    cfg = TrainConfig.from_json(state["config"])
    classes = list(state["classes"])
    task = Task.from_json(state.get("task"), classes)
    encoder = MetaEncoder.from_json(state.get("metadata"))
    model = model_from_config(cfg, task.n_outputs, initial_weights=False, meta_width=encoder.width if encoder else 0)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise PipelineError(f"{member.best_path} does not fit model {cfg.model} ({str(exc).splitlines()[0]}); "
                            "was the file replaced?") from None
    set_train_mode(model, False)
    return LoadedMember(member, model.to(device), cfg, classes, trained_amp(member, cfg), task, encoder)


def _group_probs(group: list[LoadedMember], items: list[Item], tta: str, device: torch.device, batch_size: int | None,
                 num_workers: int | None, strict: bool, work_dir: Path | None) -> tuple[list[np.ndarray], set[int]]:
    """Probabilities of each member of a group; a frozen backbone's features are computed once.

    Each member runs at the precision it was trained in (a group shares one).
    """
    first = group[0]
    cfg = replace(first.config, num_workers=num_workers)
    plan = plan_for(cfg, device, "files", amp=first.amp)  # predict reads image files
    batch_size = batch_size or inference_batch(test_sized(cfg, tta), device, workers=plan.workers,
                                               half_precision=plan.dtype is not None)
    loader = eval_loader(cfg, items, batch_size, plan, strict=strict, tta=tta)  # the test size, the views' scales
    if not first.config.freeze_backbone:
        loader.meta = meta_tensor(first.metadata, work_dir or first.config.work_dir, items)
        if plan.channels_last:
            first.model.to(memory_format=torch.channels_last)
        p, t, pos = infer(first.model, loader, device, tta=tta, amp_dtype=plan.dtype,
                          channels_last=plan.channels_last, progress="predict", gather=False,
                          activation=first.task.activation)
        return [p], unreadable_positions(t, pos)
    def missing_views(some: list[Item]):  # what the pool's view cache lacks: computed once, kept for any fold
        return backbone_views(first.model, eval_loader(cfg, some, batch_size, plan, strict=False, tta=tta), device,
                              len(some), tta, amp_dtype=plan.dtype, channels_last=plan.channels_last)

    cached = cached_views(first.config, items, tta, plan.dtype, missing_views, strict)  # out-of-fold rows
    views, targets = cached or backbone_views(first.model, loader, device, len(items), tta, amp_dtype=plan.dtype,
                                              channels_last=plan.channels_last)
    out = []
    for lm in group:  # each head on the shared (V, N, F) features, with its own encoding of the metadata
        feats = FeatureViews(views, targets, batch_size)
        feats.meta = meta_tensor(lm.metadata, work_dir or lm.config.work_dir, items)
        p, t, pos = infer(FeatureHead(lm.model), feats, device, amp_dtype=plan.dtype, gather=False,
                          activation=lm.task.activation)
        out.append(p)
    return out, unreadable_positions(t, pos)


def predict_items(members: list[Member], items: list[Item], *, tta: str = "none", device: str = "auto",
                  num_workers: int | None = None, batch_size: int | None = None, unreadable: str = "error",
                  weights: str = "best", work_dir: Path | None = None) -> tuple[list[str], np.ndarray, list[str]]:
    """Ids, the members' averaged probabilities (rows sum to 1) and the class names over ``items``.

    An image that cannot be decoded is an error naming it (``unreadable``
    "error"), gets the uniform distribution ("uniform", with a warning), or
    is left out ("drop", for out-of-fold rows). ``work_dir``: the work folder holding the items' metadata
    (default: the one each member trained on).
    """
    tta_views(tta)  # an unknown view: one line naming the valid ones
    check_choice("--unreadable-test", unreadable, UNREADABLE_CHOICES)
    dev = resolve_device(device)
    loaded = [load_member(m, dev, weights) for m in members]
    classes = loaded[0].classes
    for lm in loaded[1:]:
        if lm.classes != classes:
            raise PipelineError(f"{lm.member.dir} was trained on other classes than {loaded[0].member.dir}; "
                                "predict with members of one run")
    per_member: list[np.ndarray | None] = [None] * len(loaded)
    bad: set[int] = set()
    for group in shared_backbone_groups([lm.config for lm in loaded], [lm.amp for lm in loaded]):
        probs, group_bad = _group_probs([loaded[i] for i in group], items, tta, dev, batch_size, num_workers,
                                        strict=unreadable == "error", work_dir=work_dir)
        bad |= group_bad
        for i, p in zip(group, probs):
            per_member[i] = normalise_rows(p) if loaded[i].task.kind == "single" else p
    total = sum(per_member[1:], per_member[0]) / len(per_member)
    return (*_apply_unreadable(items, total, bad, unreadable, _fill(loaded)), classes)


def _fill(loaded: list[LoadedMember]) -> float | np.ndarray:
    """What an unreadable test image is predicted as with --unreadable-test uniform: the uniform distribution,
    0.5 per label, or the members' mean training target."""
    task = loaded[0].task
    if task.kind == "single":
        return 1.0 / task.n_outputs
    return 0.5 if task.kind == "multilabel" else float(np.mean([lm.task.center for lm in loaded]))


def _apply_unreadable(items: list[Item], probs: np.ndarray, bad: set[int], unreadable: str,
                      fill: float) -> tuple[list[str], np.ndarray]:
    if bad and unreadable == "uniform":
        probs[sorted(bad)] = fill
        log.warning("%s predicted as uniform", unreadable_message(items, bad, "test images"))
    elif bad:
        log.warning("leaving out %s", unreadable_message(items, bad, "images"))
        keep = [i for i in range(len(items)) if i not in bad]
        return [items[i].id for i in keep], probs[keep]
    return [it.id for it in items], probs


def test_probs_record(run: Run, members: list[Member], tta: str, n_ids: int, work_dir: Path, info: dict) -> dict:
    """What kept test probabilities were made from; equal records mean the probabilities still hold."""
    fingerprint = (load_resolved(run.config_path)[1].get("data") or {}).get("fingerprint")
    cal = calibrate.stored(run)
    return {"members": [m.name for m in members], "weights": {m.name: m.weights_stamp() for m in members},
            "tta": tta, "test_ids": n_ids, "fingerprint": fingerprint or training_fingerprint(work_dir, info),
            "calibration": cal and [cal["temperature"], cal["weight"]]}


def keep_test_probs(run: Run, members: list[Member], ids: list[str], probs: np.ndarray, classes: list[str],
                    tta: str, work_dir: Path, info: dict) -> pd.DataFrame:
    """Keep the averaged test probabilities in the run (for `pipeline blend`), every submission kind."""
    frame = pd.DataFrame(np.asarray(probs, dtype=np.float64), columns=classes)
    frame.insert(0, "id", ids)
    run.write_test_probs(frame, test_probs_record(run, members, tta, len(ids), work_dir, info))
    return frame


@dataclass(frozen=True)
class PredictResult:
    path: Path
    rows: int
    members: list[str]
    seconds: float
    tta: str = "none"
    view_seconds: float = 0.0  # of ``seconds``, the estimated share of the TTA views beyond the first


def decision_task(run: Run, info: dict) -> Task:
    """The work folder's task with the decision the run's CV fitted out of fold (thresholds), if any."""
    task = Task.of(info)
    decision = (run.read_cv() or {}).get("decision")
    return task.with_thresholds(decision["thresholds"]) if decision else task


def match_run(run: Run, comp: Competition, work_dir: Path, info: dict) -> dict:
    """The run's stored settings, once it is shown to fit this competition and work folder.

    Refuses, naming the difference, a run of another competition, a run whose
    class names are not the work folder's, and a work folder made from other
    training data than the run learned from (compared by name and content).
    """
    _, doc = load_resolved(run.config_path)
    data, config = doc.get("data") or {}, doc["config"]
    trained_for = data.get("competition", config.get("competition"))
    if trained_for != comp.slug:
        raise PipelineError(f"{run.dir} was trained for competition {trained_for!r}, not {comp.slug!r}; "
                            f"predict with a run of {comp.slug}")
    differ = class_difference(list(data.get("classes", info["classes"])), info["classes"])
    if differ:
        raise PipelineError(f"{run.dir} was trained on other classes than {work_dir} holds ({differ}); "
                            "predict with the work folder the run was trained on")
    if data.get("fingerprint") and data["fingerprint"] != training_fingerprint(work_dir, info):
        raise PipelineError(f"{work_dir} holds other training data than {run.dir} was trained on (another download, "
                            "or changed labels or images); predict with the work folder it was trained on, or retrain")
    return config


def predict(comp: Competition, work_dir: Path, run_dir: Path, out_csv: Path, members: str = "auto",
            tta: str | None = None, device: str = "auto", force: bool = False, num_workers: int | None = None,
            batch_size: int | None = None, unreadable: str = "error") -> PredictResult:
    """Average the members' softmax over WORK_DIR/test and write a checked submission.

    ``tta`` None takes the run's own TTA, the one its validation and CV scores used.
    """
    start = time.perf_counter()
    out_csv = Path(out_csv)
    if out_csv.exists() and not force:  # fail before spending the compute
        raise PipelineError(f"{out_csv} already exists; pass --force to overwrite it or choose another name")
    if unreadable == "drop":
        raise PipelineError("--unreadable-test drop would leave ids out of the submission; use error or uniform")
    info = load_reorg(work_dir, comp.slug)
    run = Run(run_dir)
    config = match_run(run, comp, work_dir, info)
    if tta is None:
        tta = config.get("tta", "none")
    elif tta_views(tta) != tta_views(config.get("tta", "none")):
        log.warning("warning: the run's scores used --tta %s; this submission uses --tta %s, so they do not "
                    "describe it", config.get("tta"), tta)
    sample = read_csv(Path(work_dir) / SAMPLE_FILE, what="sample submission")
    items = list_split(work_dir, info, "test")
    chosen = run.finished(members)
    started = time.perf_counter()
    with shm.guard():  # a worker out of shared memory: the cause and the fixes, not its traceback
        ids, probs, classes = predict_items(chosen, items, tta=tta, device=device, num_workers=num_workers,
                                            batch_size=batch_size, unreadable=unreadable, work_dir=work_dir)
    # the model's time grows with the views, each in proportion to its pixels (models/views.py)
    view_seconds = (time.perf_counter() - started) * (1 - first_view_share(tta))
    run.write_predict_time({"seconds": time.perf_counter() - started, "images": len(items), "members": len(chosen),
                            "views": len(tta_views(tta)), "tta": tta, "device": probe(resolve_device(device)).name})
    probs = calibrate.apply_stored(calibrate.stored(run), probs, classes)  # the values the CV was scored with
    frame = write_checked(comp, ids, probs, classes, sample, info["classes"], out_csv, force,
                          decision_task(run, info))
    keep_test_probs(run, chosen, ids, probs, classes, tta, work_dir, info)
    return PredictResult(out_csv, len(frame), [str(m.dir) for m in chosen], time.perf_counter() - start, tta,
                         view_seconds)
