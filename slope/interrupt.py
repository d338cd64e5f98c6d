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
import time

__all__ = ["GracefulStop"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)


#: A repeat of the first signal within this many seconds is the same request, not a second one:
#: launchers deliver one signal twice (GNU ``timeout`` to its child and to the child's group).
REPEAT_WINDOW_S = 1.0


class GracefulStop:
    """``with GracefulStop() as stop: ... if stop.signal_name: save and leave``.

    Nested scopes share the outermost one (``__enter__`` returns it), so a command may listen across
    more than its training loop (``slope apply`` across its stages, a fine-tuning run across its final
    save) while the loop inside still asks :meth:`agreed`."""

    def __init__(self):
        self.signal_name: str | None = None
        self._first_at = 0.0
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        name, now = signal.Signals(signum).name, time.monotonic()
        if self.signal_name is not None:
            if name == self.signal_name and now - self._first_at < REPEAT_WINDOW_S:
                return  # the first one, delivered twice
            raise KeyboardInterrupt(f"second {name}")
        self.signal_name, self._first_at = name, now

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
            outer = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
            if isinstance(outer, GracefulStop):
                return outer  # an enclosing scope listens already
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
