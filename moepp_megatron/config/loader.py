"""YAML -> typed config, with ``base:`` inheritance and dotted command-line overrides.

A preset names the file(s) it extends with ``base: other.yaml`` or ``base: [a.yaml,
b.yaml]`` (relative to itself; later ones win) and states only what differs. Overrides look
like ``model.moe.tau=0.5``; values are parsed as YAML scalars, so ``null``, ``true``,
``1e-4`` and ``[1, 0]`` work (``1e-4`` is a float here, in files too). An unknown key or a
wrong type is an error naming its dotted path and the file, or the override, it came from;
an override into a section no file sets keeps that section's other defaults.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Sequence, TypeVar

import yaml

from moepp_megatron.config.packaged import find_config
from moepp_megatron.config.schema import RunConfig

T = TypeVar("T")


def load_config(paths: str | Path | Sequence[str | Path], overrides: Iterable[str] = ()) -> RunConfig:
    """Read run config file(s) (following ``base:`` links; later files win) and apply
    dotted overrides, e.g. a model preset, then a recipe, then ``data.root=...``. A file
    not in the working directory is looked up among the packaged configs
    (:func:`~moepp_megatron.config.packaged.find_config`): ``moepp-0.6b-8+4e`` is a preset."""
    return load_typed(RunConfig, paths, overrides)


def load_typed(cls: type[T], paths: str | Path | Sequence[str | Path], overrides: Iterable[str] = ()) -> T:
    """:func:`load_config` for any config dataclass ``cls``."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    data: dict = {}
    for path in paths:
        data = _merge(data, _read_with_bases(find_config(path), seen=()))
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"override {item!r}: expected dotted.key=value")
        value = _parse_scalar(raw)
        _check_override(cls, key, value, item)
        section = key.split(".")[0]
        if "." in key and section not in data:
            # A section the files do not have: start from its defaults, not from nothing.
            data[section] = to_dict(_default_of(cls, section))
        _set_dotted(data, key, value)
    return from_dict(cls, data, where=" + ".join(map(str, paths)))


class _Loader(yaml.SafeLoader):
    """YAML as people write it: PyYAML follows YAML 1.1, which reads ``3e-4`` (no dot) as
    a string; here it is the float it looks like, in files and overrides alike."""


class _Dumper(yaml.SafeDumper):
    """Writes what :class:`_Loader` reads back: a string such as ``"3e-4"`` gets quotes."""


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?[eE][-+]?\d+$"),
        list("-+0123456789."),
    )


def to_yaml(data: Any, flow: bool = False) -> str:
    """``data`` (plain values, e.g. :func:`to_dict`'s) as YAML that the loader reads back
    unchanged, keys in their given order; ``flow`` writes it on one line."""
    text = yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=flow, width=float("inf"))
    return text.removesuffix("...\n").rstrip("\n") if flow else text


def resolved_config_yaml(config: RunConfig) -> str:
    """Every field of ``config`` as one YAML file, sections in schema order, that
    :func:`load_config` reads back to an equal config (no ``base:``, no defaults left out)."""
    return to_yaml(to_dict(config))


def _parse_scalar(raw: str) -> Any:
    return yaml.load(raw, Loader=_Loader)


def _default_of(cls: type, name: str) -> Any:
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


def _check_override(cls: type, dotted: str, value: Any, item: str) -> None:
    """The override's key exists and its value has the field's type; errors name the
    override, not the config file it lands on."""
    where = f"override {item!r}"
    node = cls
    *parents, leaf = dotted.split(".")
    for depth, part in enumerate(parents + [leaf]):
        fields = {f.name for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else set()
        if part not in fields:
            known = f"; valid: {sorted(fields)}" if fields else ""
            raise ValueError(f"{where}: unknown config key {'.'.join(dotted.split('.')[:depth + 1])}{known}")
        node = typing.get_type_hints(node)[part]
    if dataclasses.is_dataclass(node):
        from_dict(node, value, where, f"{dotted}.")
    else:
        _check_type(value, node, dotted, where)


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
        data = yaml.load(f, Loader=_Loader) or {}
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
    elif hint is int and isinstance(value, float) and value.is_integer():
        return int(value)  # train_tokens: 1e12
    elif hint in (bool, str) and isinstance(value, hint):
        return value
    raise ValueError(f"{where}: {name}={value!r} must be of type {getattr(hint, '__name__', hint)}")
