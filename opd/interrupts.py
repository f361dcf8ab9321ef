"""Interrupts that save: SIGINT (Ctrl-C) and SIGTERM (a scheduler's kill) end a run cleanly.

The first signal asks the run to stop after the step in progress: the loop then writes a
checkpoint of that step, the summary and the report, and prints the exact ``--resume`` command.
A second SIGINT aborts at once (:class:`RunAborted`, a ``KeyboardInterrupt`` naming the run folder),
for when saving is not wanted; the checkpoints already written stay intact (they are written
atomically), and ``opd distill`` ends with one line saying so and how to resume.

Handlers are installed only in the main thread (Python allows no other) and restored on exit.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Callable

__all__ = ["RunAborted", "StopRequest"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunAborted(KeyboardInterrupt):
    """A second Ctrl-C: the run stopped at once, without saving the step in progress. ``run_dir`` is
    the run's folder (None when not known), whose checkpoints already written are intact."""

    def __init__(self, run_dir: Path | None = None):
        super().__init__("a second Ctrl-C stopped the run at once, without saving the step in progress; what was "
                         "written before is intact")
        self.run_dir = run_dir


class StopRequest:
    """Context manager: ``requested`` holds the name of the first signal received (or None).

    ``run_dir``: the run's folder, carried by :class:`RunAborted` when a second Ctrl-C aborts."""

    def __init__(self, echo: Callable[[str], None] | None = print, *, run_dir: Path | None = None):
        self.requested: str | None = None
        self.signum: int | None = None
        self._echo = echo
        self._run_dir = run_dir
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise RunAborted(self._run_dir)  # second Ctrl-C: abort without saving
        if self.requested is None:
            self.requested, self.signum = signal.Signals(signum).name, signum
            if self._echo is not None:
                self._echo(f"opd: {self.requested} received: finishing the current step, then saving a checkpoint "
                           "(press Ctrl-C again to abort without saving)")

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + signal number."""
        return 128 + (self.signum or 0)
