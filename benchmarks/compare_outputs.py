"""Compare two output folders of benchmarks/compare_runs.sh file by file.

CSV and JSON files are compared exactly (bit for bit in every value), except
the wall-clock `seconds` fields and cv.json's `weights` (each fold's best.pt
stamp: its size and mtime, which differ between any two runs; the weights
themselves are compared through weights.json, a digest of every tensor); a holdout member's files may sit at the run's
root (older layout) or in holdout/. Prints one line per file and exits 1 on
any difference.

    python benchmarks/compare_outputs.py BEFORE AFTER
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd


def files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)).replace("holdout/", ""): p for p in sorted(root.rglob("*")) if p.is_file()}


def without_seconds(obj):
    if isinstance(obj, dict):
        return {k: without_seconds(v) for k, v in obj.items() if k not in ("seconds", "weights")
                or (k == "weights" and not (isinstance(v, dict) and all(isinstance(x, str) and ":" in x
                                                                        for x in v.values())))}
    if isinstance(obj, list):
        return [without_seconds(v) for v in obj]
    return obj


def same(a: Path, b: Path) -> str:
    if a.suffix == ".json":
        return "identical" if without_seconds(json.loads(a.read_text())) == without_seconds(json.loads(b.read_text())) \
            else "DIFFERENT"
    # as text: every value must be written with the same digits
    fa, fb = (pd.read_csv(p, dtype=str, keep_default_na=False) for p in (a, b))
    fa, fb = (f.drop(columns=[c for c in ("seconds",) if c in f.columns]) for f in (fa, fb))
    if fa.shape != fb.shape or list(fa.columns) != list(fb.columns):
        return f"DIFFERENT shape/columns {fa.shape} vs {fb.shape}"
    if fa.equals(fb):
        return f"identical ({fa.shape[0]} rows x {fa.shape[1]} columns)"
    differing = [c for c in fa.columns if not fa[c].equals(fb[c])]
    worst = max((fa[c].astype(float) - fb[c].astype(float)).abs().max() for c in differing)
    return f"DIFFERENT in {', '.join(differing)} (max abs difference {worst:.3g})"


def main() -> int:
    before, after = (files(Path(p)) for p in sys.argv[1:3])
    bad = 0
    for name in sorted(set(before) | set(after)):
        if name not in before or name not in after:
            print(f"{name}: only in {'after' if name in after else 'before'}")
            bad += 1
            continue
        verdict = same(before[name], after[name])
        bad += not verdict.startswith("identical")
        print(f"{name}: {verdict}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
