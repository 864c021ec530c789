"""The one exception type the CLI turns into a message and exit code 1, and the checks that raise it for
a value: one of the choices (:func:`check_choice`), of the kind its setting declares (:func:`check_kind`),
a list of test-time views and a test side (:func:`tta_views`, :func:`check_views`: the grammar of ``--tta``
and ``--test-size``, here because pipeline/config.py is at its size limit and the core at its module count)."""
from __future__ import annotations

import math
import numbers
import os
from typing import Any

_WORKER_HEADER = "Caught PipelineError in DataLoader worker"
_WORKER_LAST_LINE = "pipeline.errors.PipelineError: "


class PipelineError(Exception):
    """A problem with the user's input or environment, worded for the user.

    The message is one line: it names the file, row or id at fault and says
    what to do next. The CLI prints it without a traceback (``--debug`` shows
    one).

    A DataLoader worker's PipelineError is re-raised in the main process as
    ``PipelineError("Caught ... Original Traceback ...")``; the constructor keeps
    the original one-line message and moves the worker's traceback into a note,
    which only a traceback (``--debug``) shows.
    """

    def __init__(self, *args: object) -> None:
        message = args[0] if len(args) == 1 else None
        if isinstance(message, str) and message.startswith(_WORKER_HEADER):
            lines = [line for line in message.splitlines() if line.startswith(_WORKER_LAST_LINE)]
            if lines:
                super().__init__(lines[-1][len(_WORKER_LAST_LINE):])
                if hasattr(self, "add_note"):  # Python 3.11+
                    self.add_note(message)
                return
        super().__init__(*args)


def check_choice(flag: str, value: object, choices: tuple) -> None:
    """An error listing the valid choices when ``value`` is not one of them."""
    if value not in choices:
        raise PipelineError(f"{flag} {value!r} is not one of: {', '.join(map(str, choices))}")


# ---------------------------------------------------------------- the kind of a setting's value
# Every source of a setting (a CLI option, a spec file's [recipe], a stored run config, a kernel's train
# options) reaches pipeline.config.check_setting, which calls check_kind before the choices and minimums:
# epochs = "ten", epochs = 1.5 and batch_size = true are refused with the field's name, where TOML and JSON
# would let them through.


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_float(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_numbers(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and len(value) > 0 and all(_is_float(v) for v in value)


# annotation (as written in TrainConfig) -> (test, what the user should write)
KINDS = {
    "int": (_is_int, "a whole number"),
    "float": (_is_float, "a number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string in quotes"),
    "Path": (lambda v: isinstance(v, (str, os.PathLike)), "a path in quotes"),
    "tuple[float, ...]": (_is_numbers, "a list of numbers"),
}


def check_kind(annotation: str, name: str, value: Any) -> None:
    """Refuse ``value`` unless it has the kind ``annotation`` names (``X | None`` also takes None)."""
    kinds = [part.strip() for part in str(annotation).split("|")]
    if value is None and "None" in kinds:
        return
    known = [KINDS[k] for k in kinds if k in KINDS]
    if not known or any(test(value) for test, _ in known):
        return
    wanted = " or ".join(words for _, words in known)
    raise PipelineError(f"{name} must be {wanted}, got {value!r}")


VIEW_OPS = ("none", "flip", "vflip", "rot90", "rot180", "rot270", "transpose", "transverse",  # models/views.py
            "shiftul", "shiftdr", "flipshiftul", "flipshiftdr")  # moved a side/32 px (min 1) up-left, down-right
TTA_PRESETS = {"none": "none", "flip": "none,flip", "d4": "none,rot90,rot180,rot270,flip,transpose,vflip,transverse",
               "multiscale": "none,scale1.15,scale1.3",  # the decoded image at larger sides too (FixRes)
               "flipshift": "none,flip,shiftul,shiftdr,flipshiftul,flipshiftdr"}  # the CIFAR speed runs' views


def tta_views(tta: str) -> tuple[tuple[str, float], ...]:
    """(operation, scale) of each view of a --tta value, once each in order: a comma list of presets and views (OP,
    scaleF: the image decoded at F x the test side, or OP+scaleF); an unknown view is one line naming the valid ones."""
    views: list = []
    for name in ",".join(TTA_PRESETS.get(part.strip(), part.strip()) for part in str(tta).split(",")).split(","):
        head, _, scale = name.rpartition("scale") if "scale" in name else (name + "+", "", "1")
        op = head[:-1] if head.endswith("+") else ("none" if not head else "")
        if op not in VIEW_OPS or not scale.replace(".", "", 1).isdigit() or not 0.5 <= float(scale) <= 2:
            raise PipelineError(f"--tta {tta}: unknown view {name!r}; valid: presets {', '.join(TTA_PRESETS)}; views "
                                f"{', '.join(VIEW_OPS)}, scaleF (0.5 <= F <= 2, e.g. scale1.15) or OP+scaleF")
        views += [(op, float(scale))] if (op, float(scale)) not in views else []
    return tuple(views)


def check_views(tta: str, test_size: str) -> None:
    """--tta (:func:`tta_views`) and --test-size: train (the training side), auto (the weights') or pixels."""
    tta_views(tta)
    if not (test_size in ("train", "auto") or str(test_size).isdigit() and int(test_size) > 0):
        raise PipelineError(f"--test-size must be train, auto or pixels (e.g. 288), got {test_size!r}")
