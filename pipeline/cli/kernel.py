"""`pipeline kernel ...`: package a run or the whole chain as an offline Kaggle kernel.

`build` writes the kernel folder, `dataset` the dataset it attaches (the
pipeline's wheel and the run), `push-dataset` and `push` upload them with the
kaggle client, `gather` joins fold kernels' outputs into one run. The logic
lives in pipeline/kernel/build.py and gather.py.
"""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.cli.common import (Comp, Json, RunDir, WorkDir, all_competitions, command, handle_errors,
                                 load_competition, plain, print_json, typer_app)
from pipeline.errors import PipelineError
from pipeline.runs import LAST_FILE

kernel_app = typer_app(help="Build, package and push offline Kaggle kernels.")

DatasetRef = Annotated[Optional[str], typer.Option(
    "--dataset", help="The companion dataset, USER/SLUG (default: USER/kaggle-pipeline).")]
User = Annotated[Optional[str], typer.Option(help="Kaggle user name (default: --dataset's owner, $KAGGLE_USERNAME).")]
Force = Annotated[bool, typer.Option("--force", help="Replace what an earlier run of this command wrote.")]


def _split(option: str, value: str) -> list[str]:
    try:
        return shlex.split(value)
    except ValueError as exc:
        raise PipelineError(f"{option} {value!r} does not parse as shell words ({exc}); check its quotes") from None


@command(kernel_app)
@handle_errors
def build(
    competition: Comp,
    out: Annotated[Path, typer.Option(help="The kernel folder to write (for `kaggle kernels push -p OUT`).")],
    run: Annotated[Optional[Path], typer.Option(help="The trained run the kernel predicts with (it travels in the dataset).")] = None,
    train: Annotated[bool, typer.Option("--train", help="Run reorg + train + predict in the kernel instead.")] = False,
    train_args: Annotated[str, typer.Option(help="`pipeline train` options for the kernel, e.g. \"--epochs 5\".")] = "",
    predict_args: Annotated[str, typer.Option(help="Options for `pipeline predict` in the kernel, e.g. \"--tta flip\".")] = "",
    gpu: Annotated[bool, typer.Option("--gpu/--no-gpu", help="Run the kernel on a GPU.")] = False,
    dataset: DatasetRef = None,
    user: User = None,
    title: Annotated[Optional[str], typer.Option(help="Kernel title, 5 to 50 characters (default: '<competition> pipeline'; "
                                                       "with --fold K, ' fold K' is added).")] = None,
    fold: Annotated[Optional[int], typer.Option(help="Train only fold K of the run --train-args' --folds N describes "
                                                     "(one kernel per fold; `kernel gather` joins their outputs).")] = None,
    kaggle_limit: Annotated[float, typer.Option(help="Hours a Kaggle kernel may run: a --run kernel whose predict "
                                                     "estimate passes it is warned about.", min=0)] = 9.0,
    safety: Annotated[float, typer.Option(help="Factor on the predict time measured here (Kaggle's P100/T4 are "
                                               "slower than most GPUs).", min=1)] = 2.0,
    force: Force = False,
) -> None:
    """Write a kernel folder: kernel-metadata.json and a script that writes submission.csv offline.

    With --train --fold K the kernel trains that fold only and outputs its run folder: build one kernel per
    fold (same --train-args, each its own --fold and --out), push them all, then gather their outputs into
    one run with `pipeline kernel gather` and predict from it here.
    """
    from pipeline.kernel.build import (KernelSpec, dataset_ref, kaggle_user, kernel_metadata, portable_train_args,
                                 write_kernel)
    from pipeline.kernel.dataset import SPEC_FILE, run_files

    comp = load_competition(competition)
    if run is not None and train:
        raise PipelineError("give --run RUN_DIR (predict with a trained run) or --train (train in the kernel), not both")
    if run is not None:
        run_files(run)  # a run with no trained model fails here, not on Kaggle
    args, weights = portable_train_args(_split("--train-args", train_args))
    owner = kaggle_user(user, dataset)
    title = (title or f"{comp.slug} pipeline") + (f" fold {fold}" if fold is not None else "")
    spec = KernelSpec(comp.slug, comp.labels_file or comp.sample_submission, owner, dataset_ref(dataset, owner),
                      title, train, tuple(args), tuple(_split("--predict-args", predict_args)),
                      gpu, SPEC_FILE if comp.spec_file else "", fold)
    write_kernel(spec, out, force)
    mode = "reorg + train + predict" if train else "reorg + predict with the dataset's run"
    mode = f"reorg + train fold {fold}" if fold is not None else mode
    typer.echo(f"{out}: kernel {kernel_metadata(spec)['id']} ({mode}), attaches {comp.slug} and {spec.dataset}")
    carry = f" --run {run}" if run else ""
    carry += "".join(f" --weights {w}" for w in weights)
    carry += f" --spec {competition}" if comp.spec_file else ""  # the kernel's commands name the carried spec
    typer.echo(f"next: pipeline kernel dataset --out DATASET_DIR --dataset {spec.dataset}{carry}; "
               f"pipeline kernel push-dataset DATASET_DIR; pipeline kernel push {out}")
    if run is not None:
        _predict_estimate(run, spec.predict_args, safety, kaggle_limit)
    if fold is not None:
        typer.echo(f"then, every fold kernel finished: pipeline kernel gather {competition} WORK_DIR RUN_DIR "
                   f"--kernel {kernel_metadata(spec)['id']} --kernel ... (one per fold)")


def _predict_estimate(run: Path, predict_args: tuple[str, ...], safety: float, limit_hours: float) -> None:
    """The kernel's predict time from the run's last predict here; one warning line past ``limit_hours``."""
    from pipeline.kernel.estimate import over_limit, run_estimate

    args = list(predict_args)
    tta = next((args[i + 1] for i, a in enumerate(args[:-1]) if a == "--tta"), None)
    tta = tta or next((a.split("=", 1)[1] for a in args if a.startswith("--tta=")), None)
    estimate = run_estimate(run, tta, safety)
    if estimate is None:
        typer.echo("predict estimate: none yet; run `pipeline predict` with this run once to measure it")
        return
    typer.echo(estimate.line())
    warning = over_limit(estimate, limit_hours)
    if warning:
        typer.echo(warning, err=True)


@command(kernel_app)
@handle_errors
def gather(
    competition: Comp,
    work_dir: WorkDir,
    run_dir: RunDir,
    folders: Annotated[Optional[list[Path]], typer.Argument(
        metavar="OUTPUT_DIR", show_default=False,
        help="A fold kernel's output, downloaded (`kaggle kernels output USER/KERNEL -p DIR`) or copied.")] = None,
    kernel: Annotated[Optional[list[str]], typer.Option(
        metavar="USER/KERNEL", help="A fold kernel whose output to download with the kaggle client (repeatable).")] = None,
    device: Annotated[str, typer.Option(metavar="auto|cpu|cuda", help="Where the out-of-fold predictions run.")] = "auto",
    force: Force = False,
    as_json: Json = False,
) -> None:
    """Join fold kernels' outputs into RUN_DIR: copy their folds, check they make one run, assemble the CV.

    WORK_DIR is this machine's reorg of the same download with the kernels' --folds; every fold must have
    validated on its fold of WORK_DIR/folds.csv and share the other folds' settings. Once every fold is
    there the CV is assembled and `pipeline predict COMPETITION WORK_DIR RUN_DIR OUT.csv` works as on a run
    trained here; until then the missing folds are named.
    """
    from pipeline.kernel.gather import download_outputs, gather as gather_folds
    from pipeline.predict.cv import format_cv_table

    comp = load_competition(competition)
    with download_outputs(kernel or [], run_dir) as downloaded:
        done = gather_folds(comp, comp.spec_file or comp.slug, work_dir, run_dir, [*(folders or []), *downloaded],
                            device, force)
    if as_json:
        print_json({"run_dir": str(run_dir), "gathered": done.members, "missing": done.missing,
                    "cv": plain(done.cv["cv"]) if done.cv else None})
        return
    typer.echo(f"{run_dir}: gathered {', '.join(done.members)}")
    if done.cv is not None:
        typer.echo(format_cv_table(done.cv))
    else:
        typer.echo(f"no CV yet: {', '.join(done.missing)} missing; gather their kernels' outputs too")


@command(kernel_app, name="dataset")
@handle_errors
def dataset_(
    out: Annotated[Path, typer.Option(help="The dataset folder to write (for `kaggle datasets create -p OUT`).")],
    run: Annotated[Optional[Path], typer.Option(help="The trained run to carry (best checkpoints and configs).")] = None,
    dataset: DatasetRef = None,
    user: User = None,
    title: Annotated[Optional[str], typer.Option(help="Dataset title, 6 to 50 characters (default: its slug).")] = None,
    wheels: Annotated[bool, typer.Option("--wheels/--no-wheels",
                                         help="Add wheels of the dependencies Kaggle's image lacks (needs PyPI).")] = False,
    weights: Annotated[Optional[list[Path]], typer.Option(help="A weights file a --train kernel starts from (repeatable).")] = None,
    with_last: Annotated[bool, typer.Option("--with-last", help=f"Also {LAST_FILE} (optimizer state, large).")] = False,
    spec: Annotated[Optional[Path], typer.Option(help="The competition spec file the kernel names (default: the one "
                                                      "--run was trained on, if any).")] = None,
    force: Force = False,
) -> None:
    """Write the dataset a kernel attaches: the pipeline's wheel, the run's checkpoints, a spec file, metadata."""
    from pipeline.kernel.build import dataset_ref, kaggle_user
    from pipeline.kernel.dataset import plan_dataset, run_spec, write_dataset

    ref = dataset_ref(dataset, kaggle_user(user, dataset))
    if spec is None and run is not None:
        spec = run_spec(run)
    plan = plan_dataset(ref, title or ref.split("/")[1], run, weights or [], with_last, wheels, spec)
    files = write_dataset(plan, out, all_competitions(), force)
    megabytes = sum((out / f).stat().st_size for f in files) / 1e6
    typer.echo(f"{out}: dataset {ref}, {len(files)} files, {megabytes:.1f} MB: {', '.join(map(str, files))}")


@command(kernel_app)
@handle_errors
def push(kernel_dir: Annotated[Path, typer.Argument(metavar="KERNEL_DIR", help="A folder written by `pipeline kernel build`.")]) -> None:
    """Upload and run a kernel folder (`kaggle kernels push -p DIR`)."""
    from pipeline.kernel.build import push_kernel

    typer.echo(push_kernel(kernel_dir, all_competitions()).strip())


@command(kernel_app, name="push-dataset")
@handle_errors
def push_dataset(
    dataset_dir: Annotated[Path, typer.Argument(metavar="DATASET_DIR", help="A folder written by `pipeline kernel dataset`.")],
    message: Annotated[Optional[str], typer.Option(help="Upload as a new version of the existing dataset, with these notes.")] = None,
) -> None:
    """Upload a dataset folder: `kaggle datasets create`, or `datasets version -m MESSAGE`."""
    from pipeline.kernel.build import push_dataset as upload

    typer.echo(upload(dataset_dir, all_competitions(), message).strip())
