"""`pipeline report` and `pipeline predict-image`: pipeline/cli/app.py registers them."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.cli.common import RunDir, handle_errors
from pipeline.errors import PipelineError


@handle_errors
def predict_image(
    run_dir: RunDir,
    images: Annotated[list[Path], typer.Argument(metavar="IMAGE...", help="Image files (any format PIL reads).")],
    top_k: Annotated[int, typer.Option(help="How many classes to print per image.")] = 5,
    tta: Annotated[Optional[str], typer.Option(help="Test-time views: a comma list of views or presets, as predict --tta (default: the run's).")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Also save a PNG: each image beside its top-k bar chart, titled with its path.")] = None,
    members: Annotated[str, typer.Option(help="auto, folds, full, holdout or all.")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Top-k classes of image files with their probabilities, the run's members averaged."""
    from pipeline.report.build import decode_image, predict_images, save_figure
    from pipeline.report.figures import predictions_figure
    from pipeline.report.figures import top_k as ranked

    if top_k < 1:
        raise PipelineError(f"--top-k must be >= 1, got {top_k}")
    decoded = [decode_image(path) for path in images]  # every file readable before any model loads
    classes, probs = predict_images(run_dir, images, members, tta, device)
    width = max(len(c) for c in classes)
    for path, row in zip(images, probs):
        typer.echo(str(path))
        for name, p in ranked(row, classes, top_k):
            typer.echo(f"  {name:<{width}}  {p:.4f}")
    if plot is not None:  # each image beside its top-k bars, titled with its path
        entries = [(image, str(path), ranked(row, classes, top_k)) for image, path, row in zip(decoded, images, probs)]
        typer.echo(f"{save_figure(predictions_figure(entries), plot)}: written")


@handle_errors
def report(
    run_dir: RunDir,
    work_dir: Annotated[Optional[Path], typer.Option(help="The run's reorg folder (default: the one it was trained on).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Folder for report.html and its PNGs (default: RUN_DIR/report).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda (a holdout run is predicted afresh).")] = "auto",
    track: Annotated[str, typer.Option(metavar="none|mlflow", help="Add the report to the run's MLflow run "
                                                                   "(see train --track).")] = "none",
) -> None:
    """A run's report: report.html with what each member ran (settings after adaptation, head and how it was
    fitted, weights and data source, device), CV table, learning curves or the fitted head's C, confusions,
    training images and mistakes (classes a member never trained on marked)."""
    from pipeline.train.tracking import wanted
    from pipeline.config import load_resolved
    from pipeline.report.build import write_report
    from pipeline.runs import Run

    tracked = wanted(track)
    run = Run(run_dir)
    work_dir = work_dir if work_dir is not None else load_resolved(run.config_path)[0].work_dir
    folder = out if out is not None else run.report_dir
    for path in write_report(run_dir, work_dir, folder, device):
        typer.echo(str(path))
    if tracked:
        from pipeline.train.tracking import track_outputs

        track_outputs(run_dir, [folder], "report")
