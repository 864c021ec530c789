"""The offline Kaggle kernel that `pipeline kernel build` writes (standard library only).

This module is copied into the kernel folder as kernel.py with its settings
block replaced by the kernel's own values (pipeline/kernel/build.py, kernel_script).

Installs the pipeline from the attached dataset (pip, no index), runs its
stages on the competition's data and writes submission.csv, checked. A fold
kernel (FOLD set) trains that one fold into run/ and stops there: its output is
gathered with the other folds' by `pipeline kernel gather`.
KAGGLE_INPUT and KAGGLE_WORKING (default /kaggle/input, /kaggle/working) let
it run anywhere; PIPELINE_KERNEL_PIP_TARGET=DIR installs into DIR (put on
PYTHONPATH for the stages) instead of the environment, whose packages must then
already provide the dependencies.
"""
import importlib.metadata
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

# ---- settings: `pipeline kernel build` replaces this block with the kernel's values
COMPETITION = "competition-slug"
SPEC_FILE = ""  # a spec-file competition: the spec in the dataset, named by every command instead of the slug
DATA_MARKER = "labels.csv"  # a file of the competition's download
DATASET = "owner/dataset-slug"
WHEEL_PATTERN = "kaggle_pipeline-*.whl"
RUN_FOLDER = "run"
RUN_MARKER = ""  # the file that marks a run folder (its name comes from pipeline/runs.py)
DATASET_PLACEHOLDER = "{dataset}"
TRAIN = False
REORG_ARGS = []
TRAIN_ARGS = []
PREDICT_ARGS = []
FOLD = None  # a fold kernel: the fold of the run it trains (TRAIN_ARGS hold --fold FOLD)
# ---- end of settings

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


def installed(name):
    """Whether the environment already has distribution ``name`` (any version)."""
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def wanted_wheels(dataset):
    """The pipeline's own wheel, and each dependency wheel only where the image lacks that package.

    Kaggle's torch, timm and the rest are never replaced: no reinstall, no upgrade over them.
    """
    wanted = []
    for wheel in sorted(dataset.glob("*.whl")):
        name = wheel.name.split("-")[0]
        if wheel.match(WHEEL_PATTERN) or not installed(name.replace("_", "-")):
            wanted.append(wheel)
    return wanted


def install(dataset):
    """The dataset's wheels that are missing here, offline, dependencies not resolved."""
    wheels = wanted_wheels(dataset)
    where = ["--target", PIP_TARGET] if PIP_TARGET else []
    say(f"pip install {' '.join(w.name for w in wheels)} from {dataset}")
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(dataset), "--no-deps",
           "--quiet", "--disable-pip-version-check", *where, *map(str, wheels)]
    if subprocess.run(cmd).returncode != 0:
        fail(f"pip could not install from {dataset} (its message is above)")
    probe = subprocess.run([sys.executable, "-c", "import pipeline.cli.app, pipeline.predict.stage; print(pipeline.__file__)"],
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
    if (run / RUN_MARKER).is_file():
        return run
    for archive in sorted(dataset.glob(RUN_FOLDER + ".*")):
        unpacked = WORKING / "run-unpacked"
        shutil.unpack_archive(archive, unpacked)
        configs = sorted(unpacked.rglob(RUN_MARKER), key=lambda p: len(p.parts))
        if configs:
            return configs[0].parent
    fail(f"{dataset} holds no trained run ({RUN_FOLDER}/{RUN_MARKER}): "
         "rebuild it with `pipeline kernel dataset --run RUN_DIR`")


def competition_arg(dataset):
    """What the commands name the competition by: the slug, or the spec file the dataset carries."""
    if not SPEC_FILE:
        return COMPETITION
    spec = dataset / SPEC_FILE
    if not spec.is_file():
        fail(f"{dataset} holds no {SPEC_FILE}: rebuild it with `pipeline kernel dataset --spec FILE`")
    return str(spec)


def main():
    WORKING.mkdir(parents=True, exist_ok=True)
    dataset = find_folder(DATASET.split("/")[1], WHEEL_PATTERN)
    data = find_folder(COMPETITION, DATA_MARKER)
    say(f"competition data {data}, dataset {dataset}, working folder {WORKING}")
    install(dataset)
    comp = competition_arg(dataset)
    work, submission = WORKING / "work", WORKING / "submission.csv"
    stage("reorg", comp, str(data), str(work), *REORG_ARGS)
    if TRAIN:
        run = WORKING / "run"
        train_args = [arg.replace(DATASET_PLACEHOLDER, str(dataset)) for arg in TRAIN_ARGS]
        stage("train", comp, str(work), str(run), *train_args, "--force")
        if FOLD is not None:
            shutil.rmtree(work)  # links into the input: the output is the run's fold alone
            say(f"done: {run} holds fold {FOLD}; gather the fold kernels' outputs with `pipeline kernel gather`")
            return
    else:
        run = trained_run(dataset)
    stage("predict", comp, str(work), str(run), str(submission), *PREDICT_ARGS, "--force")
    stage("check", comp, str(submission), "--work-dir", str(work))
    say(f"done: {submission}")


if __name__ == "__main__":
    main()
