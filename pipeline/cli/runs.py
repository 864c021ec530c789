"""`pipeline runs [DIR...]`: a table of every run under the folders; cli/app.py registers it.

Imports neither torch nor pandas: the table prints in well under a second.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.cli.common import Json, handle_errors, load_competition, print_json
from pipeline.errors import check_choice

SORTS = ("cv", "time", "name")


@handle_errors
def runs(folders: Annotated[Optional[list[Path]], typer.Argument(
             metavar="DIR", show_default=False, help="Folders holding runs (searched below); default: runs/.")] = None,
         sort: Annotated[str, typer.Option(metavar="cv|time|name", help="cv (each competition's runs, best first "
                                                                         "by its metric), time or name.")] = "name",
         index: Annotated[Optional[list[Path]], typer.Option(
             metavar="FILE", help="submissions/index.csv files to match submissions from (repeatable); "
                  "default: submissions/index.csv.")] = None,
         as_json: Json = False) -> None:
    """Every run under DIR...: competition, model, recipe, differing settings, members, CV, time, submissions."""
    from pipeline.report.runs_table import format_table, runs_table, sort_rows

    check_choice("--sort", sort, SORTS)
    metrics: dict[str, str] = {}

    def comp_metric(competition: str) -> str:
        if competition not in metrics:
            metrics[competition] = load_competition(competition).metric
        return metrics[competition]

    rows = sort_rows(runs_table(folders or [Path("runs")], index or [Path("submissions/index.csv")], comp_metric),
                     sort)
    if as_json:
        print_json({"runs": [r.to_json() for r in rows]})
    elif rows:
        typer.echo(format_table(rows))
    else:
        typer.echo(f"no runs under {', '.join(map(str, folders or [Path('runs')]))}")
