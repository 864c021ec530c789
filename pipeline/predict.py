"""Prediction: softmax over a set of images, ensembles, TTA, and the submission CSV.

One code path (:func:`predict_member`) produces both the out-of-fold
predictions that train scores and the test predictions that are submitted, so
the CV score measures what is sent. Building a submission frame is pure; only
:func:`write_submission` touches the disk.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.checkpoint import load_checkpoint
from pipeline.competition import Competition
from pipeline.config import CHOICES, TrainConfig
from pipeline.data import (
    BAD_TARGET,
    ImageDataset,
    Item,
    build_transform,
    list_split,
    load_reorg,
    make_loader,
    unreadable_message,
)
from pipeline.distributed import resolve_device
from pipeline.errors import PipelineError, check_choice
from pipeline.io import read_csv
from pipeline.models import create_model, set_train_mode
from pipeline.reorg import SAMPLE_FILE
from pipeline.submission import build_submission, check_submission, write_submission

log = logging.getLogger("pipeline")

MEMBER_CHOICES = ("auto", "folds", "full", "holdout", "all")


def load_member(member_dir: Path, device: torch.device) -> tuple[torch.nn.Module, TrainConfig, list[str]]:
    """The best weights of one trained model, ready for inference."""
    state = load_checkpoint(member_dir / "best.pt")
    cfg = TrainConfig.from_json(state["config"])
    classes = list(state["classes"])
    model = create_model(cfg.model, len(classes), head=cfg.head, head_hidden=cfg.head_hidden, drop_rate=cfg.drop_rate)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise PipelineError(f"{member_dir / 'best.pt'} does not fit model {cfg.model} ({str(exc).splitlines()[0]}); "
                            "was the file replaced?") from None
    set_train_mode(model, False)
    return model.to(device), cfg, classes


@torch.no_grad()
def predict_probs(model: torch.nn.Module, loader, device: torch.device, tta: str, n: int, n_classes: int,
                  unreadable: set[int] | None = None) -> np.ndarray:
    """(n, C) softmax probabilities, averaged over the TTA views; streamed batch by batch.

    Positions whose image could not be decoded (target BAD_TARGET) are added
    to ``unreadable`` when it is given.
    """
    check_choice("--tta", tta, CHOICES["tta"])
    out = np.zeros((n, n_classes), dtype=np.float64)
    for x, y, idx in tqdm(loader, desc="predict", leave=False, disable=None):
        if unreadable is not None:
            unreadable.update(int(i) for i in idx[y == BAD_TARGET])
        x = x.to(device, non_blocking=True)
        views = [x, torch.flip(x, dims=[3])] if tta == "flip" else [x]
        p = sum(torch.softmax(model(v).float(), dim=1) for v in views) / len(views)
        out[idx.numpy()] = p.cpu().double().numpy()
    return out / out.sum(axis=1, keepdims=True)  # float32 softmax rows are 1 only to ~1e-7


UNREADABLE_CHOICES = ("error", "uniform", "drop")


def predict_member(member_dir: Path, items: list[Item], tta: str = "none", device: str = "auto",
                   num_workers: int = 0, batch_size: int = 256, unreadable: str = "error") -> tuple[list[str], np.ndarray]:
    """Ids and probabilities of one trained model over ``items``.

    An image that cannot be decoded is an error naming it (``unreadable``
    "error"), gets the uniform distribution ("uniform", with a warning), or
    is left out ("drop", for out-of-fold rows).
    """
    check_choice("--unreadable-test", unreadable, UNREADABLE_CHOICES)
    dev = resolve_device(device)
    model, cfg, classes = load_member(member_dir, dev)
    transform = build_transform(cfg.augment, cfg.image_size, cfg.mean, cfg.std, train=False)
    dataset = ImageDataset(items, transform, cfg.image_size, strict=unreadable == "error")
    loader = make_loader(dataset, batch_size, False, num_workers, 0, pin_memory=dev.type == "cuda")
    bad: set[int] = set()
    probs = predict_probs(model, loader, dev, tta, len(items), len(classes), bad)
    if bad and unreadable == "uniform":
        probs[sorted(bad)] = 1.0 / len(classes)
        log.warning("%s predicted as uniform", unreadable_message(items, bad, "test images"))
    elif bad:
        log.warning("leaving out %s", unreadable_message(items, bad, "images"))
        keep = [i for i in range(len(items)) if i not in bad]
        return [items[i].id for i in keep], probs[keep]
    return [it.id for it in items], probs


def find_members(run_dir: Path, members: str = "auto") -> list[Path]:
    """Trained models of a run: fold*/, full/, or the holdout run itself.

    auto: the folds if there are any, else full, else the holdout model.
    """
    check_choice("--members", members, MEMBER_CHOICES)
    run_dir = Path(run_dir)
    found = {
        "folds": sorted((p for p in run_dir.glob("fold*") if (p / "best.pt").is_file()), key=lambda p: int(p.name[4:] or 0)),
        "full": [run_dir / "full"] if (run_dir / "full" / "best.pt").is_file() else [],
        "holdout": [run_dir] if (run_dir / "best.pt").is_file() else [],
    }
    if members == "auto":
        chosen = found["folds"] or found["full"] or found["holdout"]
    elif members == "all":
        chosen = found["folds"] + found["full"] + found["holdout"]
    else:
        chosen = found[members]
    if not chosen:
        have = ", ".join(k for k, v in found.items() if v) or "none"
        raise PipelineError(f"{run_dir} has no trained {members} model (found: {have}); train first or change --members")
    return chosen


@dataclass(frozen=True)
class PredictResult:
    path: Path
    rows: int
    members: list[str]
    seconds: float


def predict(comp: Competition, work_dir: Path, run_dir: Path, out_csv: Path, members: str = "auto",
            tta: str = "none", device: str = "auto", force: bool = False, num_workers: int = 0,
            batch_size: int = 256, unreadable: str = "error") -> PredictResult:
    """Average the members' softmax over WORK_DIR/test and write a checked submission."""
    start = time.perf_counter()
    out_csv = Path(out_csv)
    if out_csv.exists() and not force:  # fail before spending the compute
        raise PipelineError(f"{out_csv} already exists; pass --force to overwrite it or choose another name")
    info = load_reorg(work_dir)
    if info["competition"] != comp.slug:
        raise PipelineError(f"{work_dir} was reorganised for {info['competition']!r}, not {comp.slug!r}")
    sample = read_csv(Path(work_dir) / SAMPLE_FILE, what="sample submission")
    items = list_split(work_dir, info, "test")
    chosen = find_members(run_dir, members)
    total = None
    for member_dir in chosen:
        if unreadable == "drop":
            raise PipelineError("--unreadable-test drop would leave ids out of the submission; use error or uniform")
        ids, probs = predict_member(member_dir, items, tta, device, num_workers, batch_size, unreadable)
        total = probs if total is None else total + probs
    frame = build_submission(comp, ids, total / len(chosen), info["classes"], sample)
    found = check_submission(comp, frame, sample, info["classes"])
    if found:
        raise PipelineError(f"refusing to write {out_csv}: {found[0]} ({len(found)} problems)")
    write_submission(frame, out_csv, force)
    return PredictResult(out_csv, len(frame), [str(m) for m in chosen], time.perf_counter() - start)
