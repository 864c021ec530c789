"""`pipeline train` and `pipeline recipes`: the train options are generated from TrainConfig's fields.

A new setting is one field in pipeline/config.py: its flag, help and choices
reach this command from the field's metadata.
"""
from __future__ import annotations

import inspect
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from pipeline.cli.common import (Comp, Json, RunDir, WorkDir, handle_errors, load_competition, plain, print_json,
                                 setting_option)
from pipeline.config import cli_fields
from pipeline.errors import PipelineError
from pipeline.cli.peak import record_peak
from pipeline.runs import LAST_FILE

def _fixed_params() -> list[inspect.Parameter]:
    kw = inspect.Parameter.KEYWORD_ONLY
    opt = Optional[str]
    return [
        inspect.Parameter("competition", kw, annotation=Comp),
        inspect.Parameter("work_dir", kw, annotation=WorkDir),
        inspect.Parameter("run_dir", kw, annotation=RunDir),
        inspect.Parameter("recipe", kw, default=None, annotation=Annotated[opt, typer.Option(
            help="A named recipe of the competition (see `pipeline recipes`) or a recipe file (FILE.toml, "
                 "as `pipeline tune` writes); options override it.")]),
    ]


def _control_params() -> list[inspect.Parameter]:
    kw = inspect.Parameter.KEYWORD_ONLY
    return [
        inspect.Parameter("dry_run", kw, default=False, annotation=Annotated[bool, typer.Option(
            "--dry-run", help="Print the resolved settings and the source of each; train nothing.")]),
        inspect.Parameter("resume", kw, default=False, annotation=Annotated[bool, typer.Option(
            "--resume", help=f"Continue an interrupted run from {LAST_FILE} (epochs, early stop, workers may change).")]),
        inspect.Parameter("force", kw, default=False, annotation=Annotated[bool, typer.Option(
            "--force", help="Overwrite a finished run in RUN_DIR.")]),
        inspect.Parameter("track", kw, default="none", annotation=Annotated[str, typer.Option(
            metavar="none|mlflow", help="Log the run to MLflow (MLFLOW_TRACKING_URI, else RUN_DIR/mlflow): settings "
                                        "and their sources, per-epoch metrics, CV, summary. pip install "
                                        "kaggle-pipeline[mlflow].")]),
        inspect.Parameter("predict_csv", kw, default=None, annotation=Annotated[Optional[Path], typer.Option(
            "--predict", metavar="SUBMISSION_CSV", help="After training, predict the test set in this process and "
                                                        "write the checked submission (as `pipeline predict` with "
                                                        "the run's TTA; --force overwrites it).")]),
        inspect.Parameter("as_json", kw, default=False, annotation=Json),
    ]


def resolve_for_command(competition: str, work_dir: Path, run_dir: Path, recipe: str | None, resume: bool,
                        flags: dict[str, Any]):
    """The run's Resolved config: a fresh resolution, or on --resume the saved one with movable changes."""
    from pipeline.config import Resolved, load_resolved, resolve_config, resumed_config
    from pipeline.runs import Run

    comp = load_competition(competition)
    run = Run(run_dir)
    if resume and run.is_run():
        saved, doc = load_resolved(run.config_path)
        if recipe is not None and recipe != doc.get("recipe"):
            raise PipelineError(f"--recipe {recipe} differs from the run's {doc.get('recipe')}; "
                                "a resumed run keeps its settings: drop --recipe or train into a new RUN_DIR")
        cfg = resumed_config(saved, flags, work_dir, run_dir)
        given = {k: "flag" for k, v in flags.items() if v is not None}  # e.g. --epochs N: never re-adapted
        return Resolved(cfg, {**doc.get("sources", {}), **given}, tuple(doc.get("notes", ())), doc.get("recipe"))
    from pipeline.models import weights_data_config

    resolved = resolve_config(comp, work_dir, run_dir, recipe, flags, weights_config=weights_data_config)
    if comp.spec_file:  # the run stores the spec's path: later processes (report, kernel) load it from there
        resolved = replace(resolved, config=replace(resolved.config, competition=comp.spec_file),
                           sources={**resolved.sources, "competition": "spec file"})
    return resolved


@handle_errors
def train(**options: Any) -> None:
    """Train a model on the holdout split, on every CV fold, or on train_valid.

    Defaults shown are the schema's: the competition's recipe sets its own
    (`pipeline recipes COMPETITION` lists them; --dry-run shows every resolved
    value and where it came from). The run's summary goes to stderr and
    RUN_DIR/summary.txt; the results (and the CV table) to stdout.
    """
    from pipeline import distributed as dist
    from pipeline.io import undo_on_failure
    from pipeline.train import tracking
    from pipeline.train.parallel import others_files, owned_members
    from pipeline.train.stage import train as run

    fixed = {k: options.pop(k) for k in (*_CONTROL, "competition", "work_dir", "run_dir", "recipe")}
    resolved = resolve_for_command(fixed["competition"], fixed["work_dir"], fixed["run_dir"], fixed["recipe"],
                                   fixed["resume"], options)
    if fixed["dry_run"]:
        from pipeline.workdir import REORG_FILE

        if (Path(fixed["work_dir"]) / REORG_FILE).is_file():  # the plan as the members will run it
            from pipeline.train.stage import planned

            resolved = planned(resolved)
        typer.echo(json.dumps(resolved.to_json(), indent=2) if fixed["as_json"] else resolved.table())
        return
    tracked = tracking.wanted(fixed["track"])  # a missing MLflow is an error before anything trains
    out_csv = fixed["predict_csv"]
    if out_csv is not None and Path(out_csv).exists() and not fixed["force"]:  # refused before the compute
        raise PipelineError(f"{out_csv} already exists; pass --force to overwrite it or choose another name")
    dist.init(resolved.config.device)  # the backend follows the run's device: gloo for --device cpu
    main_process = dist.is_main()
    if not main_process:
        logging.getLogger("pipeline").setLevel(logging.WARNING)  # rank 0 speaks for all
    run_dir = resolved.config.run_dir
    try:
        owned = owned_members(resolved.config)  # other processes may be training the run's other members
        with undo_on_failure(run_dir, keep=lambda path: _keeps(run_dir, path) or others_files(run_dir, owned, path)):
            results = run(resolved, resume=fixed["resume"], force=fixed["force"])
    finally:
        dist.shutdown()
    if main_process and tracked:
        tracking.track_training(run_dir, [r.name for r in results if not r.skipped])
    if main_process:
        _print_results(load_competition(fixed["competition"]).metric, run_dir, results, fixed["as_json"])
        record_peak("train", resolved.config.device, run_dir)
    if main_process and out_csv is not None:  # the members just saved, reloaded as `pipeline predict` loads them
        from pipeline.cli.predicting import write_submission

        write_submission(fixed["competition"], fixed["work_dir"], run_dir, Path(out_csv),
                         device=resolved.config.device, force=fixed["force"], num_workers=resolved.config.num_workers,
                         tracked=tracked, to_stderr=fixed["as_json"])


_CONTROL = ("dry_run", "resume", "force", "as_json", "track", "predict_csv")


def _keeps(run_dir: Path, path: Path) -> bool:
    """Whether a file a failed train created stays: it belongs to a member with a saved epoch, or the
    run has such a member and the file is the run's own (its config, its summary)."""
    from pipeline.runs import Run

    started = {m.name for m in Run(run_dir).members() if m.is_started or m.best_path.is_file()}
    parts = path.relative_to(run_dir).parts
    return bool(parts) and (parts[0] in started or (len(parts) == 1 and bool(started) and path.is_file()))


def _print_results(metric: str, run_dir: Path, results: list, as_json: bool) -> None:
    """The members' results and the CV table on stdout (one JSON object with --json)."""
    from pipeline.predict.cv import format_cv_table
    from pipeline.runs import Run

    run = Run(run_dir)
    cv = run.read_cv() if run.cv_path.is_file() else None
    if as_json:
        print_json({"run_dir": str(run_dir), "metric": metric, "summary": str(run.summary_path),
                    "members": [{"name": r.name, "dir": str(r.dir), "epochs": r.epochs, "best_epoch": r.best_epoch,
                                 "best": plain(r.best_metric), "kept": plain(r.kept), "seconds": round(r.seconds, 3),
                                 "skipped": r.skipped} for r in results],
                    "cv": plain(cv["cv"]) if cv else None})
        return
    for r in results:
        typer.echo(result_line(r, metric))
    if cv is not None:
        typer.echo(format_cv_table(cv))


def result_line(r, metric: str) -> str:
    """What a member's kept weights scored on validation (with its interval), and its best epoch."""
    state = "already finished, " if r.skipped else ""
    kept = r.kept or {}
    if kept.get("metric") is None:
        return f"{r.dir}: {state}{r.epochs} epochs (no validation), {r.seconds:.1f}s"
    averaged = kept.get("averaged_epochs")  # --average-last: the kept weights are their average
    what = f"the average of epochs {averaged[0]}-{averaged[-1]}" if averaged else f"epoch {kept['epoch']}"
    line = f"{r.dir}: {state}{r.epochs} epochs; kept {what} ({kept['selection']}): {metric} {kept['metric']:.4f}"
    if kept.get("interval"):
        lo, hi = kept["interval"]
        line += f" (95% interval {lo:.4f}-{hi:.4f}, {kept['valid_images']} validation images)"
    return line + f"; best epoch {r.best_epoch}: {r.best_metric:.4f}; {r.seconds:.1f}s"


train.__signature__ = inspect.Signature(_fixed_params() + [setting_option(f) for f in cli_fields()] + _control_params())


@handle_errors
def lr_find(**options: Any) -> None:
    """The learning-rate range test: a few hundred steps at growing learning rates, a plot and a suggestion.

    The model, data and optimizer are those `pipeline train` would use with
    the same options (with --unfreeze-after: its first, frozen phase). Nothing
    is trained for keeps. Use the suggestion as --lr.
    """
    from pipeline.config import resolve_config
    from pipeline.train.lrfind import find_lr, plot_lr_find

    png, steps, start, end = (options.pop(k) for k in ("png", "steps", "start_lr", "end_lr"))
    as_json, recipe = options.pop("as_json"), options.pop("recipe")
    comp, work_dir = load_competition(options.pop("competition")), options.pop("work_dir")
    if png.suffix.lower() != ".png":
        raise PipelineError(f"{png}: the plot is a PNG; give a path ending in .png")
    from pipeline.models import weights_data_config

    resolved = resolve_config(comp, work_dir, png.parent, recipe, options, weights_config=weights_data_config)
    result = find_lr(resolved, steps=steps, start=start, end=end)
    plot_lr_find(result, png)
    if as_json:
        print_json({"png": str(png), **result.to_json()})
        return
    ended = "stopped when the loss blew up" if result.stopped_early else "all steps run"
    typer.echo(f"{png}: {len(result.lrs)} steps ({ended}); loss lowest at lr {result.minimum:.3g}, "
               f"falls fastest at {result.steepest:.3g}")
    typer.echo(f"suggested --lr {result.suggested:.3g}")


def _lr_find_params() -> list[inspect.Parameter]:
    kw = inspect.Parameter.KEYWORD_ONLY
    fixed = [p for p in _fixed_params() if p.name != "run_dir"]
    fixed.insert(2, inspect.Parameter("png", kw, annotation=Annotated[Path, typer.Argument(
        metavar="PNG", help="Where to write the plot.")]))
    own = [("steps", int, 100, "Optimizer steps of the test."), ("start_lr", float, 1e-7, "First learning rate."),
           ("end_lr", float, 10.0, "Last learning rate (the test stops earlier if the loss blows up).")]
    return fixed + [inspect.Parameter(name, kw, default=default, annotation=Annotated[kind, typer.Option(help=text)])
                    for name, kind, default, text in own] + \
        [setting_option(f) for f in cli_fields()] + [inspect.Parameter("as_json", kw, default=False, annotation=Json)]


lr_find.__signature__ = inspect.Signature(_lr_find_params())


@handle_errors
def recipes(competition: Annotated[Optional[str], typer.Argument(
        metavar="COMPETITION", show_default=False, help="A competition slug; default: every registered competition.")] = None) -> None:
    """Each competition's recipes: the default and the named ones, with the settings each sets."""
    from pipeline.cli.common import all_competitions

    comps = [load_competition(competition)] if competition else all_competitions()
    for comp in comps:
        typer.echo(f"{comp.slug}: image_size {comp.image_size}, mean {list(comp.mean)}, std {list(comp.std)}")
        for name, recipe in [("default", comp.recipe), *sorted(comp.recipes.items())]:
            settings = "  ".join(f"{k}={v}" for k, v in recipe.items())
            typer.echo(f"  {name:<10} {settings}")
