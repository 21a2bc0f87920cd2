"""Typed configs: dataclasses filled from YAML files and dotted command-line overrides.

Every stage has one config dataclass. `load_config(cls, path, overrides)` reads a YAML file,
applies overrides such as `train.lr=1e-4`, checks every key and type against the dataclass
(unknown key, wrong type, out-of-range value: a `ConfigError` naming the dotted key) and then
calls each section's `validate()`, so a bad config fails before any work starts.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A config that cannot be run: the message names the key and what is wrong."""


def load_config(cls, path: str | Path | None = None, overrides: typing.Sequence[str] = ()):
    """Build `cls` from a YAML file (optional) and `key.sub=value` overrides, then validate."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    for item in overrides:
        _apply_override(data, item)
    cfg = from_dict(cls, data)
    validate(cfg)
    return cfg


def _apply_override(data: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    key, _, raw = item.partition("=")
    value = yaml.safe_load(raw) if raw.strip() else ""
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
    node[parts[-1]] = value


def from_dict(cls, data: dict, prefix: str = ""):
    """Recursively convert a mapping into dataclass `cls`, checking keys and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    removed = [k for k in unknown if k in getattr(cls, "REMOVED_KEYS", {})]
    if removed:  # a key older configs still carry: say why it went, not just that it is unknown
        raise ConfigError("; ".join(f"{prefix}{k} was removed: {cls.REMOVED_KEYS[k]}; delete it from the config"
                                    for k in removed))
    if unknown:
        names = ", ".join(prefix + k for k in unknown)
        raise ConfigError(f"unknown config key(s): {names} (known here: {', '.join(sorted(fields))})")
    kwargs = {name: _convert(hints[name], value, prefix + name) for name, value in data.items()}
    return cls(**kwargs)


def _convert(tp, value, key: str):
    origin, args = get_origin(tp), get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, key + ".")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {tp}")
    if origin is Literal:
        if isinstance(value, bool) and ("yes" if value else "no") in args:
            value = "yes" if value else "no"  # YAML 1.1 reads a bare no/yes as a boolean
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_convert(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported config type {tp}")


def validate(cfg, prefix: str = "") -> None:
    """Run `validate()` on `cfg` and on every nested section, naming the section on error."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            validate(value, prefix + f.name + ".")
    check = getattr(cfg, "validate", None)
    if check is not None:
        try:
            check()
        except ConfigError as err:
            raise ConfigError(f"{prefix}{err}" if prefix and not str(err).startswith(prefix) else str(err)) from None


def require(condition: bool, message: str) -> None:
    """Raise a ConfigError with `message` unless `condition` holds (used by validate())."""
    if not condition:
        raise ConfigError(message)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg, path: str | Path) -> None:
    """Write the resolved config (YAML), so a run directory says exactly what made it."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def config_json(cfg) -> str:
    return json.dumps(to_dict(cfg), sort_keys=True)
