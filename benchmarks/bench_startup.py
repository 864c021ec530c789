"""Startup time of the CLI: `pipeline --help` and `pipeline check` should take well under a second.

    python benchmarks/bench_startup.py [--repeat 5]

Runs each command in a fresh interpreter (as a user does), prints the median
and best wall time, and whether torch, pandas or scikit-learn were imported
(read from ``python -X importtime``). The check runs on the digits demo's
sample submission, written into a temporary folder first.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAVY = ("torch", "pandas", "sklearn", "timm", "albumentations")


def pipeline(*args: str, importtime: bool = False) -> subprocess.CompletedProcess:
    flags = ["-X", "importtime"] if importtime else []
    return subprocess.run([sys.executable, *flags, "-m", "pipeline", *map(str, args)], capture_output=True,
                          text=True, check=False)


def timed(args: list[str], repeat: int) -> list[float]:
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        done = pipeline(*args)
        seconds.append(time.perf_counter() - start)
        if done.returncode != 0:
            raise SystemExit(f"pipeline {' '.join(args)} failed: {done.stderr.strip()}")
    return seconds


def heavy_imports(args: list[str]) -> list[str]:
    """Which of the heavy packages the command imports (top-level names in -X importtime)."""
    lines = pipeline(*args, importtime=True).stderr.splitlines()
    names = {line.rsplit("|", 1)[-1].strip() for line in lines if line.startswith("import time:")}
    return [h for h in HEAVY if h in names]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    repeat = parser.parse_args().repeat
    with tempfile.TemporaryDirectory() as tmp:
        raw, work = Path(tmp) / "raw", Path(tmp) / "work"
        for setup in (("download", "digits", raw), ("reorg", "digits", raw, work)):
            if pipeline(*setup).returncode != 0:
                raise SystemExit(f"pipeline {setup[0]} failed")
        commands = {"pipeline --help": ["--help"], "pipeline train --help": ["train", "--help"],
                    "pipeline check": ["check", "digits", raw / "sample_submission.csv", "--work-dir", work]}
        print(f"{'command':<24} {'median':>8} {'best':>8}  heavy imports ({repeat} runs, {sys.executable})")
        for name, args in commands.items():
            seconds = timed(args, repeat)
            loaded = ", ".join(heavy_imports(args)) or "none"
            print(f"{name:<24} {statistics.median(seconds):>7.2f}s {min(seconds):>7.2f}s  {loaded}")


if __name__ == "__main__":
    main()
