"""Plain command-line values (str, int, float, Path, bool) converted without pydantic.

Typer (>= 0.29) converts every option through a pydantic TypeAdapter: the
first value a command parses imports pydantic and builds its schemas, about
0.15 s, a third of what a reorg with nothing to do may take. A value of one
of these types, with no bounds, parser or file handling, needs none of
that: :func:`make_plain` gives such a parameter a converter of its own, with
typer's own path checks. Any other parameter (lists, bounds, choices) keeps
typer's conversion. On a typer without this machinery it does nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    from typer._click.exceptions import BadParameter
    from typer._coercion import RuntimeParam, build_runtime_param, resolve_type_descriptor
    from typer._param_types import coerce_cli_path
except ImportError:  # pragma: no cover - an older typer converts through click, which is light already
    RuntimeParam = None

PLAIN_TYPES = {str: "string", int: "integer", float: "number", Path: "path", bool: "boolean"}
_UNSUPPORTED = ("parser", "click_type", "min", "max", "clamp", "formats")  # typer's adapter handles these


if RuntimeParam is not None:
    @dataclass(frozen=True)
    class PlainParam(RuntimeParam):
        """One plain value: already of its type, else converted; a bad number is a usage error naming it."""

        def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
            kind = self.annotation
            if kind is bool and not isinstance(value, bool):  # "yes", "0": typer's own reading of a flag's value
                return build_runtime_param(resolve_type_descriptor(bool, self.parameter_info))._coerce_value(
                    value, param, ctx)
            if isinstance(value, bytes):
                value = value.decode()
            if kind is Path:
                path = value if isinstance(value, Path) else Path(value)
                return coerce_cli_path(path, self.parameter_info, path_type=Path, param=param, ctx=ctx)
            if isinstance(value, kind) and not isinstance(value, bool):
                return value
            try:
                return kind(value)
            except (TypeError, ValueError):
                raise BadParameter(f"{value!r} is not a valid {PLAIN_TYPES[kind]}", ctx=ctx, param=param) from None


def is_plain(param: Any) -> bool:
    """Whether typer's parameter holds one value of a plain type, with nothing for its adapter to do (pure)."""
    descriptor = getattr(param, "type_descriptor", None)
    if descriptor is None or descriptor.annotation not in PLAIN_TYPES or descriptor.file_annotation is not None:
        return False
    info = descriptor.parameter_info
    if any(getattr(info, name, None) not in (None, False) for name in _UNSUPPORTED):
        return False
    return param.nargs == 1 and not param.multiple


def make_plain(params: list[Any]) -> list[Any]:
    """Give each plain parameter the light converter (once); returns ``params``."""
    if RuntimeParam is None:
        return params
    for param in params:
        if getattr(param, "_runtime_param", True) is None and is_plain(param):
            d = param.type_descriptor
            param._runtime_param = PlainParam(parameter_info=d.parameter_info, annotation=d.annotation)
    return params
