"""A checked submission from a trained run, printed and indexed: `pipeline predict` and `train --predict`."""
from __future__ import annotations

import logging
from pathlib import Path

import typer

from pipeline import progress
from pipeline.cli.common import load_competition, print_json
from pipeline.errors import PipelineError
from pipeline.cli.peak import record_peak

log = logging.getLogger("pipeline")


def write_submission(competition: str, work_dir: Path, run_dir: Path, submission_csv: Path, *, members: str = "auto",
                     tta: str | None = None, device: str = "auto", force: bool = False, num_workers: int | None = None,
                     batch_size: int | None = None, unreadable: str = "error", tracked: bool = False,
                     as_json: bool = False, to_stderr: bool = False) -> None:
    """Predict the test set with the run's members, write the checked CSV, index it in submissions/, say so
    (on stdout; ``to_stderr`` where stdout already holds a command's JSON)."""
    from pipeline.predict.stage import predict as run

    with progress.stage(f"interrupted while predicting: {submission_csv} is written only when complete, so nothing "
                        "was written; run the same command again"):
        result = run(load_competition(competition), work_dir, run_dir, submission_csv, members=members, tta=tta,
                     device=device, force=force, num_workers=num_workers, batch_size=batch_size,
                     unreadable=unreadable)
    record_peak("predict", device, run_dir)
    indexed = submission_csv.resolve().parent.name == "submissions" and _index_submission(competition, result,
                                                                                          run_dir, result.tta)
    if tracked:
        from pipeline.train.tracking import track_outputs

        track_outputs(run_dir, [result.path], "submissions")
    if as_json:
        print_json({"path": str(result.path), "rows": result.rows, "members": result.members,
                    "seconds": round(result.seconds, 3),
                    "view_seconds": round(result.view_seconds, 3), "index": str(indexed) if indexed else None})
    else:
        typer.echo(f"{result.path}: {result.rows} rows from {len(result.members)} model(s) in {result.seconds:.1f}s",
                   err=to_stderr)
        if result.view_seconds > 0:
            typer.echo(f"tta {result.tta}: about {result.view_seconds:.1f}s of that went to the views beyond the "
                       "first (predicting time x the other views' share of the pixels)", err=to_stderr)


def _index_submission(competition: str, result, run_dir: Path, tta: str) -> Path | None:
    """One line in submissions/index.csv for every submission written there; the index, or None."""
    from pipeline.predict.submission_index import record_submission, run_summary

    index = result.path.resolve().parent / "index.csv"
    try:
        summary = run_summary(run_dir)
        record_submission(index, competition=competition, file=result.path.name, run_dir=str(run_dir),
                          model=summary["model"], cv_score=summary["cv_score"],
                          members=[Path(m).name for m in result.members], tta=tta)
    except PipelineError as exc:  # the submission itself is written; say what was not recorded
        log.warning("%s written, but not recorded in %s: %s", result.path, index, exc)
        return None
    return index
