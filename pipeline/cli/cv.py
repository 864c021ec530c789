"""`pipeline cv RUN_DIR`: the out-of-fold score of a fold run, assembled on demand; cli/app.py registers it."""
from __future__ import annotations

from dataclasses import replace
from typing import Annotated, Optional

import typer

from pipeline.cli.common import Json, RunDir, handle_errors, load_competition, plain, print_json


@handle_errors
def cv(run_dir: RunDir,
       device: Annotated[Optional[str], typer.Option(help="auto, cpu or cuda (default: the run's).")] = None,
       force: Annotated[bool, typer.Option("--force", help="Assemble again even if the CV is current.")] = False,
       as_json: Json = False) -> None:
    """Assemble oof.csv and cv.json of a run whose folds were trained by separate processes.

    Training assembles them when its last fold finishes; this does it on demand
    (a fold trained elsewhere and copied in, an interrupted assembly). Nothing
    is recomputed while cv.json describes the folds' current weights.
    """
    from pipeline.config import load_resolved
    from pipeline.data.items import load_reorg
    from pipeline.predict.cv import assemble_cv, format_cv_table
    from pipeline.runs import Run

    cfg, _ = load_resolved(Run(run_dir).config_path)
    cfg = replace(cfg, device=device or cfg.device)
    comp = load_competition(cfg.competition)
    result = assemble_cv(cfg, comp, load_reorg(cfg.work_dir), force=force, required=True)
    if as_json:
        print_json({"run_dir": str(run_dir), "metric": result["metric"], "cv": plain(result["cv"]),
                    "interval": [plain(v) for v in result["interval"]], "folds": len(result["folds"])})
    else:
        typer.echo(format_cv_table(result))
