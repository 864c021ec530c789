"""Checkpoints: written atomically, read without ever running code from the file."""
from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import PipelineError
from pipeline.io import atomic_save


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """torch.save to a temporary file, then rename: a kill never leaves half a file."""
    atomic_save(Path(path), lambda tmp: torch.save(state, tmp))


def _refusal_reason(exc: Exception) -> str:
    """The line of torch's long weights-only message that says what was refused."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or line.startswith("Unsupported"):
            return line
    return "it holds objects other than tensors and plain values"


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint of plain tensors and values; a pickle that would run code is refused."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"checkpoint {path} not found; train the run first or check RUN_DIR")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols before refusing them
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise PipelineError(f"checkpoint {path} was refused: it is not a plain-data checkpoint "
                            f"({_refusal_reason(exc)}); only load files you trust from a pipeline run") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else f"{type(exc).__name__}: file ends early"
        raise PipelineError(f"checkpoint {path} is unreadable or truncated ({reason}); "
                            "retrain or resume from another checkpoint") from None
    if not isinstance(state, dict) or "model" not in state:
        raise PipelineError(f"checkpoint {path} holds no 'model' weights; is it a pipeline checkpoint?")
    return state
