"""The peak memory a command used, printed at the end of train and predict and kept in the run's summary.

CPU: this process's peak resident set and its largest finished child's (the
DataLoader workers); CUDA: also the most the allocator held for tensors.
"""
from __future__ import annotations

import logging
import resource
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("pipeline")
_GB = 1024 ** 3


def peak_memory(device: Any | None = None) -> dict[str, int]:
    """Peak bytes so far: 'rss' (this process), 'children_rss' (its largest finished child) and, on a CUDA
    ``device``, 'cuda_allocated'."""
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    peak = {"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale,
            "children_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale}
    if device is not None and device.type == "cuda":
        import torch

        peak["cuda_allocated"] = int(torch.cuda.max_memory_allocated(device))
    return peak


def format_peak(stage: str, peak: dict[str, int]) -> str:
    """'peak memory (train): 1.21 GB RSS, 0.31 GB in a worker process, 3.40 GB CUDA allocated' (pure)."""
    parts = [f"{peak['rss'] / _GB:.2f} GB RSS"]
    if peak.get("children_rss"):
        parts.append(f"{peak['children_rss'] / _GB:.2f} GB in a worker process")
    if "cuda_allocated" in peak:
        parts.append(f"{peak['cuda_allocated'] / _GB:.2f} GB CUDA allocated")
    return f"peak memory ({stage}): " + ", ".join(parts)


def record_peak(stage: str, device: str, run_dir: Path | None = None) -> str:
    """Log the peak memory at the end of ``stage`` and keep the line in the run's summary (RUN_DIR/summary.txt)."""
    from pipeline.devices import resolve_device
    from pipeline.runs import Run

    line = format_peak(stage, peak_memory(resolve_device(device)))
    log.info(line)
    if run_dir is not None and Path(run_dir).is_dir():
        Run(run_dir).note_in_summary(line, f"peak memory ({stage})")
    return line
