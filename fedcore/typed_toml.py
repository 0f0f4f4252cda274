"""TOML tables into frozen dataclasses of dataclasses, checked against the field annotations:
every key optional, unknown tables and keys refused, each value of the annotated type (a
`StrEnum` by its value, case-insensitively). Errors are ConfigErrors naming the source."""

from __future__ import annotations

import dataclasses
import enum
import math
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

from fedcore.errors import ConfigError

T = TypeVar("T")

# An enum-typed field's annotation name -> the enum and what to call it in errors.
Choices = dict[str, tuple[type[enum.StrEnum], str]]


def read_toml(path: str | Path, what: str) -> dict[str, Any]:
    """A TOML file's tables; ConfigError when it is missing or malformed."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what} file {path} does not exist") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML: {err}") from None


def replace_tables(base: T, raw: dict[str, Any], *, source: str, choices: Choices) -> T:
    """`base` (a dataclass whose fields are dataclasses, one per table) with the tables'
    given keys replaced."""
    sections = {f.name: f for f in fields(base)}  # type: ignore[arg-type]
    built: dict[str, Any] = {}
    for name, table in raw.items():
        if name not in sections:
            raise ConfigError(
                f"{source}: unknown table [{name}]; known tables: {', '.join(f'[{s}]' for s in sections)}"
            )
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: [{name}] must be a table")
        current = getattr(base, name)
        known = {f.name: f for f in fields(current)}
        values = {}
        for key, value in table.items():
            if key not in known:
                raise ConfigError(
                    f"{source}: unknown key {key!r} in [{name}]; known keys: {', '.join(known)}"
                )
            values[key] = _coerce(value, known[key].type, f"{source}: [{name}] {key}", choices)
        built[name] = dataclasses.replace(current, **values)
    return dataclasses.replace(base, **built)  # type: ignore[type-var]


def _coerce(value: Any, kind: Any, where: str, choices: Choices) -> Any:
    """Check a TOML value against a dataclass field's annotation (given as a string)."""
    kind = str(kind)
    optional = "None" in kind
    if value is None and optional:
        return None
    base = kind.replace(" | None", "")
    if base == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if base == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if base == "float":
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if base == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    if base in ("tuple[str, ...]", "tuple[int, ...]"):
        item = str if "str" in base else int
        if not isinstance(value, list | tuple) or not all(
            isinstance(v, item) and not isinstance(v, bool) for v in value
        ):
            raise ConfigError(
                f"{where} must be a list of {'strings' if item is str else 'integers'}, got {value!r}"
            )
        return tuple(value)
    if base in ("dict[str, tuple[str, ...]]", "dict[str, tuple[float, ...]]"):
        item_kind = base.removeprefix("dict[str, ").removesuffix("]")
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table of lists, got {value!r}")
        return {str(k): _coerce(v, item_kind, f"{where}.{k}", choices) for k, v in value.items()}
    if base == "tuple[float, ...]":
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} must be a list of numbers, got {value!r}")
        return tuple(_coerce(v, "float", where, choices) for v in value)
    if base in choices:
        choice, what = choices[base]
        try:
            return choice(str(value).lower())
        except ValueError:
            options = ", ".join(c.value for c in choice)
            raise ConfigError(f"{where} = {value!r} is not a {what}; choose one of: {options}") from None
    raise AssertionError(f"unhandled field type {kind}")
