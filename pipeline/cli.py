"""The `pipeline` command line: one command per stage.

Each command parses its options, builds a config, calls one function of the
package and prints the outcome. A PipelineError becomes a one-line message and
exit code 1; ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from pipeline.errors import PipelineError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="From a Kaggle image-classification download to a checked submission CSV.")
log = logging.getLogger("pipeline")
_state = {"debug": False}


@app.callback()
def main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
         quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")] = False) -> None:
    _state["debug"] = debug
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s",
                        stream=sys.stderr, force=True)
    logging.getLogger("timm").setLevel(logging.WARNING)


def handle_errors(fn: Callable) -> Callable:
    """Turn PipelineError (and surprises) into one line on stderr and exit code 1."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt:
            typer.echo("interrupted; finished epochs are saved in last.pt: continue with --resume", err=True)
            raise typer.Exit(130) from None
        except PipelineError as exc:
            if _state["debug"]:
                raise
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        except Exception as exc:  # a bug: still one line, the traceback on request
            if _state["debug"]:
                raise
            typer.echo(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", err=True)
            raise typer.Exit(1) from None
    return wrapper


def _competition(slug: str):
    import competitions  # noqa: F401  (fills the registry)
    from pipeline.competition import get_competition

    return get_competition(slug)


Comp = Annotated[str, typer.Argument(help="Kaggle slug, e.g. cifar-10; see `pipeline competitions`.")]
WorkDir = Annotated[Path, typer.Argument(help="Folder that reorg writes and train/predict read.")]
RunDir = Annotated[Path, typer.Argument(help="Folder of a training run (checkpoints, metrics).")]


@app.command()
@handle_errors
def competitions() -> None:
    """List the known competitions with their Kaggle slug and metric."""
    import competitions as _  # noqa: F401
    from pipeline.competition import list_competitions

    for comp in list_competitions():
        kind = "class label" if comp.submission == "label" else "probability per class"
        typer.echo(f"{comp.slug:<28} {comp.metric:<9} {kind:<22} default model {comp.recipe.model}  {comp.title}")


@app.command()
@handle_errors
def download(competition: Comp,
             raw_dir: Annotated[Path, typer.Argument(help="Where to unzip the download.")]) -> None:
    """Fetch a competition's download into RAW_DIR (the kaggle CLI; the demo writes its own)."""
    from pipeline.kaggle import download as fetch

    comp = _competition(competition)
    fetch(comp, raw_dir)
    typer.echo(f"{comp.slug}: download ready in {raw_dir}")


@app.command()
@handle_errors
def reorg(competition: Comp,
          raw_dir: Annotated[Path, typer.Argument(help="The unzipped Kaggle download (never modified).")],
          work_dir: WorkDir,
          valid_ratio: Annotated[float, typer.Option(help="Share of each class held out in valid/.")] = 0.1,
          folds: Annotated[int, typer.Option(help="Stratified CV folds in folds.csv (0: none).")] = 5,
          seed: Annotated[int, typer.Option(help="Seed of the split and the folds.")] = 0,
          force: Annotated[bool, typer.Option(help="Rebuild even if the tree is up to date.")] = False) -> None:
    """Build train/ valid/ train_valid/ test/unknown/ class folders and folds.csv from a download."""
    from pipeline.reorg import reorg as run

    result = run(_competition(competition), raw_dir, work_dir, valid_ratio, folds, seed, force)
    c = result.info["counts"]
    state = "up to date" if result.skipped else f"written ({result.info['link_mode']})"
    typer.echo(f"{work_dir}: {state} in {result.seconds:.1f}s: train {c['train']}, valid {c['valid']}, "
               f"train_valid {c['train_valid']}, test {c['test']}, {len(result.info['classes'])} classes")


@app.command()
@handle_errors
def train(
    competition: Comp,
    work_dir: WorkDir,
    run_dir: RunDir,
    recipe: Annotated[Optional[str], typer.Option(help="A named recipe of the competition (e.g. cifar-10: fast, resnet18); options below override it.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Registered model or timm:<name>; default: the recipe's.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Training epochs.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per step (per process under torchrun).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate of the head (backbone: x --backbone-lr-scale).")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Side of the square input, pixels.")] = None,
    weights: Annotated[Optional[Path], typer.Option(help="Local weights (.safetensors/.pth/.pt) to start from, offline.")] = None,
    pretrained: Annotated[Optional[bool], typer.Option("--pretrained/--no-pretrained", help="Download ImageNet weights (timm hub / torchvision).")] = None,
    freeze_backbone: Annotated[Optional[bool], typer.Option("--freeze-backbone/--no-freeze-backbone", help="Train only a new head.")] = None,
    head: Annotated[Optional[str], typer.Option(help="New head: linear, or mlp (Linear-ReLU-Linear).")] = None,
    head_hidden: Annotated[Optional[int], typer.Option(help="Hidden width of the mlp head.")] = None,
    backbone_lr_scale: Annotated[Optional[float], typer.Option(help="Backbone lr = lr x this (fine-tuning).")] = None,
    drop_rate: Annotated[Optional[float], typer.Option(help="Dropout before the classifier.")] = None,
    optimizer: Annotated[Optional[str], typer.Option(help="sgd, adam or adamw.")] = None,
    momentum: Annotated[Optional[float], typer.Option(help="SGD momentum.")] = None,
    nesterov: Annotated[Optional[bool], typer.Option("--nesterov/--no-nesterov", help="Nesterov momentum (SGD).")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="Weight decay (not on norms and biases).")] = None,
    schedule: Annotated[Optional[str], typer.Option(help="step, cosine, onecycle or constant.")] = None,
    lr_period: Annotated[Optional[int], typer.Option(help="step schedule: decay every N epochs.")] = None,
    lr_decay: Annotated[Optional[float], typer.Option(help="step schedule: lr factor per period.")] = None,
    warmup_epochs: Annotated[Optional[float], typer.Option(help="Linear warm-up, epochs.")] = None,
    label_smoothing: Annotated[Optional[float], typer.Option(help="Label smoothing of the loss.")] = None,
    data_init: Annotated[Optional[bool], typer.Option("--data-init/--no-data-init", help="Initialise from training data where the model can (fastnet: whitened stem).")] = None,
    mixup: Annotated[Optional[float], typer.Option(help="Mixup Beta alpha (0: off).")] = None,
    cutmix: Annotated[Optional[float], typer.Option(help="CutMix Beta alpha (0: off).")] = None,
    clip_grad: Annotated[Optional[float], typer.Option(help="Max gradient norm (0: off).")] = None,
    ema: Annotated[Optional[float], typer.Option(help="EMA decay of the weights per step, e.g. 0.999 (0: off).")] = None,
    early_stop: Annotated[Optional[int], typer.Option(help="Stop after N epochs without improvement (0: off).")] = None,
    augment: Annotated[Optional[str], typer.Option(help="pad_crop_flip, resized_crop_flip_jitter or none.")] = None,
    folds: Annotated[Optional[int], typer.Option(help="Train every fold of folds.csv (give its fold count).")] = None,
    fold: Annotated[Optional[int], typer.Option(help="Train one fold of folds.csv.")] = None,
    full: Annotated[bool, typer.Option("--full", help="Train on train_valid, no validation (final retrain).")] = False,
    tta: Annotated[Optional[str], typer.Option(help="TTA for out-of-fold predictions: none or flip.")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu or cuda.")] = None,
    amp: Annotated[Optional[str], typer.Option(help="auto (bf16 on GPU), none, bf16 or fp16.")] = None,
    channels_last: Annotated[Optional[bool], typer.Option("--channels-last/--no-channels-last", help="channels_last on CUDA.")] = None,
    compile: Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="torch.compile the model.")] = None,
    num_workers: Annotated[Optional[int], typer.Option(help="DataLoader worker processes.")] = None,
    steps_per_epoch: Annotated[Optional[int], typer.Option(help="Cap batches per epoch (smoke tests).")] = None,
    strict: Annotated[Optional[bool], typer.Option("--strict/--no-strict", help="Unreadable training images are errors.")] = None,
    cache: Annotated[Optional[str], typer.Option(help="Decode images once into a uint8 array: auto (side <= 64), on, off.")] = None,
    feature_cache: Annotated[Optional[bool], typer.Option("--feature-cache/--no-feature-cache", help="With --freeze-backbone: train the head on cached features.")] = None,
    feature_views: Annotated[Optional[int], typer.Option(help="Augmented views per image in the feature cache (0: none).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of initialisation, shuffling and augmentation.")] = None,
    tensorboard: Annotated[Optional[bool], typer.Option("--tensorboard/--no-tensorboard", help="Log scalars for TensorBoard (pip install tensorboard).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from last.pt.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite a finished run in RUN_DIR.")] = False,
) -> None:
    """Train a model on the holdout split, on every CV fold, or on train_valid."""
    from pipeline import distributed as dist
    from pipeline.config import config_from_recipe, load_config
    from pipeline.train import train as run

    comp = _competition(competition)
    options = dict(locals())
    for key in ("competition", "work_dir", "run_dir", "comp", "resume", "force", "dist", "run",
                "config_from_recipe", "load_config", "recipe"):
        options.pop(key, None)
    options["lr_period_epochs"] = options.pop("lr_period")
    options["full"] = full or None
    if resume and (run_dir / "config.json").is_file():
        cfg = _resumed_config(load_config(run_dir), options, work_dir, run_dir)
    else:
        cfg = config_from_recipe(comp, work_dir, run_dir, recipe_name=recipe, **options)
    dist.init()
    main_process = dist.is_main()
    if not main_process:
        logging.getLogger("pipeline").setLevel(logging.WARNING)  # rank 0 speaks for all
    try:
        results = run(cfg, resume=resume, force=force)
    finally:
        dist.shutdown()
    if main_process:
        for r in results:
            typer.echo(f"{r.dir}: {r.epochs} epochs, best {comp.metric} {r.best_metric:.4f} "
                       f"at epoch {r.best_epoch}, {r.seconds:.1f}s")


def _resumed_config(saved, options: dict, work_dir: Path, run_dir: Path):
    """A resumed run keeps its saved settings; only where/how it runs may change.

    The folders are always the ones on the command line: a config.json that
    names others cannot move writes outside RUN_DIR.
    """
    from dataclasses import replace

    movable = {k: options[k] for k in ("device", "num_workers", "fold", "folds", "full") if options.get(k) is not None}
    if "full" in movable:
        movable["folds"], movable["fold"] = 0, None
    return replace(saved, work_dir=work_dir, run_dir=run_dir, **movable)


@app.command()
@handle_errors
def predict(
    competition: Comp,
    work_dir: WorkDir,
    run_dir: RunDir,
    submission_csv: Annotated[Path, typer.Argument(help="Where to write the submission.")],
    members: Annotated[str, typer.Option(help="auto, folds, full, holdout or all.")] = "auto",
    tta: Annotated[str, typer.Option(help="Test-time augmentation: none or flip.")] = "none",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per inference batch.")] = 256,
    num_workers: Annotated[int, typer.Option(help="DataLoader worker processes.")] = 0,
    unreadable_test: Annotated[str, typer.Option(help="A test image that cannot be decoded: error (default), or uniform (1/C for every class, with a warning).")] = "error",
    force: Annotated[bool, typer.Option("--force", help="Overwrite SUBMISSION_CSV if it exists.")] = False,
) -> None:
    """Softmax over the test set (members averaged) and a checked submission CSV."""
    from pipeline.predict import predict as run

    result = run(_competition(competition), work_dir, run_dir, submission_csv, members=members, tta=tta,
                 device=device, force=force, num_workers=num_workers, batch_size=batch_size,
                 unreadable=unreadable_test)
    typer.echo(f"{result.path}: {result.rows} rows from {len(result.members)} model(s) in {result.seconds:.1f}s")
    if submission_csv.resolve().parent.name == "submissions":
        _index_submission(competition, result, run_dir, tta)


def _index_submission(competition: str, result, run_dir: Path, tta: str) -> None:
    """One line in submissions/index.csv for every submission written there."""
    from pipeline.submission_index import record_submission, run_summary

    index = result.path.resolve().parent / "index.csv"
    try:
        summary = run_summary(run_dir)
        record_submission(index, competition=competition, file=result.path.name, run_dir=str(run_dir),
                          model=summary["model"], cv_score=summary["cv_score"],
                          members=[Path(m).name for m in result.members], tta=tta)
    except PipelineError as exc:  # the submission itself is written; say what was not recorded
        log.warning("%s written, but not recorded in %s: %s", result.path, index, exc)


@app.command()
@handle_errors
def check(
    competition: Comp,
    submission_csv: Annotated[Path, typer.Argument(help="The CSV to validate.")],
    sample: Annotated[Optional[Path], typer.Option(help="Sample submission (default: WORK_DIR's copy).")] = None,
    work_dir: Annotated[Optional[Path], typer.Option(help="A reorg folder: its sample and class names.")] = None,
) -> None:
    """Validate a submission CSV the way Kaggle would and name every problem."""
    from pipeline.data import load_reorg
    from pipeline.io import read_csv
    from pipeline.reorg import SAMPLE_FILE
    from pipeline.submission import check_submission

    comp = _competition(competition)
    if sample is None and work_dir is None:
        raise PipelineError("give --sample FILE (the competition's sample submission) or --work-dir DIR")
    sample_path = sample or work_dir / SAMPLE_FILE
    classes = load_reorg(work_dir)["classes"] if work_dir is not None else None
    frame = read_csv(submission_csv, what="submission")
    found = check_submission(comp, frame, read_csv(sample_path, what="sample submission"), classes)
    if found:
        for problem in found:
            typer.echo(f"{submission_csv}: {problem}", err=True)
        raise typer.Exit(1)
    typer.echo(f"{submission_csv}: valid ({len(frame)} rows, {len(frame.columns)} columns)")


def run() -> None:
    app()


# Commands that live in their own modules register themselves on `app`.
from pipeline import cli_report  # noqa: E402,F401
from pipeline.cli_kernel import kernel_app  # noqa: E402

app.add_typer(kernel_app, name="kernel")
