"""Errors that mean "the user asked for something that cannot be done" (CLI exit status 2).

Public names: UsageError, UnknownNameError, nearest, differences.

Anything else that escapes is an internal failure (exit status 1).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping

__all__ = ["UsageError", "UnknownNameError", "nearest", "differences"]


class UsageError(ValueError):
    """Bad input from the user: the message says what was wrong and how to fix it."""


class UnknownNameError(UsageError, KeyError):
    """A model, layer or other name that does not exist; the message lists the nearest valid ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def nearest(name: str, choices: Iterable[str], n: int = 5) -> list[str]:
    """The valid names closest to a mistyped one, best first."""
    choices = list(choices)
    close = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    if len(close) < n:
        low = name.lower()
        close += [c for c in choices if low in c.lower() and c not in close][: n - len(close)]
    return close


def differences(saved: Mapping, now: Mapping, keys: Iterable[str] | None = None) -> list[str]:
    """The settings that differ between a saved state (a checkpoint, a file's attributes) and now.

    Args:
        saved, now: setting name -> value; a name missing on one side counts as None there.
        keys: the names to compare, in the order to report them (default: those of ``now``).

    Returns:
        The names whose values differ, compared as plain data: tuples and numpy arrays equal the
        lists they hold, numpy scalars the numbers.

    Example:
        >>> differences({"k": 3, "layers": ("a",)}, {"k": 4, "layers": ["a"]})
        ['k']
    """
    return [
        key
        for key in (now if keys is None else keys)
        if _plain(saved.get(key)) != _plain(now.get(key))
    ]


def _plain(v):
    if hasattr(v, "tolist"):  # numpy arrays and scalars, without importing numpy here
        v = v.tolist()
    if isinstance(v, (list, tuple)):
        return [_plain(a) for a in v]
    return v
