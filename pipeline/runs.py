"""The run directory: its members, every file name in it, what is finished, and a member's state.

A run (RUN_DIR) holds one folder per trained model, its *members*: ``holdout``
(train/ vs valid/), ``fold<K>`` (one per CV fold) and ``full`` (train_valid,
no validation). This is the only module that spells a run's file names; every
other module asks it for paths, for the finished members, and to save or
restore a member's training state (one symmetric pair, so nothing saved is
forgotten on resume).

    RUN_DIR/config.json         resolved settings + the source of each value
    RUN_DIR/oof.csv, cv.json    out-of-fold predictions and the CV score (fold runs)
    RUN_DIR/test_probs.csv, test_probs.json   the last predict's averaged test probabilities and what made them
    RUN_DIR/cache               the data caches, when WORK_DIR is read-only
    RUN_DIR/summary.txt         the start-of-run summary of the last `train` command
    RUN_DIR/done.json           written when a `train` command finished every member it trained
    RUN_DIR/tracking.json, mlflow/   --track mlflow: the MLflow run per store, and the default local store
    RUN_DIR/<member>/config.json, metrics.csv, last.pt, best.pt, done.json
    (a member's config.json: its settings and, under "device", the effective device decisions)
    RUN_DIR/<member>/head_fit.json  a fitted head's record (--head logreg: C and its inner-CV curve)
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pipeline.errors import PipelineError, check_choice
from pipeline.io import atomic_write_csv, atomic_write_json, atomic_write_text, exclusive_lock, read_csv, read_json

if TYPE_CHECKING:
    import pandas as pd

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.csv"
LAST_FILE = "last.pt"  # every epoch: what --resume continues from
BEST_FILE = "best.pt"  # the weights predict uses
DONE_FILE = "done.json"  # written when a member finishes: predict and the CV take only finished members
OOF_FILE = "oof.csv"
CV_FILE = "cv.json"
TEST_PROBS_FILE = "test_probs.csv"  # id + one column per class: what the last predict averaged (blend reads it)
TEST_PROBS_META_FILE = "test_probs.json"  # beside it: members, TTA, test ids' count, training fingerprint
PREDICT_TIME_FILE = "predict_time.json"  # the last predict's seconds, images, members, views, device (kernel build)
PLAN_KEY = "plan"  # the member plan in a member's config.json
DEVICE_KEY = "device"  # member config.json: the effective device settings (pipeline/devices.py's DevicePlan)
HEAD_FIT_FILE = "head_fit.json"  # a member whose head was fitted, not trained: how (C, inner-CV curve)
TENSORBOARD_DIR = "tensorboard"
SUMMARY_FILE = "summary.txt"  # RUN_DIR: what the last train command set out to do (pipeline/train/summary.py)
RUN_DONE_FILE = "done.json"  # RUN_DIR (not a member's DONE_FILE): the last train command finished
REPORT_DIR = "report"  # where `pipeline report` writes by default
TRACKING_FILE = "tracking.json"  # RUN_DIR: the experiment tracker's run of this run, per tracking store
TRACKING_DIR = "mlflow"  # RUN_DIR: the default local MLflow store (--track mlflow without MLFLOW_TRACKING_URI)
LOCK_FILE = ".lock"  # RUN_DIR: the short lock of the run's own files; <member>/: held by the process training it
HOLDOUT, FULL, FOLD = "holdout", "full", "fold"
_FOLD_NAME = re.compile(r"fold(\d+)")
MEMBER_CHOICES = ("auto", "folds", "full", "holdout", "all")


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> Any: ...


@dataclass(frozen=True)
class Member:
    """One trained model of a run: its folder and files."""

    run_dir: Path
    name: str  # holdout | full | fold<K>

    @property
    def dir(self) -> Path:
        return self.run_dir / self.name

    @property
    def fold(self) -> int | None:
        match = _FOLD_NAME.fullmatch(self.name)
        return int(match.group(1)) if match else None

    @property
    def kind(self) -> str:
        return FOLD if self.fold is not None else self.name

    @property
    def config_path(self) -> Path:
        return self.dir / CONFIG_FILE

    def lock(self):
        """Hold the member's writer lock: one process trains a member, other members may train at once
        (a second writer of this member gets a clear error; a dead holder's lock is free)."""
        return exclusive_lock(self.dir / LOCK_FILE, f"{self.name} of run {self.run_dir}")

    def write_config(self, config: dict, device: dict, plan: dict | None = None) -> None:
        """The member's settings, the device decisions it trains with (dtype, channels_last, workers...) and its
        plan (data source, batch, steps: pipeline/train/plan.py)."""
        record = {"config": config, DEVICE_KEY: device}
        if plan is not None:
            record[PLAN_KEY] = plan
        atomic_write_json(self.dir / CONFIG_FILE, record)

    def recorded_plan(self) -> dict | None:
        """The member's plan as training recorded it (None for runs from before plans were recorded)."""
        path = self.dir / CONFIG_FILE
        return _read_json(path, "member config").get(PLAN_KEY) if path.is_file() else None

    def recorded_device(self) -> dict | None:
        """The device decisions written at training time (None for runs from before they were recorded)."""
        path = self.dir / CONFIG_FILE
        return _read_json(path, "member config").get(DEVICE_KEY) if path.is_file() else None

    def write_head_fit(self, record: dict) -> None:
        """How a fitted head was fitted (pipeline/train/logreg.py's record: C, the inner-CV log loss by C)."""
        atomic_write_json(self.dir / HEAD_FIT_FILE, record)

    def head_fit(self) -> dict | None:
        """The fitted head's record, or None for a head trained by SGD (or a run from before it was kept)."""
        path = self.dir / HEAD_FIT_FILE
        return _read_json(path, "fitted-head record") if path.is_file() else None

    @property
    def best_path(self) -> Path:
        return self.dir / BEST_FILE

    @property
    def metrics_path(self) -> Path:
        return self.dir / METRICS_FILE

    @property
    def is_started(self) -> bool:
        return (self.dir / LAST_FILE).is_file()

    @property
    def is_finished(self) -> bool:
        return (self.dir / DONE_FILE).is_file() and (self.dir / BEST_FILE).is_file()

    def weights_stamp(self) -> str:
        """Size and modification time of best.pt: changes when the member is retrained (kept outputs go stale)."""
        st = self.best_path.stat()
        return f"{st.st_size}:{st.st_mtime_ns}"

    def done(self) -> dict:
        """What training recorded when the member finished (epochs, best)."""
        return _read_json(self.dir / DONE_FILE, "finished-member record")

    def mark_done(self, record: dict) -> None:
        atomic_write_json(self.dir / DONE_FILE, record)

    def unmark_done(self) -> None:
        (self.dir / DONE_FILE).unlink(missing_ok=True)

    def clear(self) -> None:
        """Remove what training writes into the member (for --force); other files stay."""
        for name in (CONFIG_FILE, METRICS_FILE, LAST_FILE, BEST_FILE, DONE_FILE, HEAD_FIT_FILE):
            (self.dir / name).unlink(missing_ok=True)

    def files_for_predict(self) -> tuple[Path, ...]:
        """The member's files that inference and the reports read (no last.pt)."""
        return tuple(self.dir / n for n in (BEST_FILE, CONFIG_FILE, DONE_FILE, METRICS_FILE, HEAD_FIT_FILE))

    @property
    def last_path(self) -> Path:
        return self.dir / LAST_FILE

    @property
    def tensorboard_dir(self) -> Path:
        return self.dir / TENSORBOARD_DIR

    def metrics(self) -> pd.DataFrame:
        import pandas as pd  # lazily: the CLI starts without pandas

        return pd.read_csv(self.dir / METRICS_FILE)


def member_name(kind: str, fold: int | None = None) -> str:
    return f"{FOLD}{fold}" if kind == FOLD else kind


@dataclass(frozen=True)
class Run:
    """A run directory and the members found in it."""

    dir: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "dir", Path(self.dir))

    def member(self, name: str) -> Member:
        return Member(self.dir, name)

    @property
    def config_path(self) -> Path:
        return self.dir / CONFIG_FILE

    @property
    def oof_path(self) -> Path:
        return self.dir / OOF_FILE

    @property
    def cv_path(self) -> Path:
        return self.dir / CV_FILE

    @property
    def report_dir(self) -> Path:
        return self.dir / REPORT_DIR

    def is_run(self) -> bool:
        return self.config_path.is_file()

    def lock(self, enabled: bool = True, wait: float = 0.0):
        """Hold the short lock on the run's own files (cv.json, oof.csv): held while they are assembled,
        waited for up to ``wait`` seconds. Training holds each member's lock instead (:meth:`Member.lock`)."""
        if not enabled:
            return contextlib.nullcontext()
        return exclusive_lock(self.dir / LOCK_FILE, f"run {self.dir}", wait=wait)

    @property
    def summary_path(self) -> Path:
        return self.dir / SUMMARY_FILE

    @property
    def tracking_path(self) -> Path:
        return self.dir / TRACKING_FILE

    @property
    def tracking_dir(self) -> Path:
        return self.dir / TRACKING_DIR

    def write_summary(self, text: str) -> None:
        atomic_write_text(self.summary_path, text + "\n")

    def note_in_summary(self, line: str, replaces: str) -> None:
        """Add ``line`` at the end of the summary, in place of an earlier line starting with ``replaces``."""
        try:
            kept = [x for x in self.summary_path.read_text(encoding="utf-8").splitlines() if not x.startswith(replaces)]
        except FileNotFoundError:
            kept = []
        self.write_summary("\n".join([*kept, line]))

    @property
    def done_path(self) -> Path:
        return self.dir / RUN_DONE_FILE

    def mark_done(self, record: dict) -> None:
        """Mark the train command finished (a file target for make, whatever the members)."""
        atomic_write_json(self.done_path, record)

    def unmark_done(self) -> None:
        self.done_path.unlink(missing_ok=True)

    def members(self) -> list[Member]:
        """Member folders on disk (stray folders beside them are ignored), holdout, folds, full."""
        if not self.dir.is_dir():
            return []
        folds = sorted((m for m in (Member(self.dir, p.name) for p in self.dir.iterdir() if p.is_dir())
                        if m.fold is not None), key=lambda m: m.fold)
        holdout, full = ([Member(self.dir, n)] if (self.dir / n).is_dir() else [] for n in (HOLDOUT, FULL))
        return holdout + folds + full

    def finished(self, selection: str = "auto") -> list[Member]:
        """Finished members: auto = the folds if any, else full, else holdout; or folds/full/holdout/all."""
        check_choice("--members", selection, MEMBER_CHOICES)
        done = [m for m in self.members() if m.is_finished]
        found = {k: [m for m in done if m.kind == kind] for k, kind in
                 (("folds", FOLD), ("full", FULL), ("holdout", HOLDOUT))}
        if selection == "auto":
            chosen = found["folds"] or found["full"] or found["holdout"]
        elif selection == "all":
            chosen = done
        else:
            chosen = found[selection]
        if not chosen:
            have = ", ".join(k for k, v in found.items() if v) or "none"
            unfinished = [m.name for m in self.members()
                          if (m.is_started or m.best_path.is_file()) and not m.is_finished]
            hint = f"; still training: {', '.join(unfinished)}" if unfinished else ""
            raise PipelineError(f"{self.dir} has no finished {selection} model (found: {have}{hint}); "
                                "train first or change --members")
        return chosen

    def files_for_predict(self) -> list[Path]:
        """Every file a copy of the run needs for predict and reports (finished members only)."""
        run_files = [p for p in (self.config_path, self.cv_path) if p.is_file()]
        return run_files + [p for m in self.finished("all") for p in m.files_for_predict() if p.is_file()]

    def read_cv(self) -> dict | None:
        return _read_json(self.cv_path, "CV score") if self.cv_path.is_file() else None

    def write_cv(self, cv: dict, oof: pd.DataFrame) -> None:
        atomic_write_csv(self.oof_path, oof)
        atomic_write_json(self.cv_path, cv)

    @property
    def test_probs_path(self) -> Path:
        return self.dir / TEST_PROBS_FILE

    @property
    def test_probs_meta_path(self) -> Path:
        return self.dir / TEST_PROBS_META_FILE

    def write_test_probs(self, probs: pd.DataFrame, record: dict) -> None:
        """Keep the test probabilities (id + class columns) and the record of what made them.

        The record goes first out and last in: a crash between the two writes
        leaves probabilities without a record, which readers treat as absent,
        never a record describing other probabilities.
        """
        self.test_probs_meta_path.unlink(missing_ok=True)
        atomic_write_csv(self.test_probs_path, probs, float_format="%.10g")
        atomic_write_json(self.test_probs_meta_path, record)

    @property
    def predict_time_path(self) -> Path:
        return self.dir / PREDICT_TIME_FILE

    def write_predict_time(self, record: dict) -> None:
        atomic_write_json(self.predict_time_path, record)

    def read_predict_time(self) -> dict | None:
        """What the last predict took: seconds, images, members, views, device (None before any)."""
        path = self.predict_time_path
        return _read_json(path, "predict time record") if path.is_file() else None

    def read_test_probs(self) -> tuple[pd.DataFrame, dict] | None:
        """The kept test probabilities (ids as strings, class columns as floats) and their record, or None."""
        if not (self.test_probs_meta_path.is_file() and self.test_probs_path.is_file()):
            return None
        record = _read_json(self.test_probs_meta_path, "test probabilities record")
        frame = read_csv(self.test_probs_path, what="kept test probabilities")
        classes = [c for c in frame.columns if c != "id"]
        try:
            frame[classes] = frame[classes].astype(float)
        except ValueError:
            raise PipelineError(f"{self.test_probs_path} holds a value that is not a number; "
                                "delete it and predict again") from None
        return frame, record


def _read_json(path: Path, what: str) -> dict:
    return read_json(path, f"the {what} is missing; train the run first", "retrain into a new RUN_DIR")


# ---------------------------------------------------------------- a member's training state


def save_state(path: Path, parts: dict[str, Stateful | None], meta: dict[str, Any]) -> None:
    """Write every part's ``state_dict()`` and the plain ``meta`` values into one checkpoint."""
    from pipeline.checkpoint import save_checkpoint

    state = {name: (part.state_dict() if part is not None else None) for name, part in parts.items()}
    save_checkpoint(path, {**state, **meta})


def restore_parts(state: dict[str, Any], parts: dict[str, Stateful | None]) -> None:
    """The mirror of :func:`save_state`: load each part from the loaded checkpoint ``state`` (a part left
    out of ``parts`` keeps its fresh state)."""
    for name, part in parts.items():
        if part is not None and state.get(name) is not None:
            part.load_state_dict(state[name])


def save_epoch(member: Member, parts: dict[str, Stateful | None], meta: dict[str, Any],
               best: dict[str, Any] | None, history: list[dict]) -> None:
    """last.pt every epoch, best.pt when ``best`` is given, then metrics.csv.

    last.pt is written first, so every metrics.csv row has its checkpoint on
    disk (resume rewrites metrics.csv from last.pt's history).
    """
    from pipeline.checkpoint import save_checkpoint

    import pandas as pd

    save_state(member.dir / LAST_FILE, parts, meta)
    if best is not None:
        save_checkpoint(member.dir / BEST_FILE, best)
    atomic_write_csv(member.dir / METRICS_FILE, pd.DataFrame(history))


def load_best(member: Member) -> dict[str, Any]:
    """The kept weights (what predict uses) with their config, class names and data fingerprint."""
    from pipeline.checkpoint import load_checkpoint

    return load_checkpoint(member.dir / BEST_FILE)


def load_last(member: Member) -> dict[str, Any]:
    """The last epoch's weights as :func:`load_best` gives them: EMA weights when the run kept an EMA, the
    average once --average-last holds an epoch."""
    from pipeline.checkpoint import load_checkpoint

    state = load_checkpoint(member.dir / LAST_FILE)
    average = state.get("average") or {}
    ema = average.get("model") if average.get("epochs") else state.get("ema")
    if ema:  # an AveragedModel's state: the module's tensors under "module." and its step count
        state["model"] = {k[len("module."):]: v for k, v in ema.items() if k.startswith("module.")}
    return state
