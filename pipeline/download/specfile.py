"""Competition spec files: a Competition written as a small TOML file, outside the package.

A spec file holds the fields of :class:`pipeline.competition.Competition` at
its top level, the default recipe as a ``[recipe]`` table (the settings it
sets, as in ``pipeline train``'s options with ``_`` for ``-``) and named
recipes as ``[recipes.NAME]`` tables. ``pipeline init`` writes one; every
command that takes a competition accepts its path in place of a slug.

A loaded spec registers itself under its slug for the rest of the process,
so code that looks the competition up by slug (training, run checks) finds
it. A spec whose slug is a registered module's (the real Kaggle slug, which
`pipeline submit` needs) takes its place for that process, with a warning.
"""
from __future__ import annotations

import dataclasses
import logging
import tomllib
from pathlib import Path
from typing import Any

from pipeline import competition as registry
from pipeline.competition import Competition
from pipeline.config import Recipe
from pipeline.errors import PipelineError

log = logging.getLogger("pipeline")

SUFFIX = ".toml"
_NOT_IN_FILES = ("recipe", "recipes", "make_raw", "spec_file")  # tables, code, or set by the loader


def spec_fields() -> dict[str, dataclasses.Field]:
    """The Competition fields a spec file may set at its top level, by name."""
    return {f.name: f for f in dataclasses.fields(Competition) if f.name not in _NOT_IN_FILES}


def looks_like_spec(name: str) -> bool:
    """Whether a COMPETITION argument names a spec file rather than a registered slug."""
    return name.endswith(SUFFIX) or "/" in name or Path(name).is_file()


def load_spec(path: Path | str) -> Competition:
    """The Competition of a spec file, registered under its slug; each error names the file and field."""
    path = Path(path)
    comp = spec_from_table(_read_table(path), str(path), spec_file=str(path.resolve()))
    _register(comp)
    return comp


def _read_table(path: Path) -> dict[str, Any]:
    """A spec file's parsed TOML; each failure one PipelineError naming the file."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"competition spec {path} not found; give a registered slug "
                            "(`pipeline competitions`) or the path of a spec file (`pipeline init`)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PipelineError(f"competition spec {path} cannot be read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise PipelineError(f"competition spec {path} is not valid TOML: {exc}; fix that line") from None


@dataclasses.dataclass(frozen=True)
class FoundSpec:
    """A spec file found in a folder: its competition, or why it does not load."""

    path: Path
    competition: Competition | None
    problem: str = ""


# a TOML file with none of these is another tool's (pyproject.toml, ...), not a spec file
_SPEC_KEYS = frozenset({"slug", "layout", "id_column", "sample_submission", "submission", "recipe"})


def find_specs(folders: list[Path]) -> list[FoundSpec]:
    """The spec files directly in ``folders`` (``*.toml`` that name a spec field), loaded but not
    registered; a file that fails to load carries the one-line reason."""
    found = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise PipelineError(f"{folder} is not a folder; give folders that hold spec files (*{SUFFIX})")
        for path in sorted(folder.glob(f"*{SUFFIX}")):
            try:
                table = _read_table(path)
                if not _SPEC_KEYS & table.keys():
                    continue
                found.append(FoundSpec(path, spec_from_table(table, str(path), spec_file=str(path.resolve()))))
            except PipelineError as exc:
                found.append(FoundSpec(path, None, str(exc)))
    return found


def competition_of(name: str) -> Competition:
    """The competition a run or a command names: a registered slug, or a spec file's path (loaded).

    A run of a spec file stores the file's absolute path (config.json's
    ``config.competition``), so any later process (a torchrun worker, report,
    kernel) finds it this way.
    """
    import competitions  # noqa: F401  (fills the registry with the built-in competitions)

    return load_spec(name) if looks_like_spec(name) else registry.get_competition(name)


def spec_from_table(table: dict[str, Any], where: str, spec_file: str = "") -> Competition:
    """Build a Competition from a parsed spec file (``where`` names it in errors); not registered.

    ``spec_file`` is recorded as the competition's ``spec_file`` (default: ``where``).
    """
    fields = spec_fields()
    values = {k: v for k, v in table.items() if k not in ("recipe", "recipes")}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise PipelineError(f"{where}: unknown field(s) {', '.join(unknown)}; valid fields: "
                            f"{', '.join(sorted(fields))}, and the tables [recipe] and [recipes.NAME]")
    required = [name for name, f in fields.items() if _required(f)] + ["recipe"]
    missing = [name for name in required if name not in table]
    if missing:
        raise PipelineError(f"{where}: missing field(s) {', '.join(missing)}; set them (`pipeline init` writes them all)")
    for name, value in values.items():
        values[name] = _checked(where, name, value)
    recipe = _recipe(where, "recipe", table["recipe"])
    named = table.get("recipes", {})
    if not isinstance(named, dict):
        raise PipelineError(f"{where}: recipes must be tables [recipes.NAME]")
    recipes = {name: _recipe(where, f"recipes.{name}", body) for name, body in named.items()}
    try:
        return Competition(**values, recipe=recipe, recipes=recipes, spec_file=spec_file or where)
    except PipelineError as exc:
        raise PipelineError(f"{where}: {exc}") from None


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _checked(where: str, name: str, value: Any) -> Any:
    """One top-level value with the type its field takes: strings, image_size an int, mean/std 3 numbers."""
    if name in ("mean", "std"):
        ok = isinstance(value, list) and len(value) == 3 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        if not ok:
            raise PipelineError(f"{where}: {name} must be three numbers (RGB, 0-1), e.g. [0.5, 0.5, 0.5]; got {value!r}")
        return tuple(float(v) for v in value)
    if name == "image_size":
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise PipelineError(f"{where}: image_size must be a whole number of pixels >= 1, got {value!r}")
        return value
    if name in _LISTS:
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise PipelineError(f"{where}: {name} must be a list of column names, e.g. [\"a\", \"b\"]; got {value!r}")
        return tuple(value)
    if name in _NUMBERS:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise PipelineError(f"{where}: {name} must be a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise PipelineError(f"{where}: {name} must be a string in quotes, got {value!r}")
    return value


_LISTS = frozenset(f.name for f in dataclasses.fields(Competition) if str(f.type).startswith("tuple[str"))
_NUMBERS = frozenset(f.name for f in dataclasses.fields(Competition) if str(f.type) == "float")


def _recipe(where: str, name: str, body: Any) -> Recipe:
    if not isinstance(body, dict):
        raise PipelineError(f"{where}: {name} must be a table [{name}] of training settings")
    try:
        return Recipe(**body)
    except PipelineError as exc:
        raise PipelineError(f"{where}: [{name}]: {exc}") from None


def _register(comp: Competition) -> None:
    """Make ``get_competition`` return ``comp`` for its slug and its file's path for the rest of the process.

    A run stores the path (pipeline train's config), which train looks up again.
    """
    current = registry._REGISTRY.get(comp.slug)  # the registry offers no replace: a spec file may shadow a module
    if current is not None and not current.spec_file and current != comp:
        log.warning("warning: %s takes the place of the registered competition %r for this command",
                    comp.spec_file, comp.slug)
    registry._REGISTRY[comp.slug] = comp
    if comp.spec_file:
        registry._REGISTRY[comp.spec_file] = comp


# ---------------------------------------------------------------- writing

# Every top-level field in the order a spec file lists it, with what it means (declared with the field)
FIELD_HELP = tuple((f.name, f.metadata["help"]) for f in dataclasses.fields(Competition) if "help" in f.metadata)


def toml_value(value: Any) -> str:
    """One TOML value: strings quoted (JSON escapes are TOML's), booleans lower-case, lists inline."""
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value), ensure_ascii=False)


def render_spec(fields: dict[str, Any], why: dict[str, str], todo: dict[str, str], recipe: dict[str, Any],
                recipes: dict[str, dict[str, Any]], header: list[str]) -> str:
    """A commented spec file: each field with its meaning and why it has its value; TODO where unsure."""
    lines = [f"# {line}" for line in header] + [""]
    for name, meaning in FIELD_HELP:
        lines.append(f"# {name}: {meaning}")
        if name in todo:
            lines.append(f"# TODO check: {todo[name]}")
        if name in fields:
            reason = f"  # {why[name]}" if name in why else ""
            lines.append(f"{name} = {toml_value(fields[name])}{reason}")
        else:
            lines.append(f"# {name} = ")
    lines += ["", "# The default recipe: `pipeline train` settings (--lr is lr, --batch-size batch_size, ...);",
              "# options given to `pipeline train` override it. [recipes.NAME]: `pipeline train --recipe NAME`."]
    for title, table in (("recipe", recipe), *((f"recipes.{k}", v) for k, v in recipes.items())):
        lines += [f"[{title}]"] + [f"{k} = {toml_value(v)}" for k, v in table.items()] + [""]
    return "\n".join(lines) + "\n"
