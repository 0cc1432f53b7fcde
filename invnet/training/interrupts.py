"""Ctrl-C during `invnet.fit` without half-recorded epochs.

A ``KeyboardInterrupt`` may land at any bytecode. During the optimizer steps that is what a
user wants (the epoch stops at the last completed step, see `invnet.training.epoch`), but
between an epoch's last step and the end of its bookkeeping (history, best parameters,
checkpoints) it would leave the parameters one epoch ahead of the history, and a resume
would replay that epoch. `Guard` holds an interrupt that arrives inside such a *critical*
stretch and raises it when the stretch ends, with everything recorded.

It works by installing a SIGINT handler for the duration of `fit`, and only when Python's
default handler is in place and `fit` runs in the main thread (elsewhere nothing changes:
signals reach the main thread only).
"""

from __future__ import annotations

import signal
import threading

__all__ = ["Guard"]


class Guard:
    """A context manager for the whole of `fit`; ``critical()`` starts a stretch that an
    interrupt must not split, ``settle()`` ends it (raising a held interrupt)."""

    def __init__(self):
        self.critical_now = False
        self.pending = False
        self._previous = None

    def __enter__(self) -> Guard:
        if (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        ):
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.critical_now:
            self.pending = True
            return
        raise KeyboardInterrupt

    def critical(self) -> None:
        self.critical_now = True

    def settle(self) -> None:
        self.critical_now = False
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt
