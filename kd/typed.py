"""Dataclasses from plain data (YAML): every key checked against the fields, every value coerced to its type.

Generic over any tree of dataclasses; `kd.config` uses it for the one Config. An unknown key is an error
naming the key, a close match if there is one, and the valid keys; a wrong type names the key and value.
A boolean given for a choice that has "auto" and "off" (a former on/off switch) reads as "auto" / "off".
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from enum import Enum
from typing import Any, Literal, Union

from kd.errors import ConfigError


class Vocabulary(str, Enum):
    """A closed set of words a record or a row stores as its plain value: printed, formatted, hashed and compared as
    that string (so "completed" finds Outcome.COMPLETED in a dict, a set or pandas' isin), read back by `coerce`."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    def __hash__(self) -> int:
        return hash(str(self.value))


def build(cls: type, raw: Any, prefix: str, source: str) -> Any:
    """An instance of dataclass `cls` from a mapping, checking keys and coercing values recursively."""
    section = prefix.rstrip(".")
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: '{section}' must be a mapping of keys, got {raw!r}")
    kwargs = {}
    for key, value in raw.items():
        check_key(cls, str(key), section, source)
        kwargs[key] = coerce(hints(cls)[key], value, f"{prefix}{key}", source)
    return cls(**kwargs)


def set_dotted(root: type, raw: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    """Set `a.b.c` in the plain data for dataclass `root`, checking each part names a field."""
    node = raw
    parts = dotted.split(".")
    cls: type | None = root
    for i, part in enumerate(parts[:-1]):
        check_key(cls, part, ".".join(parts[:i]), source)
        cls = dataclass_in(hints(cls)[part]) if cls else None
        if cls is None:
            raise ConfigError(f"{source}: '{'.'.join(parts[:i + 1])}' is a value, not a section, in key '{dotted}'")
        child = node.get(part)
        if isinstance(child, str):  # shorthand for the section's first field, e.g. data.train: path
            child = {dataclasses.fields(cls)[0].name: child}
        elif not isinstance(child, dict):
            child = {}
        node[part] = child
        node = child
    check_key(cls, parts[-1], ".".join(parts[:-1]), source)
    node[parts[-1]] = value


def scalar_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of a dataclass tree that holds a value rather than a section."""
    keys = []
    for f in dataclasses.fields(cls):
        inner = dataclass_in(hints(cls)[f.name])
        if inner is not None:
            keys.extend(scalar_keys(inner, f"{prefix}{f.name}."))
        else:
            keys.append(prefix + f.name)
    return keys


def check_key(cls: type | None, key: str, section: str, source: str) -> None:
    if cls is None:
        return
    names = [f.name for f in dataclasses.fields(cls)]
    if key not in names:
        where = f"'{section}.{key}'" if section else f"'{key}'"
        close = difflib.get_close_matches(key, names, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        scope = f"in '{section}'" if section else "at the top level"
        raise ConfigError(f"{source}: unknown key {where}{hint}; valid keys {scope}: {', '.join(names)}")


_HINTS: dict[type, dict[str, Any]] = {}


def hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def dataclass_in(hint: Any) -> type | None:
    """The dataclass inside a hint such as `X` or `X | None`, else None."""
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return hint
    if _is_union(hint):
        for arg in typing.get_args(hint):
            if isinstance(arg, type) and dataclasses.is_dataclass(arg):
                return arg
    return None


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (Union, types.UnionType)


def coerce(hint: Any, value: Any, key: str, source: str) -> Any:
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{source}: '{key}' must be {expected}, got {value!r}")

    if _is_union(hint):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        if bool in args and str in args:  # pretrained: bool or path
            if isinstance(value, (bool, str)):
                return value
            raise bad("true, false or a file path")
        inner = [a for a in args if a is not type(None)]
        return coerce(inner[0], value, key, source)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if isinstance(value, str):  # shorthand: a bare string sets the first field
            value = {dataclasses.fields(hint)[0].name: value}
        return build(hint, value, key + ".", source)
    if isinstance(hint, type) and issubclass(hint, Enum):
        try:
            return hint(value)
        except ValueError:
            raise bad("one of " + ", ".join(str(m.value) for m in hint)) from None
    origin = typing.get_origin(hint)
    if origin is Literal:
        options = typing.get_args(hint)
        if value not in options and "auto" in options and "off" in options:
            value = _legacy_switch(value)  # a switch that became auto/.../off: true is auto, false is off
        if value not in options:
            raise ConfigError(f"{source}: '{key}' must be one of {', '.join(map(str, options))}; got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise bad("a list")
        (item,) = typing.get_args(hint) or (Any,)
        return [coerce(item, v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad("a mapping")
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is not Any:
            return {k: coerce(args[1], v, f"{key}.{k}", source) for k, v in value.items()}
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise bad("true or false")
    if hint is int:
        if isinstance(value, bool):
            raise bad("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise bad("an integer")
    if hint is float:
        if isinstance(value, bool):
            raise bad("a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise bad("a number")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad("a string")
    return value


def _legacy_switch(value: Any) -> Any:
    """An older config's boolean for a setting that is now a choice with "auto" and "off": true -> "auto"
    (what true used to mean: on where it helps), false -> "off"; any other value unchanged."""
    if isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    if isinstance(value, bool):
        return "auto" if value else "off"
    return value
