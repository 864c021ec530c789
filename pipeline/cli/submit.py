"""`pipeline submit`: a submission checked like `pipeline check`, then uploaded with the kaggle CLI."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.cli.common import Comp, checked_submission, handle_errors, load_competition


@handle_errors
def submit(
    competition: Comp,
    submission_csv: Annotated[Path, typer.Argument(metavar="SUBMISSION_CSV", help="The CSV to check and upload.")],
    message: Annotated[str, typer.Option("--message", "-m", help="Submission description shown on Kaggle.")],
    work_dir: Annotated[Optional[Path], typer.Option(help="A reorg folder: its sample and class names.")] = None,
    sample: Annotated[Optional[Path], typer.Option(help="Sample submission (default: WORK_DIR's copy).")] = None,
) -> None:
    """Check a submission CSV like `pipeline check`, then upload it with the kaggle CLI."""
    from pipeline.download.kaggle import run_kaggle

    comp = load_competition(competition)
    checked_submission(comp, submission_csv, sample, work_dir)
    output = run_kaggle(["competitions", "submit", "-c", comp.slug, "-f", str(submission_csv), "-m", message])
    last = output.strip().splitlines()
    typer.echo(f"{submission_csv}: submitted to {comp.slug}" + (f" ({last[-1]})" if last else ""))
