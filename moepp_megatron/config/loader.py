"""YAML -> typed config, with ``base:`` inheritance and dotted command-line overrides.

A preset names the file(s) it extends with ``base: other.yaml`` or ``base: [a.yaml,
b.yaml]`` (relative to itself; later ones win) and states only what differs. Overrides look like ``model.moe.tau=0.5``; values are parsed as
YAML scalars, so ``null``, ``true``, ``1e-4`` and ``[1, 0]`` work. An unknown key anywhere
is an error naming its dotted path and the file it came from.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Sequence, TypeVar

import yaml

from moepp_megatron.config.schema import RunConfig

T = TypeVar("T")


def load_config(paths: str | Path | Sequence[str | Path], overrides: Iterable[str] = ()) -> RunConfig:
    """Read run config file(s) (following ``base:`` links; later files win) and apply
    dotted overrides, e.g. a model preset, then a recipe, then ``data.root=...``."""
    return load_typed(RunConfig, paths, overrides)


def load_typed(cls: type[T], paths: str | Path | Sequence[str | Path], overrides: Iterable[str] = ()) -> T:
    """:func:`load_config` for any config dataclass ``cls``."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    data: dict = {}
    for path in paths:
        data = _merge(data, _read_with_bases(Path(path), seen=()))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r}: expected dotted.key=value")
        _set_dotted(data, key.strip(), yaml.safe_load(raw))
    return from_dict(cls, data, where=" + ".join(map(str, paths)))


def to_dict(config: Any) -> dict:
    """The plain-data form of a config (what gets printed and saved with checkpoints)."""
    return dataclasses.asdict(config)


def _read_with_bases(path: Path, seen: tuple[Path, ...]) -> dict:
    path = path.resolve()
    if path in seen:
        raise ValueError(f"{path}: circular 'base:' chain {' -> '.join(map(str, seen))}")
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level must be a mapping")
    bases = data.pop("base", None) or []
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged = _merge(merged, _read_with_bases(path.parent / base, seen + (path,)))
    return _merge(merged, data)


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {dotted}: {part} is not a section")
    node[leaf] = value


def from_dict(cls: type[T], data: dict, where: str, prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, rejecting keys the dataclass does not have."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: {prefix or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        names = ", ".join(prefix + k for k in unknown)
        raise ValueError(f"{where}: unknown config key(s) {names}; valid: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(hint, value, where, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_type(value, hint, f"{prefix}{name}", where)
    return cls(**kwargs)


def _check_type(value: Any, hint: Any, name: str, where: str) -> Any:
    """Accept ``value`` if it fits ``hint`` (ints widen to floats); else a clear error."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _check_type(value, option, name, where)
            except ValueError:
                continue
        raise ValueError(f"{where}: {name}={value!r} does not match {hint}")
    if origin is typing.Literal:
        if value in typing.get_args(hint):
            return value
        raise ValueError(f"{where}: {name}={value!r} must be one of {typing.get_args(hint)}")
    if origin is list:
        (item_hint,) = typing.get_args(hint)
        if isinstance(value, list) and dataclasses.is_dataclass(item_hint):
            return [from_dict(item_hint, v, where, f"{name}[{i}].") for i, v in enumerate(value)]
        if isinstance(value, list):
            return [_check_type(v, item_hint, f"{name}[]", where) for v in value]
        raise ValueError(f"{where}: {name}={value!r} must be a list")
    if hint is type(None):
        if value is None:
            return None
    elif hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif hint in (bool, str) and isinstance(value, hint):
        return value
    raise ValueError(f"{where}: {name}={value!r} must be of type {getattr(hint, '__name__', hint)}")
