"""One way to parse a mode name into its enum, for every mode enum of the memory (pure Python)."""

from __future__ import annotations

import enum
from typing import TypeVar

E = TypeVar("E", bound=enum.Enum)


def parse_enum(cls: type[E], value: str | E, what: str) -> E:
    """``value`` as a member of ``cls`` (by its value, case-insensitive, surrounding spaces ignored).

    Raises:
      ValueError: "unknown WHAT 'value'; allowed: a, b, ..." naming the bad value and every allowed one.
    """
    if isinstance(value, cls):
        return value
    try:
        return cls(str(value).strip().lower())
    except ValueError:
        raise ValueError(f"unknown {what} {value!r}; allowed: {', '.join(m.value for m in cls)}") from None
