"""The one exception type the CLI turns into a message and exit code 1, and the checks that raise it for
a value: one of the choices (:func:`check_choice`), of the kind its setting declares (:func:`check_kind`)."""
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
