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
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.competition import Competition
from pipeline.errors import PipelineError
from pipeline.io import atomic_write_json, atomic_write_text
from pipeline.kaggle import CREDENTIALS_HELP, credentials_present, run_kaggle

KERNEL_METADATA_FILE = "kernel-metadata.json"
DATASET_METADATA_FILE = "dataset-metadata.json"
CODE_FILE = "kernel.py"
RUN_FOLDER = "run"  # where the dataset carries the trained run
WEIGHTS_FOLDER = "weights"  # where it carries --weights files for training in the kernel
DATASET_PLACEHOLDER = "{dataset}"  # replaced by the dataset's folder when the kernel runs
DEFAULT_DATASET_SLUG = "kaggle-pipeline"
DISTRIBUTION = "kaggle-pipeline"
WHEEL_PATTERN = "kaggle_pipeline-*.whl"
# What Kaggle's Python image already has; the rest ships as wheels with --wheels.
KAGGLE_IMAGE = frozenset({"torch", "torchvision", "timm", "pandas", "scikit-learn", "albumentations",
                          "pillow", "matplotlib", "tqdm", "safetensors"})
SECRET_VARIABLES = ("KAGGLE_KEY", "KAGGLE_API_TOKEN")
# What predict needs from a run: per member, and once per run.
MEMBER_FILES = ("best.pt", "config.json", "done.json", "metrics.csv")
RUN_FILES = ("config.json", "cv.json")

# The fields kernels_metadata.md and datasets_metadata.md of the kaggle client document.
KERNEL_FIELDS = frozenset({"id", "id_no", "title", "code_file", "language", "kernel_type", "is_private",
                           "enable_gpu", "enable_internet", "dataset_sources", "competition_sources",
                           "kernel_sources", "model_sources"})
DATASET_FIELDS = frozenset({"title", "subtitle", "description", "id", "id_no", "licenses", "resources",
                            "keywords"})
LANGUAGES = ("python", "r", "rmarkdown")
KERNEL_TYPES = ("script", "notebook")
SLUG = re.compile(r"[a-z0-9]+(-[a-z0-9]+)*")


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

    def __post_init__(self) -> None:
        if self.train_args and not self.train:
            raise PipelineError("--train-args needs --train (a predict-only kernel uses the dataset's run)")
        if "--force" in (*self.train_args, *self.predict_args):
            raise PipelineError("leave --force out of --train-args/--predict-args: the kernel passes it itself")


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


def _ref_problem(where: str, ref: object, min_slug: int) -> str | None:
    """Why ``ref`` is not ``owner/slug`` (slug at least ``min_slug`` characters), or None."""
    owner, _, slug = str(ref).partition("/")
    if not isinstance(ref, str) or not owner or "/" in slug or not SLUG.fullmatch(slug):
        return f"{where} {ref!r} is not 'owner/slug' (slug: lower-case letters, digits and '-')"
    if not min_slug <= len(slug) <= 50:
        return f"{where} {ref!r}: the slug must be {min_slug} to 50 characters"
    return None


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
        problems += filter(None, [_ref_problem("id", ref, 5)])
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
        problems += filter(None, (_ref_problem(key, ref, 1) for ref in meta.get(key, [])))
    for slug in meta.get("competition_sources", []):
        if not isinstance(slug, str) or not SLUG.fullmatch(slug):
            problems.append(f"competition_sources {slug!r} is not a competition slug")
    return problems


SCRIPT_HEAD = '''"""Offline Kaggle kernel written by `pipeline kernel build`.

Installs the pipeline from the attached dataset (pip, no index), runs its
stages on the competition's data and writes submission.csv, checked.
KAGGLE_INPUT and KAGGLE_WORKING (default /kaggle/input, /kaggle/working) let
it run anywhere; PIPELINE_KERNEL_PIP_TARGET=DIR installs into DIR (put on
PYTHONPATH for the stages) instead of the environment, whose packages must then
already provide the dependencies.
"""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

# ---- settings written by `pipeline kernel build`
'''

SCRIPT_BODY = '''# ----

INPUT = Path(os.environ.get("KAGGLE_INPUT", "/kaggle/input"))
WORKING = Path(os.environ.get("KAGGLE_WORKING", "/kaggle/working"))
PIP_TARGET = os.environ.get("PIPELINE_KERNEL_PIP_TARGET")
START = time.monotonic()


def say(message):
    print(f"[kernel {time.monotonic() - START:6.1f}s] {message}", flush=True)


def fail(message):
    say(f"error: {message}")
    sys.exit(1)


def find_folder(name, marker):
    """INPUT/name when it holds `marker`, else the shallowest folder below INPUT that does."""
    if any((INPUT / name).glob(marker)):
        return INPUT / name
    for pattern in (f"*/{marker}", f"*/*/{marker}", f"*/*/*/{marker}"):
        hits = sorted(INPUT.glob(pattern), key=lambda p: (p.parent.name != name, str(p)))
        if hits:
            return hits[0].parent
    fail(f"no {marker} under {INPUT}: attach {name} to the kernel (or set KAGGLE_INPUT)")


def stage_env():
    env = dict(os.environ)
    if PIP_TARGET:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [PIP_TARGET, env.get("PYTHONPATH")]))
    return env


def install(dataset):
    """The dataset's wheels, dependencies not resolved: the image's own packages stay as they are."""
    names = sorted({wheel.name.split("-")[0] for wheel in dataset.glob("*.whl")})
    where = ["--target", PIP_TARGET] if PIP_TARGET else []
    say(f"pip install {' '.join(names)} from {dataset}")
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(dataset), "--no-deps",
           "--upgrade", "--force-reinstall", "--quiet", "--disable-pip-version-check", *where, *names]
    if subprocess.run(cmd).returncode != 0:
        fail(f"pip could not install from {dataset} (its message is above)")
    probe = subprocess.run([sys.executable, "-c", "import pipeline.cli, pipeline.predict; print(pipeline.__file__)"],
                           capture_output=True, text=True, env=stage_env(), cwd=WORKING)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no message"])[-1]
        fail(f"the pipeline does not import ({last}); rebuild the dataset with `pipeline kernel dataset --wheels`")
    say(f"pipeline ready: {probe.stdout.strip()}")


def stage(*args):
    say("pipeline " + " ".join(args))
    done = subprocess.run([sys.executable, "-m", "pipeline", *args], env=stage_env(), cwd=WORKING)
    if done.returncode != 0:
        fail(f"pipeline {args[0]} exited with code {done.returncode} (its message is above)")


def trained_run(dataset):
    """The dataset's run: a folder, or the archive a zip/tar upload of the folder left."""
    run = dataset / RUN_FOLDER
    if (run / "config.json").is_file():
        return run
    for archive in sorted(dataset.glob(RUN_FOLDER + ".*")):
        unpacked = WORKING / "run-unpacked"
        shutil.unpack_archive(archive, unpacked)
        configs = sorted(unpacked.rglob("config.json"), key=lambda p: len(p.parts))
        if configs:
            return configs[0].parent
    fail(f"{dataset} holds no trained run ({RUN_FOLDER}/config.json): "
         "rebuild it with `pipeline kernel dataset --run RUN_DIR`")


def main():
    WORKING.mkdir(parents=True, exist_ok=True)
    dataset = find_folder(DATASET.split("/")[1], WHEEL_PATTERN)
    data = find_folder(COMPETITION, DATA_MARKER)
    say(f"competition data {data}, dataset {dataset}, working folder {WORKING}")
    install(dataset)
    work, submission = WORKING / "work", WORKING / "submission.csv"
    stage("reorg", COMPETITION, str(data), str(work), *REORG_ARGS)
    if TRAIN:
        run = WORKING / "run"
        train_args = [arg.replace(DATASET_PLACEHOLDER, str(dataset)) for arg in TRAIN_ARGS]
        stage("train", COMPETITION, str(work), str(run), *train_args, "--force")
    else:
        run = trained_run(dataset)
    stage("predict", COMPETITION, str(work), str(run), str(submission), *PREDICT_ARGS, "--force")
    stage("check", COMPETITION, str(submission), "--work-dir", str(work))
    say(f"done: {submission}")


if __name__ == "__main__":
    main()
'''


def kernel_script(spec: KernelSpec) -> str:
    """The kernel's Python source: settings as literals, then a fixed body (stdlib only)."""
    settings = {
        "COMPETITION": spec.competition,
        "DATA_MARKER": spec.labels_file,
        "DATASET": spec.dataset,
        "WHEEL_PATTERN": WHEEL_PATTERN,
        "RUN_FOLDER": RUN_FOLDER,
        "DATASET_PLACEHOLDER": DATASET_PLACEHOLDER,
        "TRAIN": spec.train,
        "REORG_ARGS": reorg_args(spec),
        "TRAIN_ARGS": list(spec.train_args),
        "PREDICT_ARGS": list(spec.predict_args),
    }
    return SCRIPT_HEAD + "".join(f"{name} = {value!r}\n" for name, value in settings.items()) + SCRIPT_BODY


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


# ---------------------------------------------------------------- the dataset


def dataset_metadata(ref: str, title: str, description: str) -> dict:
    """dataset-metadata.json for `kaggle datasets create` (private unless made public there)."""
    return {"title": title, "id": ref, "licenses": [{"name": "CC0-1.0"}], "description": description}


def validate_dataset_metadata(meta: dict) -> list[str]:
    """Every way ``meta`` breaks the kaggle client's rules for dataset-metadata.json (empty: valid)."""
    problems = [f"unknown field {k!r}; the kaggle client reads {', '.join(sorted(DATASET_FIELDS))}"
                for k in sorted(set(meta) - DATASET_FIELDS)]
    title = meta.get("title")
    if not isinstance(title, str) or not 6 <= len(title) <= 50:
        problems.append(f"title {title!r} must be 6 to 50 characters")
    problems += filter(None, [_ref_problem("id", meta.get("id"), 3)])
    licenses = meta.get("licenses")
    if not isinstance(licenses, list) or len(licenses) != 1 or not licenses[0].get("name"):
        problems.append("licenses must hold exactly one entry with a name, e.g. [{'name': 'CC0-1.0'}]")
    return problems


def requirement_name(requirement: str) -> str:
    """The normalised project name of a requirement string ('Typer>=0.12' -> 'typer')."""
    name = re.match(r"[A-Za-z0-9._-]+", requirement.strip())
    return re.sub(r"[-_.]+", "-", name.group(0)).lower() if name else ""


def wheel_requirements(requires: Iterable[str], installed: dict[str, str]) -> list[str]:
    """The pipeline's run-time requirements missing from Kaggle's image, pinned to what is installed here."""
    wanted = []
    for requirement in requires:
        name = requirement_name(requirement)
        if ";" in requirement or name in KAGGLE_IMAGE:  # extras (test, kaggle) never run in the kernel
            continue
        wanted.append(f"{name}=={installed[name]}" if name in installed else requirement)
    return wanted


def build_pipeline_wheel(dest: Path) -> Path:
    """Build the pipeline's wheel into ``dest`` from a clean copy of the source tree."""
    import pipeline

    root = Path(pipeline.__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise PipelineError(f"{root} has no pyproject.toml: build the dataset from a source checkout of the pipeline")
    with tempfile.TemporaryDirectory(prefix="pipeline-wheel-") as tmp:
        src = Path(tmp) / "src"
        for name in ("pipeline", "competitions"):  # the packages pyproject.toml includes
            shutil.copytree(root / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        for name in ("pyproject.toml", "README.md"):
            if (root / name).is_file():
                shutil.copy2(root / name, src / name)
        _pip(["wheel", "--no-deps", "--no-build-isolation", "-w", str(dest), str(src)], "build the pipeline's wheel")
    wheels = sorted(Path(dest).glob(WHEEL_PATTERN))
    if not wheels:
        raise PipelineError(f"pip wrote no {WHEEL_PATTERN} into {dest}; run `pip wheel {root}` to see why")
    return wheels[-1]


def download_wheels(requirements: list[str], dest: Path) -> None:
    """`pip download` the requirements and their dependencies as wheels (needs PyPI)."""
    if requirements:
        _pip(["download", "--only-binary=:all:", "-d", str(dest), *requirements],
             f"download wheels of {', '.join(requirements)} (is PyPI reachable?)")


def _pip(args: list[str], doing: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args, "--quiet", "--disable-pip-version-check"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        last = (done.stderr or done.stdout).strip().splitlines()
        raise PipelineError(f"pip could not {doing}: {last[-1] if last else f'exit code {done.returncode}'}")


def run_files(run_dir: Path, with_last: bool = False) -> list[Path]:
    """The files of a run that predict reads, relative to ``run_dir``; last.pt only on request."""
    from pipeline.predict import find_members

    run_dir = Path(run_dir)
    if not any(run_dir.rglob("best.pt")):
        raise PipelineError(f"{run_dir} holds no best.pt; train the run first, or leave out --run")
    names = (*MEMBER_FILES, "last.pt") if with_last else MEMBER_FILES
    files = [Path(name) for name in RUN_FILES if (run_dir / name).is_file()]
    for member in find_members(run_dir, "all"):
        rel = member.relative_to(run_dir)
        files += [rel / name for name in names if (member / name).is_file() and rel / name not in files]
    return files


@dataclass(frozen=True)
class DatasetPlan:
    """Which local file lands where in the dataset folder."""

    ref: str
    title: str
    copies: list[tuple[Path, Path]] = field(default_factory=list)  # (source, path in the dataset)
    wheels: bool = False  # also the wheels of requirements missing from Kaggle's image

    def description(self) -> str:
        run = [str(dest) for _, dest in self.copies if dest.name == "best.pt"]
        models = f"the trained models {', '.join(run)}" if run else "no trained run"
        return (f"The {DISTRIBUTION} wheel and {models}, for offline Kaggle kernels "
                "built by `pipeline kernel build`.")


def plan_dataset(ref: str, title: str, run_dir: Path | None, weights: Iterable[Path] = (),
                 with_last: bool = False, wheels: bool = False) -> DatasetPlan:
    """What the dataset folder will hold; nothing is read but the run's file list."""
    copies = [(Path(run_dir) / rel, RUN_FOLDER / rel) for rel in run_files(run_dir, with_last)] if run_dir else []
    for path in weights:
        if not Path(path).is_file():
            raise PipelineError(f"--weights {path} is not a file; give the weights file the kernel trains from")
        copies.append((Path(path), Path(WEIGHTS_FOLDER) / Path(path).name))
    return DatasetPlan(ref, title, copies, wheels)


def write_dataset(plan: DatasetPlan, out_dir: Path, comps: Iterable[Competition], force: bool = False) -> list[Path]:
    """Write the dataset folder for `kaggle datasets create -p OUT_DIR`; returns its files.

    Built beside ``out_dir`` and renamed into place once complete and checked.
    """
    out_dir, comps = Path(out_dir), list(comps)
    meta = dataset_metadata(plan.ref, plan.title, plan.description())
    problems = validate_dataset_metadata(meta)
    if problems:
        raise PipelineError(f"dataset metadata for {plan.ref}: {problems[0]}; pass another --title or --dataset")
    _check_out_dir(out_dir, force)
    check_sources([src for src, _ in plan.copies], comps)
    staging = out_dir.resolve().with_name(f".{out_dir.resolve().name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        build_pipeline_wheel(staging)
        if plan.wheels:
            download_wheels(wheel_requirements(_requires(), _installed()), staging)
        for src, dest in plan.copies:
            (staging / dest).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, staging / dest)
        atomic_write_json(staging / DATASET_METADATA_FILE, meta)
        check_folder(staging, comps)
        shutil.rmtree(out_dir, ignore_errors=True)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return sorted(p.relative_to(out_dir) for p in out_dir.rglob("*") if p.is_file())


def _check_out_dir(out_dir: Path, force: bool) -> None:
    """Only an empty folder, or with --force one this command wrote, may become the dataset."""
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        return
    if not (out_dir / DATASET_METADATA_FILE).is_file():
        raise PipelineError(f"{out_dir} is not empty and holds no {DATASET_METADATA_FILE}; choose an empty --out")
    if not force:
        raise PipelineError(f"{out_dir} already holds a dataset; pass --force to replace it")


def _requires() -> list[str]:
    from importlib.metadata import PackageNotFoundError, requires

    try:
        return requires(DISTRIBUTION) or []
    except PackageNotFoundError:
        raise PipelineError(f"{DISTRIBUTION} is not installed here; `pip install -e .` in the project first") from None


def _installed() -> dict[str, str]:
    from importlib.metadata import distributions

    return {requirement_name(d.metadata["Name"] or ""): d.version for d in distributions()}


# ---------------------------------------------------------------- never packaged


def forbidden_name(name: str) -> bool:
    """Credentials by name: kaggle.json and .env files."""
    return name == "kaggle.json" or name == ".env" or name.startswith(".env.") or name.endswith(".env")


def download_root(path: Path, comps: Iterable[Competition]) -> Path | None:
    """The competition download ``path`` lies in (a folder with its labels file and sample), or None."""
    path = Path(path).resolve()
    for folder in (path, *path.parents) if path.is_dir() else path.parents:
        for comp in comps:
            if (folder / comp.labels_file).is_file() and (folder / comp.sample_submission).is_file():
                return folder
    return None


def check_sources(sources: Iterable[Path], comps: Iterable[Competition]) -> None:
    """Refuse credentials and anything inside a competition's download."""
    comps = list(comps)
    for src in sources:
        if forbidden_name(Path(src).name):
            raise PipelineError(f"refusing to package {src}: credentials never leave this machine; "
                                "move the file out of the folders you package")
        root = download_root(src, comps)
        if root is not None:
            raise PipelineError(f"refusing to package {src}: it lies in the competition download {root}; "
                                "the kernel attaches the competition's data itself")


def secret_values() -> list[str]:
    """The values of the Kaggle secrets set in the environment (too short to be a key: ignored)."""
    return [os.environ[v] for v in SECRET_VARIABLES if len(os.environ.get(v, "")) >= 8]


def _contains(path: Path, needle: bytes, chunk: int = 1 << 22) -> bool:
    """Whether ``needle`` occurs in the file, read in overlapping chunks."""
    tail = b""
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            if needle in tail + block:
                return True
            tail = block[-len(needle):]
    return False


def _archive_problem(path: Path, secrets: list[bytes]) -> str | None:
    """A credential inside a wheel or zip, by name or by (compressed) content."""
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if forbidden_name(Path(info.filename).name):
                return f"holds {info.filename}"
            if secrets and any(s in zf.read(info) for s in secrets):
                return f"member {info.filename} holds the value of ${'/$'.join(SECRET_VARIABLES)}"
    return None


def check_folder(folder: Path, comps: Iterable[Competition]) -> None:
    """Scan what is about to be uploaded: no credentials by name, no secret value inside, no raw data."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    check_sources(files, comps)
    secrets = [s.encode() for s in secret_values()]
    for path in files:
        if any(_contains(path, s) for s in secrets):
            raise PipelineError(f"refusing to package {path}: it holds the value of "
                                f"${'/$'.join(SECRET_VARIABLES)}; remove it and build again")
        problem = _archive_problem(path, secrets) if path.suffix in (".whl", ".zip") else None
        if problem:
            raise PipelineError(f"refusing to package {path}: it {problem}; remove it and build again")


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
