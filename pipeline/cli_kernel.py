"""`pipeline kernel ...`: package a run or the whole chain as an offline Kaggle kernel."""
import typer

kernel_app = typer.Typer(no_args_is_help=True, help="Build, package and push offline Kaggle kernels.")
