"""SIGINT / SIGTERM end ``slope train`` cleanly: the current step finishes, a checkpoint is saved
and the run exits 0 with one line (schedulers send SIGTERM before preempting a job).

:class:`GracefulStop` installs the handlers (main thread only) and restores the previous ones on
exit. The first signal only sets :attr:`GracefulStop.signal_name`; a second one raises
``KeyboardInterrupt`` at once (saves are crash-safe, so even that loses no checkpoint).
"""
from __future__ import annotations

import signal
import threading

__all__ = ["GracefulStop"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GracefulStop:
    """``with GracefulStop() as stop: ... if stop.signal_name: save and leave``."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        if self.signal_name is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}")
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
