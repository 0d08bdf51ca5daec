"""Config loading: YAML file + dotted ``section.key=value`` overrides -> a validated :class:`Config`.

Errors are :class:`ConfigError` with one line that names the key (and the closest valid key), the
expected type and the value, or the file (and line) of a YAML problem.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from dist_hrnas.config import schema
from dist_hrnas.errors import ConfigError

class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` as a float (PyYAML's YAML 1.1 rules need ``1.0e-4``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def yaml_load(text: str) -> Any:
    """Parse YAML the way config files and overrides are parsed."""
    return yaml.load(text, Loader=_Loader)


SECTIONS: list[str] = [f.name for f in dataclasses.fields(schema.Config) if f.name != "name"]
_SECTION_TYPES = typing.get_type_hints(schema.Config)


def _all_keys() -> list[str]:
    keys = []
    for section in SECTIONS:
        cls = _SECTION_TYPES[section]
        keys += [f"{section}.{f.name}" for f in dataclasses.fields(cls)]
    return keys


def _unknown(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, _all_keys(), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]}?" if close else f"; valid sections: {', '.join(SECTIONS)}"
    return ConfigError(f"unknown config key {key}{hint}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_type(key: str, value: Any, tp: Any) -> Any:
    """Return ``value`` converted to ``tp`` (int -> float only) or raise a one-line ConfigError."""
    origin = typing.get_origin(tp)

    def bad() -> ConfigError:
        return ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")

    if origin in (typing.Union, types.UnionType):          # "float | None": None means "not set"
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(tp)):
            return None
        for arg in args:  # "int | str": the first that takes the value
            try:
                return _check_type(key, value, arg)
            except ConfigError:
                pass
        raise bad()
    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad()
        return value
    if tp is list or origin is list:
        if not isinstance(value, list):
            raise bad()
        args = typing.get_args(tp)
        if args:
            return [_check_type(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise bad()
        return value
    raise TypeError(f"unsupported config field type {tp} for {key}")


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (pass an existing YAML file to --config)")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {err.start}): save it as UTF-8 YAML") from None
    try:
        data = yaml_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: YAML syntax error: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model:, data:, train:, ...) "
                          f"at the top level, got {type(data).__name__}")
    return data


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """Set ``a.b.0.c`` inside nested dicts/lists, creating dict levels under a section as needed."""
    parts = dotted.split(".")
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        here = ".".join(parts[: i + 1])
        if isinstance(node, list):
            node = node[_list_index(here, part, node)]
        elif isinstance(node, dict):
            if part not in node or node[part] is None:
                node[part] = {}
            node = node[part]
        else:
            raise ConfigError(f"{here} is a {type(node).__name__}, cannot set {dotted}")
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(dotted, last, node)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"{'.'.join(parts[:-1])} is a {type(node).__name__}, cannot set {dotted}")


def _list_index(key: str, part: str, node: list) -> int:
    if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
        raise ConfigError(f"{key}: index {part} out of range for a list of {len(node)}")
    return int(part)


def parse_override(item: str) -> tuple[str, Any]:
    """``section.key=value`` -> (dotted key, YAML-parsed value)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not section.key=value (e.g. train.epochs=2)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if "." not in key:
        raise ConfigError(f"override {item!r}: key must be section.key (e.g. train.{key})")
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not valid YAML: take it as the plain string the user typed
    return key, value


def build_config(raw: dict, name: str = "default") -> schema.Config:
    """Turn a nested mapping into a validated :class:`Config`."""
    sections = {}
    for section, values in raw.items():
        if section not in SECTIONS:
            raise _unknown(str(section))
        cls = _SECTION_TYPES[section]
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(f"{section}: expected a mapping of keys, got {values!r}")
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in values.items():
            if key not in names:
                raise _unknown(f"{section}.{key}")
            kwargs[key] = _check_type(f"{section}.{key}", value, hints[key])
        sections[section] = cls(**kwargs)
    return schema.Config(**sections, name=name)


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> schema.Config:
    """Load ``path`` (or the defaults when None), apply dotted overrides, validate."""
    raw: dict = {}
    name = "default"
    if path is not None:
        raw = _read_yaml(Path(path))
        name = Path(path).stem
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, value = parse_override(item)
        section, field_name = key.split(".")[:2]
        if section not in SECTIONS:
            raise _unknown(key)
        if field_name not in {f.name for f in dataclasses.fields(_SECTION_TYPES[section])}:
            raise _unknown(f"{section}.{field_name}")
        if key.count(".") > 1 and field_name not in (raw.get(section) or {}):
            # Indexing into a list (or a nested dict) that the file did not set: start from the default.
            default = getattr(_SECTION_TYPES[section](), field_name)
            raw.setdefault(section, {})
            if raw[section] is None:
                raw[section] = {}
            raw[section][field_name] = copy.deepcopy(default)
        raw.setdefault(section, {})
        if raw[section] is None:
            raw[section] = {}
        _set_dotted(raw, key, value)
    return build_config(raw, name=name)


def save_config(cfg: schema.Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (loadable again by :func:`load_config`)."""
    data = cfg.to_dict()
    data.pop("name", None)
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))


def describe_fields() -> str:
    """Every config key with its type, default and documentation (for --help-config)."""
    lines = []
    for section in SECTIONS:
        cls = _SECTION_TYPES[section]
        lines.append(f"{section}:  {cls.__doc__.strip()}")
        hints = typing.get_type_hints(cls)
        default = cls()
        for f in dataclasses.fields(cls):
            lines.append(f"  {section}.{f.name} ({_type_name(hints[f.name])}, default "
                         f"{getattr(default, f.name)!r}): {f.metadata.get('doc', '')}")
    return "\n".join(lines)
