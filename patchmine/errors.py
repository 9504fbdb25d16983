"""Errors that mean "the user asked for something that cannot be done" (CLI exit status 2).

Public names: UsageError, UnknownNameError, nearest.

Anything else that escapes is an internal failure (exit status 1).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["UsageError", "UnknownNameError", "nearest"]


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
