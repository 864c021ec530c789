"""The dataset an offline kernel attaches: the pipeline's wheel, dependency wheels, the trained run.

Also the checks on everything about to be uploaded: no credentials by name or
by value, and nothing from a competition's download.
"""
from __future__ import annotations

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
from pipeline.io import atomic_write_json, os_error_message
from pipeline.runs import BEST_FILE, Run

DATASET_METADATA_FILE = "dataset-metadata.json"
RUN_FOLDER = "run"  # where the dataset carries the trained run
WEIGHTS_FOLDER = "weights"  # where it carries --weights files for training in the kernel
SPEC_FILE = "competition.toml"  # where it carries a spec-file competition, which the kernel's commands name
DISTRIBUTION = "kaggle-pipeline"
WHEEL_PATTERN = "kaggle_pipeline-*.whl"
# What Kaggle's Python image already has; the rest ships as wheels with --wheels.
KAGGLE_IMAGE = frozenset({"torch", "torchvision", "timm", "pandas", "scikit-learn", "albumentations",
                          "pillow", "matplotlib", "tqdm", "safetensors"})
SECRET_VARIABLES = ("KAGGLE_KEY", "KAGGLE_API_TOKEN")
SLUG = re.compile(r"[a-z0-9]+(-[a-z0-9]+)*")
DATASET_FIELDS = frozenset({"title", "subtitle", "description", "id", "id_no", "licenses", "resources",
                            "keywords"})


def dataset_metadata(ref: str, title: str, description: str) -> dict:
    """dataset-metadata.json for `kaggle datasets create` (private unless made public there)."""
    return {"title": title, "id": ref, "licenses": [{"name": "CC0-1.0"}], "description": description}


def ref_problem(where: str, ref: object, min_slug: int) -> str | None:
    """Why ``ref`` is not ``owner/slug`` (slug at least ``min_slug`` characters), or None."""
    owner, _, slug = str(ref).partition("/")
    if not isinstance(ref, str) or not owner or "/" in slug or not SLUG.fullmatch(slug):
        return f"{where} {ref!r} is not 'owner/slug' (slug: lower-case letters, digits and '-')"
    if not min_slug <= len(slug) <= 50:
        return f"{where} {ref!r}: the slug must be {min_slug} to 50 characters"
    return None


def validate_dataset_metadata(meta: dict) -> list[str]:
    """Every way ``meta`` breaks the kaggle client's rules for dataset-metadata.json (empty: valid)."""
    problems = [f"unknown field {k!r}; the kaggle client reads {', '.join(sorted(DATASET_FIELDS))}"
                for k in sorted(set(meta) - DATASET_FIELDS)]
    title = meta.get("title")
    if not isinstance(title, str) or not 6 <= len(title) <= 50:
        problems.append(f"title {title!r} must be 6 to 50 characters")
    problems += filter(None, [ref_problem("id", meta.get("id"), 3)])
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
    run = Run(run_dir)
    try:
        files = run.files_for_predict()
    except PipelineError:
        raise PipelineError(f"{run_dir} holds no finished model; train the run first, or leave out --run") from None
    if with_last:
        files += [m.last_path for m in run.finished("all") if m.last_path.is_file()]
    return [p.relative_to(run.dir) for p in files]


@dataclass(frozen=True)
class DatasetPlan:
    """Which local file lands where in the dataset folder."""

    ref: str
    title: str
    copies: list[tuple[Path, Path]] = field(default_factory=list)  # (source, path in the dataset)
    wheels: bool = False  # also the wheels of requirements missing from Kaggle's image

    def description(self) -> str:
        run = [str(dest.parent) for _, dest in self.copies if dest.name == BEST_FILE]
        models = f"the trained models {', '.join(run)}" if run else "no trained run"
        return (f"The {DISTRIBUTION} wheel and {models}, for offline Kaggle kernels "
                "built by `pipeline kernel build`.")


def run_spec(run_dir: Path) -> Path | None:
    """The spec file a run was trained on (its config's competition is then that file's path), or None."""
    import json

    from pipeline.download.specfile import looks_like_spec

    try:
        name = json.loads(Run(run_dir).config_path.read_text(encoding="utf-8"))["config"]["competition"]
    except (OSError, ValueError, KeyError, TypeError):  # run_files names what is wrong with the run
        return None
    if not isinstance(name, str) or not looks_like_spec(name):
        return None
    if not Path(name).is_file():
        raise PipelineError(f"{run_dir} was trained on the spec file {name}, which is gone; pass --spec FILE")
    return Path(name)


def plan_dataset(ref: str, title: str, run_dir: Path | None, weights: Iterable[Path] = (),
                 with_last: bool = False, wheels: bool = False, spec: Path | None = None) -> DatasetPlan:
    """What the dataset folder will hold; nothing is read but the run's file list (and ``spec``, checked).

    ``spec``: a competition spec file, carried as SPEC_FILE for the kernel's commands.
    """
    copies = [(Path(run_dir) / rel, RUN_FOLDER / rel) for rel in run_files(run_dir, with_last)] if run_dir else []
    if spec is not None:
        from pipeline.download.specfile import load_spec

        load_spec(spec)  # a spec that does not load fails here, not in the kernel
        copies.append((Path(spec), Path(SPEC_FILE)))
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
    except OSError as exc:  # a full disk while copying: the previous dataset folder is untouched
        raise PipelineError(os_error_message(exc, out_dir, "write the dataset")) from exc
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
            marker = comp.labels_file or comp.sample_submission  # layout folders has no labels file
            if (folder / marker).is_file() and (folder / comp.sample_submission).is_file():
                return folder
    return None


def credentials(path: Path) -> bool:
    """Credentials by name or by place, also behind links: kaggle.json, .env files, anything in ~/.kaggle."""
    real = Path(os.path.realpath(path))
    kaggle_dir = Path(os.path.realpath(Path.home() / ".kaggle"))
    return forbidden_name(Path(path).name) or forbidden_name(real.name) or kaggle_dir in (real, *real.parents)


def check_sources(sources: Iterable[Path], comps: Iterable[Competition]) -> None:
    """Refuse credentials (the file or the target of its link) and anything inside a competition's download.

    The message names the file given, never the target: the place of credentials is not logged.
    """
    comps = list(comps)
    for src in sources:
        if credentials(src):
            raise PipelineError(f"refusing to package {src}: credentials never leave this machine (it is or links to "
                                "kaggle.json, ~/.kaggle or a .env file); move it out of the folders you package")
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
