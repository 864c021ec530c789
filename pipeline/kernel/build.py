"""Offline Kaggle kernels: the kernel folder, its companion dataset, and the checks on both.

A kernel in a code competition has no internet, so everything it needs travels
in a private dataset attached to it: the pipeline's wheel, the wheels of the
dependencies Kaggle's image lacks, and the trained run's best checkpoints. The
kernel folder holds ``kernel-metadata.json`` and one self-contained script
that installs the wheel from that dataset and runs the stages as
subprocesses, writing ``submission.csv``.

Metadata and script text are built by pure functions; the writers only write.
Nothing here reads credentials: it refuses to package them.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pipeline.kernel import script as kernel_script_module
from pipeline.competition import Competition
from pipeline.config import check_setting, cli_fields, flag_of
from pipeline.errors import PipelineError
from pipeline.io import atomic_write_json, atomic_write_text
from pipeline.download.kaggle import CREDENTIALS_HELP, credentials_present, run_kaggle
from pipeline.kernel.dataset import (DATASET_METADATA_FILE, RUN_FOLDER, SECRET_VARIABLES, WEIGHTS_FOLDER,
                                     SLUG, WHEEL_PATTERN, check_folder, ref_problem, secret_values,
                                     validate_dataset_metadata)
from pipeline.runs import CONFIG_FILE

KERNEL_METADATA_FILE = "kernel-metadata.json"
CODE_FILE = "kernel.py"
DATASET_PLACEHOLDER = "{dataset}"  # replaced by the dataset's folder when the kernel runs
DEFAULT_DATASET_SLUG = "kaggle-pipeline"
SETTINGS_START = "# ---- settings: `pipeline kernel build` replaces this block with the kernel's values"
SETTINGS_END = "# ---- end of settings"

# The fields kernels_metadata.md and datasets_metadata.md of the kaggle client document.
KERNEL_FIELDS = frozenset({"id", "id_no", "title", "code_file", "language", "kernel_type", "is_private",
                           "enable_gpu", "enable_internet", "dataset_sources", "competition_sources",
                           "kernel_sources", "model_sources"})
LANGUAGES = ("python", "r", "rmarkdown")
KERNEL_TYPES = ("script", "notebook")


def slugify(title: str) -> str:
    """Kaggle's slug of a title: lower case, every run of other characters one '-'."""
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def kaggle_user(user: str | None = None, dataset: str | None = None) -> str:
    """The Kaggle user name: --user, else the --dataset owner, else $KAGGLE_USERNAME."""
    owner = dataset.split("/")[0] if dataset and "/" in dataset else None
    name = user or owner or os.environ.get("KAGGLE_USERNAME")
    if not name:
        raise PipelineError("no Kaggle user name to own the kernel and its dataset: pass --user USER or "
                            "--dataset USER/SLUG, or set KAGGLE_USERNAME")
    return name


def dataset_ref(dataset: str | None, user: str) -> str:
    """``owner/slug`` of the companion dataset; a bare slug gets ``user`` as its owner."""
    ref = dataset or DEFAULT_DATASET_SLUG
    if "/" not in ref:
        ref = f"{user}/{ref}"
    owner, _, slug = ref.partition("/")
    if not owner or not SLUG.fullmatch(slug):
        raise PipelineError(f"--dataset {dataset!r} is not USER/SLUG with a slug of lower-case letters, digits "
                            "and '-'; e.g. --dataset me/kaggle-pipeline")
    return ref


# ---------------------------------------------------------------- the kernel


@dataclass(frozen=True)
class KernelSpec:
    """What one kernel runs, on which competition, with which attached dataset."""

    competition: str  # the Kaggle slug, also the folder under KAGGLE_INPUT
    labels_file: str  # marks the competition's folder when its name differs
    user: str  # owner of the kernel
    dataset: str  # owner/slug of the dataset with the wheel and the run
    title: str
    train: bool = False  # reorg + train + predict; else predict with the dataset's run
    train_args: tuple[str, ...] = ()
    predict_args: tuple[str, ...] = ()
    gpu: bool = False
    spec_file: str = ""  # a spec-file competition: the spec's name in the dataset, which the commands name
    fold: int | None = None  # train only this fold of the run's --folds N; its output is gathered with the others'

    def __post_init__(self) -> None:
        if self.train_args and not self.train:
            raise PipelineError("--train-args needs --train (a predict-only kernel uses the dataset's run)")
        if "--force" in (*self.train_args, *self.predict_args):
            raise PipelineError("leave --force out of --train-args/--predict-args: the kernel passes it itself")
        check_train_args(self.train_args)
        if self.fold is not None:
            check_fold(self)


def check_fold(spec: KernelSpec) -> None:
    """A fold kernel trains fold K of the run that --train-args' ``--folds N`` describes (its reorg makes N folds)."""
    if not spec.train:
        raise PipelineError("--fold K needs --train: a fold kernel trains one fold of the run")
    if any(a.split("=")[0] in ("--fold", "--full") for a in spec.train_args):
        raise PipelineError("leave --fold/--full out of --train-args: give the run's --folds N there and the "
                            "kernel's fold as --fold K")
    folds = reorg_args(spec)
    if not folds or not folds[1].isdigit() or int(folds[1]) < 2:
        raise PipelineError("--fold K needs the run's fold count in --train-args, e.g. --train-args \"--folds 5 ...\" "
                            "(every fold kernel reorganises the data into the same folds)")
    if not 0 <= spec.fold < int(folds[1]):
        raise PipelineError(f"--fold {spec.fold} is not a fold of --folds {folds[1]}: give 0 to {int(folds[1]) - 1}")


def kernel_train_args(spec: KernelSpec) -> list[str]:
    """The `pipeline train` options the kernel runs: a fold kernel's ``--folds N`` becomes ``--fold K``."""
    if spec.fold is None:
        return list(spec.train_args)
    out, args = [], list(spec.train_args)
    while args:
        arg = args.pop(0)
        if arg == "--folds":
            args.pop(0)
        if arg == "--folds" or arg.startswith("--folds="):
            out += ["--fold", str(spec.fold)]
        else:
            out.append(arg)
    return out


def check_train_args(args: tuple[str, ...] | list[str]) -> None:
    """Each ``--flag VALUE`` of the kernel's train options checked as `pipeline train` checks it: here,
    not in the kernel an hour later. Options that are not settings (``--recipe``) are left to train."""
    fields = {flag_of(f): f for f in cli_fields()}
    i = 0
    while i < len(args):
        flag, eq, value = args[i].partition("=")
        f = fields.get(flag)
        i += 1
        if f is None or "bool" in str(f.type):  # a switch takes no value
            continue
        if not eq:
            value, i = (args[i], i + 1) if i < len(args) else (None, i)
        check_setting(f, _parsed(f, value), f"--train-args {flag}")


def _parsed(f, text: str | None):
    """A command-line value as `pipeline train` would parse it (text left as is when it is not a number)."""
    for kind, parse in (("int", int), ("float", float)):
        if kind in str(f.type).split(" | ")[0]:
            try:
                return parse(text)
            except (TypeError, ValueError):
                return text
    return text


def portable_train_args(args: list[str]) -> tuple[list[str], list[Path]]:
    """Training options as the kernel sees them: --weights FILE points into the dataset.

    Returns the rewritten options and the local files they named, which the
    dataset must carry (``pipeline kernel dataset --weights FILE``).
    """
    out, files = [], []
    for i, arg in enumerate(args):
        if arg.startswith("--weights="):
            files.append(Path(arg.split("=", 1)[1]))
            out.append(f"--weights={DATASET_PLACEHOLDER}/{WEIGHTS_FOLDER}/{files[-1].name}")
        elif i > 0 and args[i - 1] == "--weights":
            files.append(Path(arg))
            out.append(f"{DATASET_PLACEHOLDER}/{WEIGHTS_FOLDER}/{files[-1].name}")
        else:
            out.append(arg)
    return out, files


def reorg_args(spec: KernelSpec) -> list[str]:
    """Predict-only needs no folds; training gets the folds its --folds asks for."""
    if not spec.train:
        return ["--folds", "0"]
    args = spec.train_args
    for i, arg in enumerate(args):
        if arg == "--folds" and i + 1 < len(args):
            return ["--folds", args[i + 1]]
        if arg.startswith("--folds="):
            return ["--folds", arg.split("=", 1)[1]]
    return []


def kernel_metadata(spec: KernelSpec) -> dict:
    """kernel-metadata.json: a private script kernel, internet off, the competition and dataset attached."""
    return {
        "id": f"{spec.user}/{slugify(spec.title)}",
        "title": spec.title,
        "code_file": CODE_FILE,
        "language": "python",
        "kernel_type": "script",
        "is_private": True,
        "enable_gpu": spec.gpu,
        "enable_internet": False,
        "dataset_sources": [spec.dataset],
        "competition_sources": [spec.competition],
    }


def _is_bool(value: object) -> bool:
    return isinstance(value, bool) or value in ("true", "false")


def validate_kernel_metadata(meta: dict) -> list[str]:
    """Every way ``meta`` breaks the kaggle client's rules for kernel-metadata.json (empty: valid)."""
    problems = [f"unknown field {k!r}; the kaggle client reads {', '.join(sorted(KERNEL_FIELDS))}"
                for k in sorted(set(meta) - KERNEL_FIELDS)]
    title, ref = meta.get("title"), meta.get("id")
    if not isinstance(title, str) or not 5 <= len(title) <= 50:
        problems.append(f"title {title!r} must be 5 to 50 characters")
    if ref is None and meta.get("id_no") is None:
        problems.append("id (owner/kernel-slug) is missing")
    elif ref is not None:
        problems += filter(None, [ref_problem("id", ref, 5)])
        if isinstance(title, str) and str(ref).partition("/")[2] != slugify(title):
            problems.append(f"id {ref!r} does not match the title: Kaggle's slug of {title!r} is {slugify(title)!r}")
    if not meta.get("code_file"):
        problems.append("code_file (the kernel's source file) is missing")
    if meta.get("language") not in LANGUAGES:
        problems.append(f"language {meta.get('language')!r} is not one of: {', '.join(LANGUAGES)}")
    if meta.get("kernel_type") not in KERNEL_TYPES:
        problems.append(f"kernel_type {meta.get('kernel_type')!r} is not one of: {', '.join(KERNEL_TYPES)}")
    for key in ("is_private", "enable_gpu", "enable_internet"):
        if key in meta and not _is_bool(meta[key]):
            problems.append(f"{key} must be true or false, not {meta[key]!r}")
    for key in ("dataset_sources", "kernel_sources"):
        problems += filter(None, (ref_problem(key, ref, 1) for ref in meta.get(key, [])))
    for slug in meta.get("competition_sources", []):
        if not isinstance(slug, str) or not SLUG.fullmatch(slug):
            problems.append(f"competition_sources {slug!r} is not a competition slug")
    return problems


def kernel_script(spec: KernelSpec) -> str:
    """The kernel's Python source: pipeline/kernel/script.py with its settings block filled in."""
    settings = {
        "COMPETITION": spec.competition,
        "SPEC_FILE": spec.spec_file,
        "DATA_MARKER": spec.labels_file,
        "DATASET": spec.dataset,
        "WHEEL_PATTERN": WHEEL_PATTERN,
        "RUN_FOLDER": RUN_FOLDER,
        "RUN_MARKER": CONFIG_FILE,
        "DATASET_PLACEHOLDER": DATASET_PLACEHOLDER,
        "TRAIN": spec.train,
        "REORG_ARGS": reorg_args(spec),
        "TRAIN_ARGS": kernel_train_args(spec),
        "FOLD": spec.fold,
        "PREDICT_ARGS": list(spec.predict_args),
    }
    source = Path(kernel_script_module.__file__).read_text(encoding="utf-8")
    start, end = source.index(SETTINGS_START), source.index(SETTINGS_END)
    block = "".join(f"{name} = {value!r}\n" for name, value in settings.items())
    return source[:start] + SETTINGS_START + "\n" + block + source[end:]


def write_kernel(spec: KernelSpec, out_dir: Path, force: bool = False) -> Path:
    """Write the kernel folder for `kaggle kernels push -p OUT_DIR`; metadata and script are checked first."""
    out_dir = Path(out_dir)
    meta, script = kernel_metadata(spec), kernel_script(spec)
    problems = validate_kernel_metadata(meta)
    if problems:
        raise PipelineError(f"kernel metadata for {spec.competition}: {problems[0]}; pass another --title or --user")
    if any(secret in script for secret in secret_values()):
        raise PipelineError(f"refusing to write {out_dir / CODE_FILE}: its options hold the value of "
                            f"${'/$'.join(SECRET_VARIABLES)}; take it out of --train-args/--predict-args")
    if (out_dir / KERNEL_METADATA_FILE).exists() and not force:
        raise PipelineError(f"{out_dir / KERNEL_METADATA_FILE} already exists; pass --force to overwrite it")
    atomic_write_text(out_dir / CODE_FILE, script)
    atomic_write_json(out_dir / KERNEL_METADATA_FILE, meta)
    return out_dir


# ---------------------------------------------------------------- pushing


def _check_upload(folder: Path, metadata_file: str, comps: Iterable[Competition]) -> dict:
    """The folder's metadata, valid, and the folder free of credentials; Kaggle credentials present."""
    path = Path(folder) / metadata_file
    command = "build" if metadata_file == KERNEL_METADATA_FILE else "dataset"
    if not path.is_file():
        raise PipelineError(f"{path} not found; write the folder with `pipeline kernel {command} --out {folder}`")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise PipelineError(f"{path} is not readable JSON ({exc}); "
                            f"write it again with `pipeline kernel {command}`") from None
    validate = validate_kernel_metadata if command == "build" else validate_dataset_metadata
    problems = validate(meta)
    if command == "build" and meta.get("code_file") and not (Path(folder) / meta["code_file"]).is_file():
        problems.append(f"code_file {meta['code_file']!r} is not in {folder}")
    if problems:
        raise PipelineError(f"{path}: {problems[0]} ({len(problems)} problem(s)); fix it or build the folder again")
    check_folder(folder, comps)
    if not credentials_present():
        raise PipelineError(f"no Kaggle credentials found: {CREDENTIALS_HELP}")
    return meta


def push_kernel(folder: Path, comps: Iterable[Competition]) -> str:
    """Upload and run the kernel folder: `kaggle kernels push -p FOLDER`; the client's output."""
    _check_upload(folder, KERNEL_METADATA_FILE, comps)
    return run_kaggle(["kernels", "push", "-p", str(folder)])


def push_dataset(folder: Path, comps: Iterable[Competition], message: str | None = None) -> str:
    """Upload the dataset folder: a new dataset, or with ``message`` a new version of it.

    Sub-folders (the run) go up zipped (``--dir-mode zip``); Kaggle unpacks them,
    and the kernel unpacks an archive it finds still packed.
    """
    _check_upload(folder, DATASET_METADATA_FILE, comps)
    if message:
        return run_kaggle(["datasets", "version", "-p", str(folder), "-m", message, "--dir-mode", "zip"])
    return run_kaggle(["datasets", "create", "-p", str(folder), "--dir-mode", "zip"])
