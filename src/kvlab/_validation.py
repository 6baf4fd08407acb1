"""What every configuration class shares: `ConfigError` (one line naming the field and the fix) and the
small checks behind it (unknown fields, strict constructors, integer and number tests)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any

from kvlab.errors import KvlabError


class ConfigError(KvlabError):
    """A user mistake in a configuration; the message is one line naming the field and the fix."""


def _reject_unknown_fields(cls, d: dict[str, Any], what: str) -> None:
    """One-line ConfigError for keys of d that are not fields of dataclass cls (a typo in a JSON config)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown {what} field(s) {unknown}; known fields: {sorted(known)}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _strict_init(cls):
    """A dataclass whose constructor refuses unknown or extra arguments with one ConfigError line
    (`ModelConfig(foo=1)`), where the generated __init__ raises a TypeError."""
    init = cls.__init__
    signature = inspect.signature(init)
    known = [f.name for f in dataclasses.fields(cls) if f.init]

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        try:
            signature.bind(self, *args, **kwargs)
        except TypeError as e:
            unknown = sorted(set(kwargs) - set(known))
            what = f"unknown field(s) {unknown}" if unknown else str(e)
            raise ConfigError(f"{cls.__name__}: {what}; known fields: {', '.join(known)}") from None
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


def _divisors(n: int) -> str:
    ds = [d for d in range(1, n + 1) if n % d == 0]
    return ", ".join(map(str, ds[:-1])) + f" or {ds[-1]}" if len(ds) > 1 else str(n)
