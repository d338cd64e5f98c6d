"""SIGINT / SIGTERM end ``slope train`` cleanly: the current step finishes, a checkpoint is saved
and the run exits 0 with one line (schedulers send SIGTERM before preempting a job).

:class:`GracefulStop` installs the handlers (main thread only) and restores the previous ones on
exit. The first signal only sets :attr:`GracefulStop.signal_name`; a second one raises
``KeyboardInterrupt`` at once (saves are crash-safe, so even that loses no checkpoint). Under
``torchrun`` every rank gets the signal, not necessarily between the same two steps:
:meth:`GracefulStop.agreed`, called by every rank at every step boundary, makes them stop at the same one.

Used by ``slope train`` and by the fine-tuning loop (:func:`slope.finetune_run.run_resumable`:
``slope finetune``, ``slope sparse-finetune`` and the train stages of ``slope apply``).
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

    def agreed(self) -> str | None:
        """The name of the signal asking the run to stop, or ``None``, agreed over the ranks: in a process
        group of several ranks an all-reduce of the flag (collective: every rank calls it at every step
        boundary), so all stop at the first boundary where any rank has been signalled."""
        from slope.parallel import mean_over_ranks

        name = self.signal_name
        if mean_over_ranks(float(name is not None)) > 0:
            return name or "a signal to another rank"
        return None

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
