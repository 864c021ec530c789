"""`pipeline tune`: an Optuna search over the train settings, scored by CV; cli/app.py registers it."""
from __future__ import annotations

import inspect
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from pipeline.cli.common import Comp, Json, WorkDir, handle_errors, load_competition, plain, print_json, setting_option
from pipeline.config import cli_fields
from pipeline.errors import PipelineError

_OWN = ("competition", "work_dir", "study_dir", "trials", "space", "recipe", "as_json")


@handle_errors
def tune(**options: Any) -> None:
    """Search the train settings with Optuna; the objective is the CV of the competition's metric.

    Each trial trains every fold of folds.csv into STUDY_DIR/trial-NNN (an
    ordinary run); a trial whose running fold scores fall below the median of
    earlier trials is pruned. The study is STUDY_DIR/study.db: run the same
    command again to resume it (finished trials are kept), or from several
    processes at once. The options given stay fixed; the rest of the default
    space (by head and optimizer, see the README) or --space FILE is searched.
    The best settings are written to STUDY_DIR/best.toml, for
    `pipeline train ... --recipe STUDY_DIR/best.toml`.
    """
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise PipelineError("pipeline tune needs Optuna, which is not installed: "
                            "pip install kaggle-pipeline[optuna]") from None
    from pipeline.data.items import n_folds
    from pipeline.train.tune import base_config, search_space, tune as run

    own = {k: options.pop(k) for k in _OWN}
    comp = load_competition(own["competition"])
    if own["trials"] < 1:
        raise PipelineError(f"--trials must be >= 1, got {own['trials']}")
    base = base_config(comp, own["work_dir"], own["study_dir"], own["recipe"], options)
    if comp.spec_file:  # trials store the spec's path, as train's runs do
        base = replace(base, config=replace(base.config, competition=comp.spec_file))
    space = search_space(base, own["space"])
    result = run(base, own["study_dir"], own["trials"], space, n_folds(own["work_dir"]))
    if own["as_json"]:
        print_json({**result, "best": result["best"] and {**result["best"], "cv": plain(result["best"]["cv"])}})
        return
    typer.echo(f"{own['study_dir']}: {result['trials']} trials ({result['complete']} complete, "
               f"{result['pruned']} pruned)")
    best = result["best"]
    if best is None:
        typer.echo("no trial completed: no recipe written")
        return
    settings = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["params"].items())
    typer.echo(f"best: trial {best['trial']} CV {comp.metric} {best['cv']:.4f}: {settings}")
    typer.echo(f"  (picked as the best of {result['complete']} on these folds, so optimistic: judge it on "
               "new folds or the leaderboard)")
    typer.echo(f"{best['recipe']}: written; the best trial again: pipeline train {own['competition']} "
               f"{own['work_dir']} RUN_DIR --recipe {best['recipe']} --folds K {best['options']}".rstrip())


def _params() -> list[inspect.Parameter]:
    kw = inspect.Parameter.KEYWORD_ONLY
    fixed = [
        inspect.Parameter("competition", kw, annotation=Comp),
        inspect.Parameter("work_dir", kw, annotation=WorkDir),
        inspect.Parameter("study_dir", kw, annotation=Annotated[Path, typer.Argument(
            metavar="STUDY_DIR", help="The study (study.db), one run folder per trial and best.toml.")]),
        inspect.Parameter("trials", kw, annotation=Annotated[int, typer.Option(
            help="Finished trials (complete or pruned) the study should hold; a resumed study runs the rest.")]),
        inspect.Parameter("space", kw, default=None, annotation=Annotated[Optional[Path], typer.Option(
            help="A TOML file of the settings to search: name = {low = A, high = B, log = true} or "
                 "name = [choices] (default: the space for the head and optimizer).")]),
        inspect.Parameter("recipe", kw, default=None, annotation=Annotated[Optional[str], typer.Option(
            help="The base recipe: a named one or a recipe file; options override it.")]),
    ]
    train_options = [setting_option(f) for f in cli_fields() if f.name not in ("folds", "fold", "full")]
    return fixed + train_options + [inspect.Parameter("as_json", kw, default=False, annotation=Json)]


tune.__signature__ = inspect.Signature(_params())
