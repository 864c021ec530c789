"""submissions/index.csv: one line per submission file, never rewritten.

Each line says which run made which file, with what model, CV score, members
and TTA, so a leaderboard score can be traced back to its run. Lines are only
ever appended (one write each, under a lock), so an earlier record survives
every later one byte for byte.
"""
from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path


from pipeline.config import load_resolved
from pipeline.errors import PipelineError
from pipeline.io import exclusive_lock, os_error_message
from pipeline.runs import HOLDOUT, Member, Run

COLUMNS = ("time", "competition", "file", "run_dir", "model", "cv_score", "members", "tta")


def _csv_line(values: Sequence[str]) -> str:
    """One CSV line (quoted where a value needs it), ending in a newline."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(values)
    return buffer.getvalue()


def _score_text(cv_score: float | str | None) -> str:
    if cv_score is None or cv_score == "":
        return ""
    value = float(cv_score)
    return "" if math.isnan(value) else f"{value:.6g}"


def _members_text(members: int | str | Sequence[str]) -> str:
    if isinstance(members, (list, tuple)):
        return ";".join(str(m) for m in members)
    return str(members)


def record_submission(index_path: Path, *, competition: str, file: Path | str, run_dir: Path | str, model: str,
                      cv_score: float | str | None, members: int | str | Sequence[str], tta: str) -> None:
    """Append one line to the index, creating it with a header when missing.

    ``members`` may be a count, a name or a list of member folders (joined
    with ';'); a missing or NaN ``cv_score`` is written as an empty field.
    """
    index_path = Path(index_path)
    time = datetime.now(timezone.utc).isoformat(timespec="seconds")
    line = _csv_line([time, competition, str(file), str(run_dir), model, _score_text(cv_score),
                      _members_text(members), tta])
    lock = index_path.with_name(f".{index_path.name}.lock")
    with exclusive_lock(lock, what=f"the submission index {index_path}"):
        try:
            size = index_path.stat().st_size if index_path.exists() else 0
            if size == 0:
                line = _csv_line(COLUMNS) + line
            elif not _ends_with_newline(index_path):
                line = "\n" + line  # a hand-edited file without its last newline
            _append(index_path, line.encode("utf-8"), size)
        except OSError as exc:
            raise PipelineError(os_error_message(exc, index_path, "append to")) from exc


def _append(path: Path, data: bytes, size: int) -> None:
    """Append ``data`` to ``path`` (``size`` bytes long): all of it, or, when the disk is full, none."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except OSError:
        os.ftruncate(fd, size)  # the index as it was, not half a line longer
        raise
    finally:
        os.close(fd)


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as fh:
        fh.seek(-1, io.SEEK_END)
        return fh.read(1) == b"\n"


def run_summary(run_dir: Path) -> dict:
    """{"model", "cv_score"} of a run: the CV score of cv.json, else the best holdout score.

    The holdout score is the best validation score training recorded when the
    holdout member finished; cv_score is "" when neither exists (a --full run,
    or folds still training).
    """
    run = Run(run_dir)
    cfg, _ = load_resolved(run.config_path)
    cv = run.read_cv()
    if cv is not None and cv.get("cv") is not None:
        return {"model": cfg.model, "cv_score": float(cv["cv"])}
    return {"model": cfg.model, "cv_score": _best_holdout_score(run.member(HOLDOUT))}


def _best_holdout_score(member: Member) -> float | str:
    """The best validation score that training recorded for the holdout member ("" if none)."""
    try:
        metric = member.done()["best"]["metric"]
    except (PipelineError, KeyError, TypeError):
        return ""
    return "" if metric is None or math.isnan(metric) else float(metric)
