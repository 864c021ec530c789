"""Wall time of `pipeline runs DIR` on a folder of many runs (issue 24: under a second for ~50 runs).

    python benchmarks/bench_runs_table.py [--runs 50] [--repeat 7]

Writes ``--runs`` run folders (two competitions, fold and holdout runs, with
cv.json, members' metrics and done records, as tests/test_runs_table.py writes
them) into a temporary folder, then runs `python -m pipeline runs DIR --sort cv`
in a fresh interpreter ``--repeat`` times, as a user types it. Prints the load
average first (a loaded machine stretches wall time, not CPU time), the median
and best wall time, the CPU time of one run, the heavy packages it imported, and
where its imports spend their time (-X importtime, top-level modules).
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAVY = ("torch", "pandas", "sklearn", "timm", "PIL")
SHOWN = ("typer", "pydantic", "numpy", "competitions", "pipeline.cli.app", "pipeline.report.runs_table")


def write_runs(root: Path, n: int) -> Path:
    """``n`` runs under root/runs: every fifth a holdout run, the others 3 folds; digits and dog breeds."""
    from tests.test_runs_table import write_run

    for i in range(n):
        slug = "digits" if i % 2 else "dog-breed-identification"
        flags = {"lr": round(0.05 * (1 + i % 7), 2), "epochs": 2 + i % 4, **({"folds": 3} if i % 5 else {})}
        write_run(root, f"runs/run{i:03d}", slug, None, flags, [0.90, 0.91, 0.92] if i % 5 else [0.88], 10.0)
    return root / "runs"


def runs_command(folder: Path, *flags: str) -> list[str]:
    return [sys.executable, *flags, "-m", "pipeline", "runs", str(folder), "--sort", "cv"]


def timed(folder: Path) -> tuple[float, float]:
    """Wall and CPU (user + sys) seconds of one `pipeline runs` process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(runs_command(folder), capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"pipeline runs failed: {done.stderr.strip()}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def import_times(folder: Path) -> dict[str, float]:
    """Cumulative import seconds per module name of one run (-X importtime), for the modules in SHOWN and HEAVY."""
    err = subprocess.run(runs_command(folder, "-X", "importtime"), capture_output=True, text=True).stderr
    found = {}
    for line in err.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            _, cumulative, name = line.split("|")
            if name.strip() in SHOWN + HEAVY:
                found[name.strip()] = max(found.get(name.strip(), 0.0), int(cumulative) / 1e6)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_runs(Path(tmp), args.runs)
        subprocess.run(runs_command(folder), capture_output=True, check=False)  # warm the file cache
        load = os.getloadavg()
        results = [timed(folder) for _ in range(args.repeat)]
        walls = [wall for wall, _ in results]
        imports = import_times(folder)
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores")
    print(f"pipeline runs DIR --sort cv, {args.runs} runs, {args.repeat} processes: wall median "
          f"{statistics.median(walls):.2f}s, best {min(walls):.2f}s, worst {max(walls):.2f}s; CPU median "
          f"{statistics.median(cpu for _, cpu in results):.2f}s")
    print("heavy imports: " + (", ".join(h for h in HEAVY if h in imports) or "none"))
    print("import time (cumulative): " + ", ".join(f"{m} {imports[m]:.3f}s" for m in SHOWN if m in imports))


if __name__ == "__main__":
    main()
