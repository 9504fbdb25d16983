"""Stopping a run cleanly: SIGINT and SIGTERM set a flag that the loops check between batches.

Public names: StopFlag, Interrupted.

A loop that sees the flag saves what it must (a checkpoint) and raises KeyboardInterrupt; leaving the
`StopFlag` block, it comes out as `Interrupted`, whose ``signum`` the command line turns into its
exit status (130, 143). A second signal stops at once.
"""

from __future__ import annotations

import contextlib
import signal

__all__ = ["StopFlag", "Interrupted"]


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGINT or SIGTERM (``signum``), after saving its checkpoint."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loops check it between batches and stop cleanly.

    A KeyboardInterrupt leaving the block comes out as :class:`Interrupted` naming the signal.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def __call__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, _frame) -> None:
        if self.signum is not None:  # a second signal: stop at once
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopFlag:
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            if not isinstance(exc, Interrupted):
                raise Interrupted(self.signum or signal.SIGINT) from None
