"""The checks behind :class:`zk0.config.RunConfig`: one run-config value at a time.

Each raises :class:`ConfigError` with a one-line message that names the key and what it must be, so a
bad ``--run-config`` stops a run before anything heavy is imported.
"""

from __future__ import annotations

import math
from typing import Any

MAX_INT = 10**9  # no count, seed or size of a run comes near this


class ConfigError(ValueError):
    """A run-config value that cannot be used; the message names the key and the fix."""


def at_least(low: int, **values: float) -> None:
    """Each value (named by its field) must be >= ``low``."""
    for name, value in values.items():
        if value < low:
            raise ConfigError(f"run-config {name.replace('_', '-')!r} must be >= {low}, got {value}")


def fractions(**values: float) -> None:
    """Each value (named by its field) must be in [0, 1]."""
    for name, value in values.items():
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"run-config {name.replace('_', '-')!r} must be in [0, 1], got {value}")


def positive(**values: float) -> None:
    """Each value (named by its field) must be > 0."""
    for name, value in values.items():
        if value <= 0:
            raise ConfigError(f"run-config {name.replace('_', '-')!r} must be > 0, got {value}")


def choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"run-config {key!r} must be one of {'|'.join(choices)}, got {value!r}")


def coerce(key: str, raw: Any, type_name: str) -> Any:
    """Convert a TOML value to the field's type, refusing lossy or surprising conversions.

    NaN and infinities are refused: ``max-update-norm=nan`` would silently turn a check off and
    ``lr=nan`` would fail every client. Integers are bounded so a mistyped count cannot start a
    run that never ends.
    """
    if type_name == "bool":
        if isinstance(raw, bool):
            return raw
    elif type_name == "int":
        if isinstance(raw, int) and not isinstance(raw, bool):
            if abs(raw) > MAX_INT:
                raise ConfigError(f"run-config {key!r} is out of range: {raw} (at most {MAX_INT})")
            return raw
    elif type_name == "float":
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            if not math.isfinite(raw):
                raise ConfigError(f"run-config {key!r} must be a finite number, got {raw}")
            return float(raw)
    elif type_name == "str":
        if isinstance(raw, str):
            return raw
    raise ConfigError(f"run-config {key!r} must be {type_name}, got {raw!r} ({type(raw).__name__})")
