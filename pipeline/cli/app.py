"""The `pipeline` command line: one command per stage.

Each command parses its options, builds a config, calls one function of the
package and prints the outcome. A PipelineError becomes a one-line message and
exit code 1; ``--debug`` shows the traceback instead. The commands live in
app.py (the stages), train.py, report.py, submit.py, blend.py and kernel.py; this module puts them
on one app, and they share only pipeline/cli/common.py.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline import progress

from pipeline.cli import blend as cli_blend
from pipeline.cli import cv as cli_cv

from pipeline.cli import kernel as cli_kernel

from pipeline.cli import report as cli_report
from pipeline.cli import runs as cli_runs
from pipeline.cli import submit as cli_submit

from pipeline.cli import train as cli_train
from pipeline.cli import tune as cli_tune
from pipeline.cli.common import (STATE, Comp, Json, RunDir, WorkDir, all_competitions, check_current_folder,
                                 checked_submission, command, handle_errors, load_competition, typer_app)
from pipeline.train.summary import collect_warnings

app = typer_app(help="From a Kaggle image-classification download to a checked submission CSV. "
                     "Results go to stdout, logs and progress to stderr.")
log = logging.getLogger("pipeline")


@app.callback()
def main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
         quiet: Annotated[bool, typer.Option("--quiet", "-q",
                                             help="Only warnings and results: no progress, no logs.")] = False) -> None:
    STATE["debug"] = debug
    check_current_folder()
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s",
                        stream=sys.stderr, force=True)
    logging.getLogger("timm").setLevel(logging.WARNING)
    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)  # log axes' font fallback is harmless
    progress.configure(quiet=quiet)
    progress.reset()
    collect_warnings()  # the run summary lists every warning of the command


@command(app)
@handle_errors
def competitions(folders: Annotated[Optional[list[Path]], typer.Argument(
        metavar="DIR", show_default=False,
        help="Folders to search for spec files (*.toml); default: the current folder.")] = None) -> None:
    """List the registered competitions and the spec files in DIR... (default: the current folder).

    Each line: slug, metric, submission kind, default model, then where it comes from; a spec file
    that does not load is listed with the reason.
    """
    from pipeline.download.specfile import find_specs

    kinds = {"label": "class label", "probs": "probability per class", "binary": "probability of positive"}

    def line(comp, where: str) -> str:
        return (f"{comp.slug:<28} {comp.metric:<9} {kinds[comp.submission]:<23} "
                f"default model {comp.recipe.model or '-':<12} {where}")

    for comp in all_competitions():
        if not comp.spec_file:  # a spec loaded earlier in this process is listed below, from its file
            typer.echo(line(comp, f"registered: {comp.title}"))
    searched = folders or [Path(".")]
    found = find_specs(searched)
    for spec in found:
        typer.echo(line(spec.competition, f"spec file {spec.path}") if spec.competition else
                   f"{spec.path}: spec file not loaded: {spec.problem}")
    where = ", ".join(map(str, searched))
    typer.echo(f"{len(found)} spec file(s) in {where}. Any command takes a spec file's path in place of a slug; "
               "`pipeline init RAW_DIR --out FILE` writes one from a download.")


@command(app)
@handle_errors
def init(raw_dir: Annotated[Path, typer.Argument(metavar="RAW_DIR", help="The unzipped Kaggle download.")],
         out: Annotated[Path, typer.Option("--out", help="The spec file to write (TOML).")],
         slug: Annotated[Optional[str], typer.Option(help="The competition's name (default: RAW_DIR's name); "
                                                          "the Kaggle slug if you will `pipeline submit`.")] = None,
         unpack: Annotated[bool, typer.Option("--unpack", help="First unpack RAW_DIR's archives in place "
                                                               "(once; never over existing files).")] = False,
         force: Annotated[bool, typer.Option("--force", help="Overwrite FILE if it exists.")] = False) -> None:
    """Inspect a download and write a competition spec file to read, edit and pass to every command."""
    from pipeline.download.spec_guess import init_spec

    result = init_spec(raw_dir, out, slug=slug, force=force, unpack=unpack)
    g = result.guess
    typer.echo(f"{result.path}: written")
    for name, why in g.why.items():
        typer.echo(f"  {name} = {g.fields[name]!r}: {why}")
    for note in g.notes:
        typer.echo(f"  note: {note}")
    for name, what in g.undecided.items():
        typer.echo(f"  not decided: {name} = {g.fields.get(name)!r} for now; set it to {what}")
    typer.echo(result.check)
    if "does not read" not in result.check:
        typer.echo(f"next: pipeline reorg {result.path} {raw_dir} WORK_DIR")


@command(app)
@handle_errors
def download(competition: Comp,
             raw_dir: Annotated[Path, typer.Argument(metavar="RAW_DIR", help="Where to unzip the download.")]) -> None:
    """Fetch a competition's download into RAW_DIR (the kaggle CLI; the demo writes its own)."""
    from pipeline.download.kaggle import download as fetch

    comp = load_competition(competition)
    fetch(comp, raw_dir)
    typer.echo(f"{comp.slug}: download ready in {raw_dir}")


def _targets(info: dict) -> str:
    """What the model predicts, counted: '10 classes', '17 labels', '5 grades of ...' or 'a number (...)'."""
    kind = info.get("task", "single")
    if kind == "regression":
        return f"a number ({info['classes'][0]})"
    if kind == "ordinal":
        return f"{len(info['grades'])} grades of {info['classes'][0]}"
    return f"{len(info['classes'])} {'labels' if kind == 'multilabel' else 'classes'}"


@command(app)
@handle_errors
def reorg(competition: Comp,
          raw_dir: Annotated[Path, typer.Argument(metavar="RAW_DIR", help="The unzipped Kaggle download (never modified).")],
          work_dir: WorkDir,
          valid_ratio: Annotated[float, typer.Option(help="Share of each class held out in valid/.")] = 0.1,
          folds: Annotated[int, typer.Option(help="Stratified CV folds in folds.csv (0: none).")] = 5,
          seed: Annotated[int, typer.Option(help="Seed of the split and the folds.")] = 0,
          force: Annotated[bool, typer.Option("--force", help="Rebuild even if the tree is up to date.")] = False) -> None:
    """Build train/ valid/ train_valid/ test/unknown/ class folders and folds.csv from a download."""
    from pipeline.download.reorg import reorg as run

    with progress.stage("interrupted during reorg; WORK_DIR is complete only once reorg.json is written: "
                        "run the same command again to finish it"):
        result = run(load_competition(competition), raw_dir, work_dir, valid_ratio, folds, seed, force)
    c = result.info["counts"]
    state = "up to date" if result.skipped else f"written ({result.info['link_mode']})"
    typer.echo(f"{work_dir}: {state} in {result.seconds:.1f}s: train {c['train']}, valid {c['valid']}, "
               f"train_valid {c['train_valid']}, test {c['test']}, {_targets(result.info)}")


@command(app)
@handle_errors
def predict(
    competition: Comp,
    work_dir: WorkDir,
    run_dir: RunDir,
    submission_csv: Annotated[Path, typer.Argument(metavar="SUBMISSION_CSV", help="Where to write the submission.")],
    members: Annotated[str, typer.Option(help="auto, folds, full, holdout or all.")] = "auto",
    tta: Annotated[Optional[str], typer.Option(help="Test-time views: a comma list of views or presets (none, flip, d4, multiscale, flipshift, rot90, scale1.15, flip+scale1.15, ...; default: the run's, which its scores used).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    batch_size: Annotated[Optional[int], typer.Option(help="Images per inference batch (default: from a memory budget, see pipeline/devices.py).", min=1)] = None,
    num_workers: Annotated[Optional[int], typer.Option(help="DataLoader worker processes (default: from the CPU count and device).")] = None,
    unreadable_test: Annotated[str, typer.Option(help="A test image that cannot be decoded: error (default), or uniform (1/C for every class, with a warning).")] = "error",
    force: Annotated[bool, typer.Option("--force", help="Overwrite SUBMISSION_CSV if it exists.")] = False,
    track: Annotated[str, typer.Option(metavar="none|mlflow", help="Add the submission to the run's MLflow run "
                                                                   "(see train --track).")] = "none",
    as_json: Json = False,
) -> None:
    """Softmax over the test set (members averaged) and a checked submission CSV."""
    from pipeline.cli.predicting import write_submission
    from pipeline.train.tracking import wanted

    write_submission(competition, work_dir, run_dir, submission_csv, members=members, tta=tta, device=device,
                     force=force, num_workers=num_workers, batch_size=batch_size, unreadable=unreadable_test,
                     tracked=wanted(track), as_json=as_json)


@command(app)
@handle_errors
def check(
    competition: Comp,
    submission_csv: Annotated[Path, typer.Argument(metavar="SUBMISSION_CSV", help="The CSV to validate.")],
    sample: Annotated[Optional[Path], typer.Option(help="Sample submission (default: WORK_DIR's copy).")] = None,
    work_dir: Annotated[Optional[Path], typer.Option(help="A reorg folder: its sample and class names.")] = None,
    as_json: Json = False,
) -> None:
    """Validate a submission CSV the way Kaggle would and name every problem.

    Probability submissions: rows whose sums are 1 up to rounding pass; Kaggle rescales every row by its
    sum, so other rows pass with a warning that states the tolerance; a row summing to 0 is refused.
    """
    checked_submission(load_competition(competition), submission_csv, sample, work_dir, as_json)


command(app, cli_train.train, name="train")
command(app, cli_train.recipes, name="recipes")
command(app, cli_train.lr_find, name="lr-find")
command(app, cli_report.predict_image, name="predict-image")
command(app, cli_submit.submit, name="submit")
command(app, cli_report.report, name="report")
command(app, cli_blend.blend, name="blend")
command(app, cli_cv.cv, name="cv")
command(app, cli_runs.runs, name="runs")
command(app, cli_tune.tune, name="tune")
app.add_typer(cli_kernel.kernel_app, name="kernel")


def run() -> None:
    app(prog_name="pipeline")
