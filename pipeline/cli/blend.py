"""`pipeline blend`: several CV runs into one submission; pipeline/cli/app.py registers it."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline import progress
from pipeline.cli.common import Json, handle_errors, load_competition, plain, print_json
from pipeline.errors import PipelineError


@handle_errors
def blend(
    run_dirs: Annotated[list[Path], typer.Argument(
        metavar="RUN_DIR", show_default=False,
        help="Two or more runs trained with --folds K on one work folder.")],
    out_csv: Annotated[Path, typer.Argument(metavar="OUT_CSV", show_default=False,
                                            help="The submission to write.")],
    work_dir: Annotated[Optional[Path], typer.Option(
        help="The reorg folder (default: the one the first run was trained on).")] = None,
    competition: Annotated[Optional[str], typer.Option(
        help="Slug or spec file (default: the first run's; give the spec file of a spec-file competition).")] = None,
    device: Annotated[str, typer.Option(
        help="auto, cpu or cuda (for runs whose test set is predicted afresh).")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per inference batch.")] = 256,
    num_workers: Annotated[Optional[int], typer.Option(
        help="DataLoader worker processes (default: from the CPU count and device).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite OUT_CSV and its .blend.json.")] = False,
    as_json: Json = False,
) -> None:
    """Blend runs: weights fitted on their out-of-fold predictions, a checked submission of their test probabilities.

    The weights (non-negative, summing to 1) minimise the blend's out-of-fold
    log loss. The blended CV is nested (each fold weighted by the other
    folds); OUT_CSV's record OUT.blend.json holds the weights and scores.
    """
    from pipeline.predict.blend import blend as run, check_run_dirs, format_blend, run_origin

    if len(run_dirs) < 2:
        raise PipelineError(f"blend needs two or more RUN_DIRs before OUT_CSV, got {len(run_dirs)}")
    check_run_dirs(list(run_dirs))  # each a run folder, before any is read
    comp = load_competition(competition or run_origin(run_dirs[0])[0])
    with progress.stage(f"interrupted while blending: {out_csv} is written only when complete, so nothing "
                        "was written; run the same command again"):
        result = run(comp, run_dirs, out_csv, work_dir, force=force, device=device, batch_size=batch_size,
                     num_workers=num_workers)
    if result.path.resolve().parent.name == "submissions":  # as predict does: one line in submissions/index.csv
        _index_blend(comp.slug, result, run_dirs)
    if as_json:
        print_json(_strict({"path": str(result.path), "record": str(result.record_path), "rows": result.rows,
                            "seconds": round(result.seconds, 3), **result.record}))
        return
    typer.echo(format_blend(result.record))
    typer.echo(f"{result.path}: {result.rows} rows from {len(run_dirs)} runs in {result.seconds:.1f}s; "
               f"weights and scores in {result.record_path}")


def _index_blend(competition: str, result, run_dirs: list[Path]) -> None:
    from pipeline.predict.submission_index import record_submission

    index = result.path.resolve().parent / "index.csv"
    weights = ", ".join(f"{w:.2f}" for w in result.record["weights"])
    try:
        record_submission(index, competition=competition, file=result.path.name,
                          run_dir=";".join(str(d) for d in run_dirs), model=f"blend ({weights})",
                          cv_score=result.record["blended_cv"], members=len(run_dirs), tta="runs'")
    except PipelineError as exc:  # the submission itself is written; say what was not recorded
        logging.getLogger("pipeline").warning("%s written, but not recorded in %s: %s", result.path, index, exc)


def _strict(value):
    """NaN scores (an undefined AUC) as null, so --json prints strict JSON."""
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strict(v) for v in value]
    return plain(value)
