"""What every command module of the CLI shares: error handling, argument types, competitions.

The command modules (cli, cli_train, cli_report, cli_kernel) import this
module and the package, never each other.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Callable

import typer

from pipeline.errors import PipelineError
from pipeline.runs import LAST_FILE

STATE = {"debug": False}
INTERRUPTED = f"interrupted; finished epochs are saved in {LAST_FILE}: continue with --resume"


def handle_errors(fn: Callable) -> Callable:
    """Turn PipelineError (and surprises) into one line on stderr and exit code 1."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt:
            typer.echo(INTERRUPTED, err=True)
            raise typer.Exit(130) from None
        except PipelineError as exc:
            if STATE["debug"]:
                raise
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        except Exception as exc:  # a bug: still one line, the traceback on request
            if STATE["debug"]:
                raise
            typer.echo(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", err=True)
            raise typer.Exit(1) from None
    return wrapper


def load_competition(slug: str):
    """The registered competition ``slug`` (the competitions package fills the registry)."""
    import competitions  # noqa: F401
    from pipeline.competition import get_competition

    return get_competition(slug)


def all_competitions() -> list:
    import competitions  # noqa: F401
    from pipeline.competition import list_competitions

    return list_competitions()


Comp = Annotated[str, typer.Argument(help="Kaggle slug, e.g. cifar-10; see `pipeline competitions`.")]
WorkDir = Annotated[Path, typer.Argument(help="Folder that reorg writes and train/predict read.")]
RunDir = Annotated[Path, typer.Argument(help="Folder of a training run (checkpoints, metrics).")]


def checked_submission(comp, submission_csv: Path, sample: Path | None, work_dir: Path | None):
    """Say the submission is valid and return its frame; else each problem on stderr and exit 1."""
    from pipeline.submission import check_submission_file

    frame, found = check_submission_file(comp, submission_csv, sample, work_dir)
    if found:
        for problem in found:
            typer.echo(f"{submission_csv}: {problem}", err=True)
        raise typer.Exit(1)
    unchecked = "" if work_dir is not None or comp.submission != "label" else \
        "; class names not checked: give --work-dir WORK_DIR to check them"
    typer.echo(f"{submission_csv}: valid ({len(frame)} rows, {len(frame.columns)} columns){unchecked}")
    return frame
