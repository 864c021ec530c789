"""What each member of a run ran, read from what the run stored: one dict of facts per member.

The report's summary, its members table and its choice of figures all read
:func:`member_facts`, so they describe the same run. The sources, all written
by training into the member's folder (pipeline/runs.py names them):

- config.json "config": the member's settings after adaptation to its images;
- config.json "plan": what it ran (data source, batch, steps, epochs, how it
  trained, where its weights came from); for runs from before the plan was
  recorded it is rebuilt from the settings with the functions training uses;
- config.json "device": device and precision (pipeline/devices.py's plan);
- head_fit.json: how a fitted head was fitted (logreg: C and the inner-CV curve);
- done.json and metrics.csv: what it did (epochs run, steps per epoch).

A fact is a plain value (str, int, float, list, dict); None: unknown or does not apply.
The task kind (``task``, the plan's; single-label for runs from before kinds) is what the member
trained; the report's figures follow the work folder's kind (pipeline/report/build.py's TASK_FIGURES).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import TrainConfig
from pipeline.errors import PipelineError
from pipeline.runs import DEVICE_KEY, FULL, HOLDOUT, PLAN_KEY, Member

log = logging.getLogger("pipeline")

SINGLE_LABEL = "single"  # pipeline/models/task.py's kinds: single, multilabel, regression, ordinal
FIT, SGD, FIT_THEN_SGD = "fit", "sgd", "fit, then sgd"  # how a member's epochs train (the plan's "training")

# the facts the report shows, in order, with their row names; a member lacking one leaves it out
SHOWN = (("model", "model"), ("head", "head"), ("training", "training"), ("optimizer", "optimizer"),
         ("schedule", "schedule"), ("lr", "lr"), ("epochs", "epochs"), ("epochs_run", "epochs run"),
         ("phases", "phases"), ("batch_size", "batch size"), ("steps_per_epoch", "steps per epoch"),
         ("fit", "head fit"), ("weights", "weights"), ("data", "data"), ("image_size", "image size"),
         ("augment", "augment"), ("feature_views", "feature views"), ("ema", "ema"),
         ("average_last", "average of the last epochs"),
         ("device", "device"), ("precision", "precision"), ("train_images", "training images"),
         ("absent_classes", "classes absent from training"), ("absent_labels", "labels never positive in training"),
         ("target_range", "training range"), ("adapted", "adapted to the data"))


def member_facts(member: Member, run_config: dict | None = None, run_notes: tuple[str, ...] = ()
                 ) -> dict[str, Any]:
    """The facts of one member (see the module docstring); ``run_config`` is the run's config.json
    settings, for members without a config.json of their own (a run from before they were written),
    ``run_notes`` its adaptation notes, for members whose plan does not record theirs."""
    stored = _stored(member)
    cfg = stored.get("config") or dict(run_config or {})
    if (run_config or {}).get("head") == "logreg":  # members store the module they build (linear)
        cfg = {**cfg, "head": "logreg"}
    plan = stored.get(PLAN_KEY) or fallback_plan(cfg)
    device = stored.get(DEVICE_KEY) or {}
    done = _read(member.done)  # None while it trains
    metrics = _read(member.metrics) if member.metrics_path.is_file() else None
    training = plan.get("training") or training_of(cfg)
    sgd = training != FIT
    data = _data(plan, cfg)
    facts: dict[str, Any] = {
        "member": member.name, "task": (plan.get("task") or {}).get("kind", SINGLE_LABEL), "model": cfg.get("model"),
        "head": "logreg" if FIT in training else cfg.get("head"),
        "training": training, "optimizer": _optimizer(training, cfg),
        "schedule": cfg.get("schedule") if sgd else None, "lr": cfg.get("lr") if sgd else None,
        "epochs": plan.get("epochs", cfg.get("epochs")),
        "epochs_run": (done or {}).get("epochs", None if metrics is None else len(metrics)),
        "unfreeze_after": cfg.get("unfreeze_after") or 0,
        "phases": phases_text(cfg, training),
        "batch_size": plan.get("batch_size", cfg.get("batch_size")) if sgd else None,
        "steps_per_epoch": plan.get("steps_per_epoch") or _sgd_steps(metrics) if sgd else None,
        "fit": None, "fit_record": _read(member.head_fit),
        "weights": plan.get("weights") or weights_of(cfg),
        "data": data,
        "image_size": cfg.get("image_size"), "augment": cfg.get("augment") if sgd else None,
        "feature_views": cfg.get("feature_views") if "features" in data else None,
        "ema": cfg.get("ema") or None, "average_last": cfg.get("average_last") or None,
        "device": _device(device, cfg), "precision": _precision(device),
        "train_images": plan.get("n_train"), "adapted": list(plan.get("adapted", run_notes) or []), "stopped_early": bool((done or {}).get("stopped_early")),
    }
    facts["fit"] = fit_text(facts["fit_record"])
    facts["target_range"] = target_range(plan.get("task"))
    facts["metadata"] = plan.get("metadata")  # the fitted metadata encoding, when the plan records it
    return facts


def target_range(task: dict | None) -> list[float] | None:
    """[low, high] of a numeric member's training targets (its predictions are clipped to them), from the
    plan's task (pipeline/models/task.py's to_json); None for the other kinds or when not recorded."""
    if not task or task.get("kind") not in ("regression", "ordinal") or task.get("low") is None:
        return None
    return [float(task["low"]), float(task["high"])]


def _stored(member: Member) -> dict:
    """The member's config.json document ({} when it has none or it cannot be read)."""
    if not member.config_path.is_file():
        return {}
    try:
        return json.loads(Path(member.config_path).read_text(encoding="utf-8"))
    except ValueError as exc:
        log.warning("report: %s cannot be read (%s); its member is described by the run's settings",
                    member.config_path, exc)
        return {}


def _read(read):
    try:
        return read()
    except (PipelineError, OSError, ValueError, pd.errors.ParserError):
        return None


def _config(cfg: dict) -> TrainConfig | None:
    """The stored settings as a TrainConfig (None when they do not make one: a hand-written or older file)."""
    try:
        return TrainConfig.from_json(cfg)
    except (PipelineError, KeyError, TypeError, ValueError):
        return None


def training_of(cfg: dict) -> str:
    """How the epochs train, from the settings (the plan's "training" for runs that did not record it)."""
    from pipeline.train.plan import training_kind

    config = _config(cfg)
    return training_kind(config) if config is not None else SGD


def weights_of(cfg: dict) -> str:
    """Where the starting weights came from: "file: PATH", "hub" (downloaded) or "none" (random)."""
    from pipeline.train.plan import weights_source

    config = _config(cfg)
    return weights_source(config) if config is not None else "unknown"


def fallback_plan(cfg: dict) -> dict[str, Any]:
    """The parts of a member's plan its settings determine, for runs from before the plan was recorded:
    epochs, batch, training and weights through train/plan.py's own functions."""
    return {"epochs": cfg.get("epochs"), "batch_size": cfg.get("batch_size"), "training": training_of(cfg),
            "weights": weights_of(cfg)}


def phase_sources(cfg: dict) -> list[str]:
    """The data source of each training phase (one, or two with --unfreeze-after: the frozen phase reads
    cached features), chosen by the data plan's own function; [] if unknown."""
    from pipeline.data.plan import choose_source
    from pipeline.train.engine import phase

    config = _config(cfg)
    if config is None:
        return []
    starts = [0, config.unfreeze_after] if config.unfreeze_after else [0]
    return [choose_source(phase(config, epoch)).kind for epoch in starts]


def _data(plan: dict, cfg: dict) -> str:
    """'features', or 'features, then image_cache' for a member whose two phases read different sources.

    One phase: the plan's recorded source. Two (--unfreeze-after): each phase's, since the plan records
    one source for the member.
    """
    recorded = (plan.get("source") or {}).get("kind")
    kinds = phase_sources(cfg)
    if recorded and len(kinds) < 2:
        kinds = [recorded]
    kinds = list(dict.fromkeys(kinds))
    return ", then ".join(kinds) if kinds else "unknown"


def phases_text(cfg: dict, training: str) -> str | None:
    """'epoch 1: head (fit), backbone frozen; epochs 2-3: whole model' with --unfreeze-after; else None."""
    n, epochs = cfg.get("unfreeze_after") or 0, cfg.get("epochs") or 0
    if not n:
        return None
    first = "epoch 1" if n == 1 else f"epochs 1-{n}"
    later = f"epoch {n + 1}" if n + 1 == epochs else f"epochs {n + 1}-{epochs}"
    how = "fitted" if training == FIT_THEN_SGD else "trained"
    return f"{first}: the head {how} on the frozen backbone; {later}: the whole model"


def _optimizer(training: str, cfg: dict) -> str:
    if training == FIT:
        return FIT
    name = cfg.get("optimizer") or "?"
    return f"fit, then {name}" if training == FIT_THEN_SGD else name


def _sgd_steps(metrics: pd.DataFrame | None) -> int | None:
    """Optimizer steps of the last epoch that took any (metrics.csv's ``steps``; fitted epochs take 0)."""
    if metrics is None or "steps" not in metrics:
        return None
    steps = pd.to_numeric(metrics["steps"], errors="coerce")
    steps = steps[steps > 0]
    return int(steps.iloc[-1]) if len(steps) else None


def fit_curve(record: dict) -> tuple[str, float, dict[float, float], str]:
    """(parameter name, chosen value, inner-CV loss by value, loss name) of a head_fit.json: the softmax
    logreg's C and log loss, a per-label logistic fit's C and mean BCE, a ridge fit's alpha and squared error
    on the standardised target (pipeline/train/linear_fits.py)."""
    name = "alpha" if "alpha" in record else "C"
    if "inner_cv_log_loss" in record:
        curve, loss = record["inner_cv_log_loss"], "log loss"
    else:
        curve, loss = record.get("inner_cv_loss") or {}, "BCE" if name == "C" else "squared error"
    return name, float(record[name]), {float(v): float(s) for v, s in curve.items()}, loss


def fit_text(record: dict | None) -> str | None:
    """'logreg: C 1 (3-fold inner CV log loss by C: 0.1 0.52, 1 0.41, 10 0.47)' from head_fit.json."""
    if not record:
        return None
    name, chosen, curve, loss = fit_curve(record)
    by_value = ", ".join(f"{v:g} {s:.3g}" for v, s in curve.items())
    inner = f"{record['inner_folds']}-fold " if record.get("inner_folds") else ""
    return f"{record.get('head', 'fit')}: {name} {chosen:g}" + (
        f" ({inner}inner CV {loss} by {name}: {by_value})" if len(curve) > 1 else "")


def _device(device: dict, cfg: dict) -> str:
    if not device:
        return str(cfg.get("device") or "unknown")
    kind, name = device.get("device_type", "?"), device.get("device_name")
    return f"{kind} ({name})" if name and name != kind else str(kind)


def _precision(device: dict) -> str | None:
    dtype = device.get("amp_dtype")
    return None if dtype is None else ("fp32" if dtype == "none" else dtype)


def trains_over_epochs(facts: dict) -> bool:
    """Whether a member has a learning curve: more than one epoch run, some of them SGD."""
    return facts.get("training") != FIT and (facts.get("epochs_run") or 0) > 1


# ---------------------------------------------------------------- the classes each member trained on


def training_items(member: Member, work_dir: Path, info: dict) -> list:
    """The items a member trained on (the split its kind names)."""
    from pipeline.data.items import fold_split, list_split

    if member.fold is not None:
        return fold_split(work_dir, info, member.fold)[0]
    return list_split(work_dir, info, {HOLDOUT: "train", FULL: "train_valid"}.get(member.kind, "train"))


def absent_classes(classes: list[str], targets: list[int]) -> list[str]:
    """The classes (in order) with no row among a member's training targets (pure)."""
    seen = set(targets)
    return [c for i, c in enumerate(classes) if i not in seen]


def absent_labels(labels: list[str], targets: list) -> list[str]:
    """Multilabel: the labels (in order) positive in none of a member's training rows (pure)."""
    rows = np.asarray(targets, dtype=np.float64).reshape(len(targets), len(labels))
    positive = np.nan_to_num(rows) > 0.5
    return [name for k, name in enumerate(labels) if not positive[:, k].any()]


# ---------------------------------------------------------------- members side by side


def shown_facts(facts: dict) -> dict[str, Any]:
    """A member's facts as the report shows them: row name -> value, facts that do not apply left out."""
    out = {}
    for key, name in SHOWN:
        value = facts.get(key)
        if key == "absent_classes" and value is not None:
            value = len(value)
        if key == "target_range" and value:
            value = f"{value[0]:g} to {value[1]:g}"
        if key == "adapted" and value:
            value = "; ".join(value)  # each note has commas of its own
        if key == "epochs_run" and value == facts.get("epochs"):
            continue  # said once: "epochs" (a member stopped early or still training shows both)
        if value is not None and value != []:
            out[name] = value
    return out


def split_facts(members: list[dict]) -> tuple[dict[str, Any], pd.DataFrame]:
    """(the facts every member shares, a frame of the others with one row per member).

    A fact some members lack counts as differing (it is shown per member, blank where absent).
    """
    shown = [shown_facts(f) for f in members]
    names = list(dict.fromkeys(k for s in shown for k in s))
    common = {k: shown[0][k] for k in names
              if shown and all(k in s for s in shown) and all(s[k] == shown[0][k] for s in shown)}
    rows = [{"member": f["member"], **{k: s.get(k) for k in names if k not in common}}
            for f, s in zip(members, shown)]
    return common, pd.DataFrame(rows, dtype=object)
