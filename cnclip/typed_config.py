"""Typed configuration from YAML: dataclasses filled strictly, with errors that name the key and the file.

One loader serves every config file a user writes: training recipes (`cnclip.recipe`), the zero-shot
command file and the `data_tools` filter file. A misspelt key would otherwise silently leave a
default in force, so an unknown key, a wrong type or a YAML tag is a `ConfigError` before any work
starts. Only `yaml.safe_load` is used: a `!!python/...` tag is refused, never run.

Accepted, because users expect them and nothing is lost: an int where a float is wanted, a
string that reads as a float ("1e-4", which YAML 1.1 leaves a string), and "a,b" on the command
line for a list. A bool is never taken as an int, and an int must fit in 64 bits (signed).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

# Every int key must fit the 64-bit integers that torch, numpy and our binary formats hold: a larger one
# would otherwise surface as an OverflowError (exit 1) deep inside the work instead of naming the key.
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1


def describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"list of {describe(typing.get_args(tp)[0])}"
    return "null" if tp is type(None) else tp.__name__


class _Empty:
    """A command-line override with nothing after `=`: null where the key accepts null (`data.generate=`,
    as an empty value is null in YAML), else the empty string (`zeroshot.images=` clears a path)."""

    def __repr__(self) -> str:
        return "''"


EMPTY = _Empty()


def _accepts_none(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _coerce(value: Any, tp: Any, key: str, kind: str) -> Any:
    """`value` checked against the annotation `tp` (a nested dataclass is built recursively)."""
    if value is EMPTY:
        value = None if _accepts_none(tp) else ""
    if dataclasses.is_dataclass(tp):
        return build_config(tp, value, kind, prefix=f"{key}.")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key, kind)
            except ConfigError:
                if isinstance(value, dict) and dataclasses.is_dataclass(option):
                    raise  # a section (`Section | None`) given as a mapping: its own error names the bad key
                continue
    elif tp is type(None):
        if value is None:
            return None
    elif origin in (list, tuple):
        inner = typing.get_args(tp)[0]
        if isinstance(value, str):  # "query,value" on the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list):
            items = [_coerce(v, inner, key, kind) for v in value]
            return tuple(items) if origin is tuple else items
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not INT64_MIN <= value <= INT64_MAX:
                raise ConfigError(f"{kind} key '{key}': {value} is out of range (a 64-bit integer, "
                                  f"{INT64_MIN} to {INT64_MAX})")
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{kind} key '{key}': expected {describe(tp)}, got {value!r}")


def build_config(cls: type, raw: Any, kind: str, prefix: str = "") -> Any:
    """An instance of the dataclass `cls` from parsed YAML; `kind` ("recipe", "filter config") names it in errors."""
    if not isinstance(raw, dict):
        where = f"{kind} key '{prefix.rstrip('.')}'" if prefix else f"a {kind}"
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            raise ConfigError(f"unknown {kind} key '{prefix}{key}'; accepted keys here: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}", kind)
    return cls(**kwargs)


def read_yaml_mapping(path: str | Path, kind: str) -> dict:
    """A YAML file's top-level mapping (an empty file is {}); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{kind} file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: not a valid YAML {kind} ({exc})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a {kind} must be a mapping of keys, got {type(raw).__name__}")
    return raw


def load_config_file(cls: type, path: str | Path, kind: str) -> Any:
    """`read_yaml_mapping` + `build_config`, with the file's name on every error."""
    raw = read_yaml_mapping(path, kind)
    try:
        return build_config(cls, raw, kind)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
