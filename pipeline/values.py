"""The type half of a setting's check: a value has the kind its field declares.

Every source of a setting (a CLI option, a spec file's ``[recipe]``, a stored
run config, a kernel's train options) reaches :class:`pipeline.config.TrainConfig`
or :class:`pipeline.config.Recipe`, whose one check per field calls
:func:`check_kind` before the choices and minimums: ``epochs = "ten"``,
``epochs = 1.5`` and ``batch_size = true`` are refused with the field's name,
where TOML and JSON would otherwise let them through.
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Any

from pipeline.errors import PipelineError


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
