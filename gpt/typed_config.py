"""Typed configs from plain dicts: ``from_dict`` builds any of our config dataclasses (the training
run's in ``gpt.config``, the generation and serving ones in ``gpt.infer.config``, the commands' and
evaluations') from the resolved dict a command composed, checking each value against its annotation;
``check_ranges`` and ``finite`` are what their ``__post_init__`` checks ranges with. Unknown keys,
wrong types and impossible values raise ``ConfigError`` naming the key and the fix.

    from gpt.typed_config import from_dict
    cfg = from_dict(SampleConfig, {"ckpt": "out/run", "temperature": 0})   # ints become floats

Also here: the repository root, the user-path rule every command follows (``resolve_path``) and the
one compute-dtype vocabulary (``Dtype``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from gpt.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
# the compute dtype a user may name: its one check (gpt.device.resolve_dtype trusts it)
Dtype = Literal["auto", "fp32", "bf16", "fp16"]


def resolve_path(path: str | Path) -> Path:
    """A user path as given; a relative path that does not exist from the working directory is
    also looked up from the repository root, so the shipped ``data/...`` works from anywhere."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists() or any(ch in str(p) for ch in "*?["):
        return p
    alt = REPO_ROOT / p
    return alt if alt.exists() else p


T = TypeVar("T")


def finite(x: float) -> bool:
    """Not NaN, not infinite."""
    return x == x and abs(x) != float("inf")


def check_ranges(prefix: str, obj: Any, checks: list[tuple[str, bool, str]]) -> None:
    """Raise ConfigError naming the first key of ``checks`` (name, ok, valid range) that fails."""
    for name, ok, why in checks:
        if not ok:
            raise ConfigError(f"{prefix}{name}={getattr(obj, name)!r} is out of range: {why}")


def _check_value(key: str, tp: Any, value: Any) -> Any:
    """Check (and lightly coerce: int -> float) one value against its annotation."""
    origin = get_origin(tp)
    args = get_args(tp)
    if value is None and type(None) not in args:  # a preset's null for a key that must be given
        raise ConfigError(f"missing mandatory value {key}: set it on the command line ({key}=...)")
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(key, arg, value)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}={value!r} must be one of {list(get_args(tp))}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} must be a list")
        return [_check_value(f"{key}[{i}]", get_args(tp)[0], v) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a group of keys, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} must be a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r} must be a string")
        return value
    return value


def from_dict(cls: type[T], d: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a plain dict, rejecting unknown keys and wrong types."""
    if d is None:
        d = {}
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; valid keys under "
            f"'{prefix.rstrip('.') or 'the top level'}': {', '.join(names)}"
        )
    kwargs = {k: _check_value(f"{prefix}{k}", hints[k], v) for k, v in d.items()}
    return cls(**kwargs)
