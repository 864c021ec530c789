"""The boundary to Kaggle: the kaggle CLI, called with argument lists only.

Downloads and uploads go through the official ``kaggle`` command. Nothing here
reads, logs or copies the credentials; it only checks that they exist so it
can say exactly what is missing.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from pipeline.download.archives import MANIFEST_NAME, unpack_all
from pipeline.competition import Competition
from pipeline.errors import PipelineError

CREDENTIALS_HELP = (
    "create an API token on kaggle.com (Settings > API > Create New Token) and save it as "
    "~/.kaggle/kaggle.json (chmod 600), or set KAGGLE_USERNAME and KAGGLE_KEY"
)


def credentials_present() -> bool:
    """Whether the kaggle client will find credentials (file or environment)."""
    config_dir = Path(os.environ.get("KAGGLE_CONFIG_DIR", Path.home() / ".kaggle"))
    env = os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY")
    return bool(env or os.environ.get("KAGGLE_API_TOKEN") or (config_dir / "kaggle.json").is_file())


def find_kaggle() -> str | None:
    """The kaggle CLI on PATH, else the one beside this Python (the project's venv, even when not activated)."""
    return shutil.which("kaggle") or shutil.which(str(Path(sys.executable).parent / "kaggle"))


def kaggle_command() -> str:
    exe = find_kaggle()
    if exe is None:
        raise PipelineError("the kaggle CLI is not installed; `pip install kaggle` (to skip downloading, unzip the "
                            "data by hand and pass its folder: RAW_DIR, or DATA=... for make)")
    if not credentials_present():
        raise PipelineError(f"no Kaggle credentials found: {CREDENTIALS_HELP}")
    return exe


def run_kaggle(args: list[str]) -> str:
    """Run ``kaggle ARGS...`` (a list: never a shell string); its output, or a clear error."""
    cmd = [kaggle_command(), *args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PipelineError(f"`kaggle {' '.join(args[:2])}` failed to run: {exc}") from None
    if done.returncode != 0:
        last = (done.stderr or done.stdout).strip().splitlines()
        reason = last[-1] if last else f"exit code {done.returncode}"
        raise PipelineError(f"`kaggle {' '.join(args[:2])}` failed: {reason} "
                            "(accepted the competition's rules on kaggle.com? network up?)")
    return done.stdout


def download(comp: Competition, raw_dir: Path) -> Path:
    """Put the competition's download in ``raw_dir``: the demo writes its own, others use kaggle.

    Kaggle's archives are unpacked in place (nested ones too) and kept: the
    unpack manifest makes a second call a no-op and resumes an interrupted one.
    """
    raw_dir = Path(raw_dir)
    if comp.make_raw is not None:
        comp.make_raw(raw_dir)
        return raw_dir
    have_labels = (raw_dir / comp.labels_file).is_file()
    if have_labels and not (raw_dir / MANIFEST_NAME).is_file():
        return raw_dir  # downloaded and unpacked by hand
    if not have_labels:
        raw_dir.mkdir(parents=True, exist_ok=True)
        run_kaggle(["competitions", "download", "-c", comp.slug, "-p", str(raw_dir)])
    unpack_all(raw_dir)
    return raw_dir
