"""`pipeline runs`: one row per run found under some folders, to see what was tried and what won.

Each row: competition, model, recipe, the settings that differ between the
listed runs, members finished/planned, the CV score with its interval (else
the holdout's kept score), the training time, and the submissions made from
the run (submissions/index.csv). It reads the runs' small JSON and CSV files
with the standard library only: no torch, no pandas, so it answers in well
under a second.
"""
from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.metrics import check_metric
from pipeline.runs import DONE_FILE, FOLD, HOLDOUT, Member, Run, member_name

# not "settings" of a run: where it lives, what it trains on, which members (a column of their own)
_NOT_SETTINGS = {"competition", "work_dir", "run_dir", "model", "folds", "fold", "full", "num_workers", "device"}


@dataclass
class RunRow:
    dir: Path
    competition: str
    model: str
    recipe: str
    metric: str
    config: dict
    finished: int
    planned: int
    score: float | None  # the CV, else the holdout's kept score
    score_kind: str  # "cv" | "holdout" | ""
    interval: tuple[float, float] | None
    seconds: float
    submissions: list[str] = field(default_factory=list)
    differs: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"run_dir": str(self.dir), "competition": self.competition, "model": self.model,
                "recipe": self.recipe, "metric": self.metric, "settings": self.differs,
                "members_finished": self.finished, "members_planned": self.planned,
                "score": _finite(self.score), "score_kind": self.score_kind,
                "interval": [_finite(v) for v in self.interval] if self.interval else None,
                "seconds": round(self.seconds, 1), "submissions": self.submissions}


def find_runs(folders: list[Path]) -> list[Path]:
    """Every run folder (a RUN_DIR/config.json with its sources) under ``folders``, not looking inside runs."""
    found = []
    for folder in folders:
        if not Path(folder).is_dir():
            raise PipelineError(f"{folder} is not a folder; give folders that hold runs")
        for root, dirs, _ in os.walk(folder):
            if _is_run(Path(root)):
                found.append(Path(root))
                dirs[:] = []  # a run's members are not runs
            else:
                dirs.sort()
    return sorted(dict.fromkeys(found))


def _is_run(path: Path) -> bool:
    doc = _json(Run(path).config_path)
    return isinstance(doc, dict) and "sources" in doc and "config" in doc


def read_row(run_dir: Path, comp_metric) -> RunRow:
    """One run's row; ``comp_metric(competition) -> metric name`` (loaded once per competition)."""
    run = Run(run_dir)
    doc = _json(run.config_path)
    cfg = doc["config"]
    members = run.members()
    planned = {m.name for m in members} | set(_expected(cfg))
    finished = [m for m in members if m.is_finished]
    metric = comp_metric(cfg["competition"])
    cv = _json(run.cv_path)
    score, kind, interval = None, "", None
    if isinstance(cv, dict) and cv.get("cv") is not None:
        score, kind, interval = cv["cv"], "cv", tuple(cv.get("interval") or ()) or None
    elif (holdout := run.member(HOLDOUT)).is_finished:
        kept = (_json(holdout.dir / DONE_FILE) or {}).get("kept") or {}
        score, kind, interval = kept.get("metric"), "holdout", tuple(kept.get("interval") or ()) or None
    competition = cfg["competition"]
    return RunRow(run_dir, Path(competition).name if competition.endswith(".toml") else competition,
                  cfg.get("model", ""), doc.get("recipe") or "default", metric, cfg, len(finished), len(planned),
                  score, kind, interval, sum(_seconds(m) for m in members))


def _expected(cfg: dict) -> list[str]:
    """The members the run's last train command asked for (every fold of --folds N)."""
    if cfg.get("full"):
        return ["full"]
    if cfg.get("folds"):
        return [member_name(FOLD, k) for k in range(cfg["folds"])]
    if cfg.get("fold") is not None:
        return [member_name(FOLD, cfg["fold"])]
    return [HOLDOUT]


def _seconds(member: Member) -> float:
    """The member's training time: its epochs' seconds in metrics.csv."""
    try:
        with open(member.metrics_path, newline="", encoding="utf-8") as fh:
            return sum(float(row.get("seconds") or 0) for row in csv.DictReader(fh))
    except (OSError, ValueError):
        return 0.0


def _json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _finite(value):
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def submissions_by_run(indexes: list[Path]) -> dict[Path, list[str]]:
    """The submission files each run made, from submissions/index.csv files (run folders resolved)."""
    made: dict[Path, list[str]] = {}
    for index in indexes:
        if not index.is_file():
            continue
        with open(index, newline="", encoding="utf-8-sig") as fh:
            for row in csv.DictReader(fh):
                if row.get("run_dir") and row.get("file"):
                    run = Path(os.path.abspath(index.parent / row["run_dir"]))
                    made.setdefault(run, []).append(row["file"])
    return made


def runs_table(folders: list[Path], indexes: list[Path], comp_metric) -> list[RunRow]:
    """The rows of every run under ``folders``, with the settings that differ between them."""
    rows = [read_row(path, comp_metric) for path in find_runs(folders)]
    made = submissions_by_run(indexes)
    for row in rows:
        row.submissions = list(dict.fromkeys(made.get(Path(os.path.abspath(row.dir)), [])))
    keys = sorted({k for r in rows for k in r.config} - _NOT_SETTINGS)
    differing = [k for k in keys if len({json.dumps(r.config.get(k)) for r in rows}) > 1]
    for row in rows:
        row.differs = {k: row.config.get(k) for k in differing}
    return rows


def sort_rows(rows: list[RunRow], by: str) -> list[RunRow]:
    """``cv``: per competition, best score first under its metric's direction (no score last); ``time``,
    ``name``: by training time (longest first) or folder."""
    if by == "cv":
        def key(r: RunRow):
            if r.score is None or not math.isfinite(r.score):
                return (r.competition, 1, 0.0)
            return (r.competition, 0, -r.score if check_metric(r.metric).greater_is_better else r.score)
        return sorted(rows, key=key)
    if by == "time":
        return sorted(rows, key=lambda r: -r.seconds)
    return sorted(rows, key=lambda r: str(r.dir))


def format_table(rows: list[RunRow]) -> str:
    """Plain columns, one run a line; a run's differing settings as key=value at the end."""
    head = ("run", "competition", "model", "recipe", "members", "score", "95% interval", "time", "submissions",
            "settings")
    lines = [head]
    for r in rows:
        score = f"{r.metric} {r.score:.4f}" + (" (holdout)" if r.score_kind == "holdout" else "") \
            if r.score is not None else "-"
        interval = f"{r.interval[0]:.4f}-{r.interval[1]:.4f}" if r.interval and None not in r.interval else "-"
        settings = " ".join(f"{k}={_short(v)}" for k, v in r.differs.items())
        lines.append((str(r.dir), r.competition, r.model, r.recipe, f"{r.finished}/{r.planned}", score, interval,
                      _duration(r.seconds), ", ".join(r.submissions) or "-", settings))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) + "  " + line[-1] for line in lines).rstrip()


def _short(value) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) or value is None else str(value)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
