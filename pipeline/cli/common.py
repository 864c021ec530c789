"""What every command module of the CLI shares: error handling, argument types, help and output.

The command modules (cli, cli_train, cli_report, cli_kernel) import this
module and the package, never each other. Results go to stdout (one JSON
object with ``--json``), logs, progress and errors to stderr. Help is plain
text (no Rich boxes) that reads at 80 columns, and a usage error is one line
plus the usage. This module imports neither torch nor pandas: ``pipeline
--help`` and ``pipeline check`` start fast.
"""
from __future__ import annotations

import functools
import inspect
import json
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from typer.core import TyperCommand, TyperGroup

from pipeline import progress
from pipeline.cli.coerce import make_plain
from pipeline.errors import PipelineError
from pipeline.io import disk_error, os_error_message

try:  # typer >= 0.29 carries its own copy of click
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - older typer runs on click itself
    from click import exceptions as click_errors

STATE = {"debug": False}
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class Command(TyperCommand):
    """A command whose usage line names its arguments plainly: COMPETITION, not {COMPETITION}, and whose plain
    values are converted without pydantic (pipeline/cli/coerce.py: it would cost a light command a third of
    its time)."""

    def get_params(self, ctx) -> list:
        return make_plain(super().get_params(ctx))

    def collect_usage_pieces(self, ctx) -> list[str]:
        return [re.sub(r"^\{(.*)\}", r"\1", piece) for piece in super().collect_usage_pieces(ctx)]

    def format_options(self, ctx, formatter) -> None:
        """Arguments by name alone (their names say what they are), then the options."""
        records = [(p.param_type_name, p.get_help_record(ctx)) for p in self.get_params(ctx)]
        args = [(re.sub(r" <[^>]*>$", "", r[0]), r[1]) for kind, r in records if r and kind == "argument"]
        for title, rows in (("Arguments", args), ("Options", [r for kind, r in records if r and kind == "option"])):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


class Group(TyperGroup):
    """The app: a usage error is one line naming the problem, then the usage; exit code 2."""

    def get_params(self, ctx) -> list:
        return make_plain(super().get_params(ctx))  # --debug, --quiet, --help

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except click_errors.UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # `pipeline` alone: the help, as click shows it
                exc.show()
                sys.exit(exc.exit_code)
            usage = exc.ctx.get_usage().replace("Usage: ", "usage: ", 1) if exc.ctx is not None else ""
            typer.echo(f"error: {exc.format_message()}", err=True)
            typer.echo(f"{usage}  (--help for more)" if usage else "", err=True)
            sys.exit(exc.exit_code)
        except click_errors.ClickException as exc:
            typer.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except (typer.Abort, EOFError):
            typer.echo("aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def typer_app(**kwargs: Any) -> typer.Typer:
    """A Typer app with plain help and one-line usage errors; commands via :func:`command`."""
    return typer.Typer(cls=Group, rich_markup_mode=None, context_settings=CONTEXT, no_args_is_help=True,
                       pretty_exceptions_enable=False, add_completion=False, **kwargs)


def command(app: typer.Typer, fn: Callable | None = None, **kwargs: Any):
    """Register ``fn`` on ``app`` as a plain-usage command (or return the decorator)."""
    register = app.command(cls=Command, context_settings=CONTEXT, **kwargs)
    return register if fn is None else register(fn)


def handle_errors(fn: Callable) -> Callable:
    """Turn PipelineError (and surprises) into one line on stderr and exit code 1.

    Ctrl-C, SIGTERM and SIGHUP say what the interrupted stage saved and exit
    with 128 + the signal's number (see :func:`pipeline.progress.raising`).
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with progress.raising():
                return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt as exc:  # what the interrupted stage saved
            typer.echo(progress.stopped_by(exc) + progress.interrupted_message(), err=True)
            raise typer.Exit(progress.exit_status(exc)) from None
        except PipelineError as exc:
            if STATE["debug"]:
                raise
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        except Exception as exc:  # a bug: still one line, the traceback on request
            if STATE["debug"]:
                raise
            disk = disk_error(exc)  # a writer not yet on io's atomic path: still the disk's one line
            typer.echo(f"error: {os_error_message(disk, Path(disk.filename or 'a file'), 'write')}" if disk else
                       f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", err=True)
            raise typer.Exit(1) from None
    return wrapper


def check_current_folder() -> None:
    """Every command resolves relative paths against the current folder: a removed one is one line, exit 1."""
    import os

    try:
        os.getcwd()
    except FileNotFoundError:
        typer.echo("error: the current folder no longer exists; cd into an existing folder", err=True)
        raise typer.Exit(1) from None


def print_json(result: dict) -> None:
    """The command's one machine-readable result object, on stdout."""
    typer.echo(json.dumps(result, default=str, allow_nan=False))


def plain(value: Any) -> Any:
    """NaN and infinities as None, so the JSON output is strict JSON."""
    return value if not isinstance(value, float) or value == value and abs(value) != float("inf") else None


def load_competition(name: str):
    """The registered competition ``name``, or the spec file at path ``name`` (registered by loading it)."""
    import competitions  # noqa: F401  (fills the registry)
    from pipeline.competition import get_competition
    from pipeline.download.specfile import load_spec, looks_like_spec

    return load_spec(name) if looks_like_spec(name) else get_competition(name)


def all_competitions() -> list:
    import competitions  # noqa: F401
    from pipeline.competition import list_competitions

    return list_competitions()


Comp = Annotated[str, typer.Argument(metavar="COMPETITION", show_default=False,
                                     help="Kaggle slug, e.g. cifar-10 (see `pipeline competitions`), or a spec file "
                                          "(`pipeline init`).")]
WorkDir = Annotated[Path, typer.Argument(metavar="WORK_DIR", help="Folder that reorg writes and train/predict read.")]
RunDir = Annotated[Path, typer.Argument(metavar="RUN_DIR", help="Folder of a training run (checkpoints, metrics).")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object with the result on stdout.")]


def checked_submission(comp, submission_csv: Path, sample: Path | None, work_dir: Path | None,
                       as_json: bool = False):
    """Say the submission is valid and return its frame; else each problem on stderr and exit 1."""
    from pipeline.predict.submission import check_submission_file, submission_warnings

    frame, found = check_submission_file(comp, submission_csv, sample, work_dir)
    warned = submission_warnings(comp, frame) if not found else []
    for warning in warned:
        typer.echo(f"{submission_csv}: warning: {warning}", err=True)
    if as_json:
        print_json({"path": str(submission_csv), "valid": not found, "rows": len(frame),
                    "columns": len(frame.columns), "problems": list(found), "warnings": warned})
    if found:
        for problem in found:
            typer.echo(f"{submission_csv}: {problem}", err=True)
        raise typer.Exit(1)
    if not as_json:
        unchecked = "" if work_dir is not None or comp.submission != "label" else \
            "; class names not checked: give --work-dir WORK_DIR to check them"
        typer.echo(f"{submission_csv}: valid ({len(frame)} rows, {len(frame.columns)} columns){unchecked}")
    return frame


_TYPES = {"bool": bool, "int": int, "float": float, "str": str, "Path": Path}


MAX_METAVAR_LINE = 60  # flag and its choices on one help line of 80 columns, indented


def setting_option(f) -> inspect.Parameter:  # f: a pipeline.config.TrainConfig field
    """A Typer option for one schema field: None when not given, so a recipe's value stays.

    The help shows the schema's default; the competition's recipe may set
    another (`pipeline recipes`, `--dry-run`).
    """
    from pipeline.config import flag_of

    base = _TYPES[str(f.type).split("|")[0].strip()]
    if str(f.type) == "int | str":  # a number or a word (--batch-size auto): parsed by _int_or_word
        return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
            Optional[str], typer.Option(flag_of(f), help=f.metadata["help"] + _default_text(f.default),
                                        show_default=False, metavar="N|auto", callback=_int_or_word)])
    flag = flag_of(f)
    choices = f.metadata.get("choices")
    help_text = f.metadata["help"] + _default_text(f.default)
    decls = [f"{flag}/--no-{flag[2:]}"] if base is bool else [flag]
    metavar = "|".join(choices) if choices else None
    if metavar and len(flag) + len(metavar) > MAX_METAVAR_LINE:  # too long for an 80-column help: list them below
        metavar = "<choice>"
        help_text = f.metadata["help"] + f" One of: {', '.join(choices)}." + _default_text(f.default)
    annotation = Annotated[Optional[base], typer.Option(*decls, help=help_text, show_default=False, metavar=metavar)]
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)


def _int_or_word(value: str | None) -> int | str | None:
    """"128" -> 128; a word stays a word (the config checks which words it takes)."""
    return int(value) if value is not None and value.strip().lstrip("-").isdigit() else value


def _default_text(default: Any) -> str:
    if default is None or default == "":
        return ""
    shown = ("on" if default else "off") if isinstance(default, bool) else default
    return f"  [default: {shown}]"
