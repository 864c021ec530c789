"""Start-up time of light CLI commands, through the CLI as a user runs them.

    python benchmarks/bench_startup.py [--repeat 5] [--raw DIR]

Each command runs in a fresh interpreter; prints the median and best wall
time, the median CPU time (user + system: the steadier figure on a shared
machine), and which heavy packages it imported (read from ``python -X
importtime``). Commands: ``--help``, ``train --help``, ``check`` of a sample
submission, a reorg with nothing to do (the tree is up to date), and a full
reorg (a fresh WORK_DIR each time). The reorgs use RAW (default: the full
CIFAR-10 PNGs in /tmp/cifar10full, written once by ../shared/data/cifar10_png.py),
else the digits demo. Bytecode is compiled before timing, as an installed
package's is. Targets (issue 26): no-op reorg <= 0.3 s, full reorg <= 2.5 s,
check and --help < 1 s.
"""
from __future__ import annotations

import argparse
import compileall
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "pandas", "numpy", "sklearn", "timm", "albumentations", "pydantic")
CIFAR = Path("/tmp/cifar10full")
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def pipeline(*args, importtime: bool = False) -> subprocess.CompletedProcess:
    flags = ["-X", "importtime"] if importtime else []
    return subprocess.run([sys.executable, *flags, "-m", "pipeline", *map(str, args)], capture_output=True,
                          text=True, check=False, env=ENV)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(args: list, repeat: int, before=None) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds of each run; ``before()`` prepares each run, untimed."""
    wall, cpu = [], []
    for _ in range(repeat):
        if before is not None:
            before()
        c0, start = children_cpu(), time.perf_counter()
        done = pipeline(*args)
        wall.append(time.perf_counter() - start)
        cpu.append(children_cpu() - c0)
        if done.returncode != 0:
            raise SystemExit(f"pipeline {' '.join(map(str, args))} failed: {done.stderr.strip()}")
    return wall, cpu


def heavy_imports(args: list, before=None) -> list[str]:
    """Which of the heavy packages the command imports (top-level names in -X importtime)."""
    if before is not None:
        before()
    lines = pipeline(*args, importtime=True).stderr.splitlines()
    names = {line.rsplit("|", 1)[-1].strip() for line in lines if line.startswith("import time:")}
    return [h for h in HEAVY if h in names]


def load() -> str:
    return "load %.2f %.2f %.2f" % os.getloadavg()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--raw", type=Path, default=None, help="a cifar-10 download for the reorgs")
    opts = parser.parse_args()
    compileall.compile_dir(ROOT / "pipeline", quiet=1)
    compileall.compile_dir(ROOT / "competitions", quiet=1)
    with tempfile.TemporaryDirectory() as tmp:
        comp, raw = "cifar-10", opts.raw or CIFAR
        if not (raw / "trainLabels.csv").is_file():
            comp, raw = "digits", Path(tmp) / "raw"
            if pipeline("download", "digits", raw).returncode != 0:
                raise SystemExit("pipeline download digits failed")
        work, fresh = Path(tmp) / "work", Path(tmp) / "fresh"
        if pipeline("reorg", comp, raw, work).returncode != 0:
            raise SystemExit(f"pipeline reorg {comp} failed")
        commands = {
            "pipeline --help": (["--help"], None),
            "pipeline train --help": (["train", "--help"], None),
            "pipeline check": (["check", comp, work / "sample_submission.csv", "--work-dir", work], None),
            "reorg, up to date": (["reorg", comp, raw, work], None),
            "reorg, full": (["reorg", comp, raw, fresh], lambda: (shutil.rmtree(fresh, ignore_errors=True),
                                                                 os.sync())),
        }
        print(f"{comp} from {raw}; {opts.repeat} runs each; {sys.executable}; {load()}")
        print(f"{'command':<24} {'median':>8} {'best':>8} {'cpu':>8}  heavy imports")
        for name, (args, before) in commands.items():
            wall, cpu = timed(args, opts.repeat, before)
            loaded = ", ".join(heavy_imports(args, before)) or "none"
            print(f"{name:<24} {statistics.median(wall):>7.2f}s {min(wall):>7.2f}s "
                  f"{statistics.median(cpu):>7.2f}s  {loaded}")
        print(load())


if __name__ == "__main__":
    main()
