"""Range checks the config sections run in ``__post_init__`` (each raises one :class:`ConfigError` line that
names the key, the allowed range and the value), and ``documented``, the field every section's keys are made with."""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import field
from typing import Any

from dist_hrnas.errors import ConfigError


def choice(section: str, key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{section}.{key}: {value!r} is not one of {', '.join(choices)}")


def positive(section: str, key: str, value: float, allow_zero: bool = False) -> None:
    if not value >= 0 or (value == 0 and not allow_zero):   # "not >=" also catches NaN
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{section}.{key}: must be {bound}, got {value}")


def at_least(section: str, key: str, value: float, low: float) -> None:
    if not value >= low:
        raise ConfigError(f"{section}.{key}: must be >= {low:g}, got {value}")


def between(section: str, key: str, value: float, low: float, high: float, high_open: bool = True,
             low_open: bool = False) -> None:
    """``value`` in [low, high) (or the bounds' other openness); the message shows the interval."""
    ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ConfigError(f"{section}.{key}: must be in {interval}, got {value}")


def each_at_least(section: str, key: str, values: list, low: int) -> None:
    for i, v in enumerate(values):
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise ConfigError(f"{section}.{key}[{i}]: must be an integer >= {low}, got {v!r}")


def finite(section: object, name: str) -> None:
    """No float field (or list of floats) of a section may be NaN or infinite (YAML reads .nan and .inf)."""
    for f in dataclasses.fields(section):  # type: ignore[arg-type]
        value = getattr(section, f.name)
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{name}.{f.name}: must be a finite number, got {value}")


def documented(default: Any, doc: str) -> Any:
    """A dataclass field with a default (copied when mutable) and its documentation."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})
