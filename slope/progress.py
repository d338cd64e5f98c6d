"""Progress with rate and ETA for slope's long loops (train, eval, generate, oneshot, sparse-finetune).

One object, three displays (``display``):

- ``"bar"``: a tqdm bar on stderr (count, rate, elapsed, ETA, ``key=value`` postfix);
- ``"lines"``: no redraws (CI logs, files): a plain line through ``log`` at most every ``interval_s``
  seconds, and a last one at :meth:`Progress.close` if any was printed —
  ``slope eval: 6/8 batches (75%) | 2.41 batches/s | 00:02 elapsed | ETA 00:01 | loss=4.82``;
  ``interval_s=None``: never (the caller prints its own lines and appends :meth:`Progress.eta`);
- ``"off"``: nothing.

``"auto"`` is ``"bar"`` when stderr is a terminal and ``"lines"`` otherwise. The environment variable
``SLOPE_PROGRESS_INTERVAL`` (seconds) overrides the default interval of the plain lines.
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator

__all__ = ["DISPLAYS", "Progress", "clock", "display_for", "iterate"]

DISPLAYS = ("auto", "bar", "lines", "off")
DEFAULT_INTERVAL_S = 30.0


def _stderr_line(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def display_for(progress: bool | None) -> str:
    """The usual ``progress`` argument: ``None`` → ``"auto"``, ``True`` → ``"bar"``, ``False`` → ``"off"``."""
    return "auto" if progress is None else ("bar" if progress else "off")


def clock(seconds: float) -> str:
    """``mm:ss``, or ``h:mm:ss`` from an hour on (tqdm's format); ``?`` when unknown."""
    if seconds != seconds or seconds in (float("inf"), float("-inf")) or seconds < 0:
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def _interval_from_env(value: str) -> float:
    from slope.config import ConfigError

    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise ConfigError(f"SLOPE_PROGRESS_INTERVAL={value!r} is not a number of seconds >= 0; unset it or give e.g. 10")
    return seconds


class Progress:
    """Progress of ``total`` units (``unit``, e.g. "step"), starting from ``initial`` (a resumed run).

    ``update(n, **postfix)`` counts ``n`` more units; ``postfix`` (e.g. ``loss="4.82"``) is shown
    after the bar / at the end of a plain line. ``write(line)`` prints a line without breaking the
    bar (``log`` otherwise). The rate counts only units done since construction, so a resumed run's
    ETA is not fooled by its first steps.
    """

    def __init__(self, total: int, desc: str, *, unit: str = "it", initial: int = 0, display: str = "auto",
                 interval_s: float | None = DEFAULT_INTERVAL_S, log: Callable[[str], None] = _stderr_line):
        if display not in DISPLAYS:
            raise ValueError(f"display {display!r} is not one of {', '.join(DISPLAYS)}")
        if display == "auto":
            display = "bar" if sys.stderr.isatty() else "lines"
        if interval_s is not None and "SLOPE_PROGRESS_INTERVAL" in os.environ:
            interval_s = _interval_from_env(os.environ["SLOPE_PROGRESS_INTERVAL"])
        self.total, self.desc, self.unit, self.display = int(total), desc, unit, display
        self.initial = self.done = int(initial)
        self.interval_s, self.log = interval_s, log
        self.postfix: dict[str, object] = {}
        self.start = self._last_line = time.perf_counter()
        self._lines, self._last_done = 0, self.done
        self._bar = None
        if display == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, initial=self.done, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr)

    # ------------------------------------------------------------------ numbers
    @property
    def _units(self) -> str:
        return self.unit + ("es" if self.unit.endswith(("s", "x", "ch", "sh")) else "s")

    def rate(self) -> float:
        """Units per second since construction (0 before the first unit)."""
        seconds = time.perf_counter() - self.start
        return (self.done - self.initial) / seconds if seconds > 0 else 0.0

    def eta(self) -> str:
        """Time left at the current rate, as :func:`clock` text."""
        rate = self.rate()
        return clock((self.total - self.done) / rate) if rate > 0 else "?"

    def status(self) -> str:
        """``6/8 batches (75%) | 2.41 batches/s | 00:02 elapsed | ETA 00:01 | key=value ...``."""
        rate = self.rate()
        if rate >= 1 or rate == 0:
            speed = f"{rate:,.2f} {self._units}/s"
        else:
            speed = f"{1 / rate:.2f} s/{self.unit}"
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        parts = [f"{self.done}/{self.total} {self._units}{pct}", speed, f"{clock(time.perf_counter() - self.start)} elapsed"]
        if self.done < self.total:
            parts.append(f"ETA {self.eta()}")
        parts += [f"{key}={value}" for key, value in self.postfix.items()]
        return " | ".join(parts)

    # ------------------------------------------------------------------ display
    def update(self, n: int = 1, **postfix) -> None:
        self.done += n
        if postfix:
            self.postfix = postfix
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(n)
        elif self.display == "lines" and self.interval_s is not None:
            now = time.perf_counter()
            if now - self._last_line >= self.interval_s:
                self._last_line, self._last_done = now, self.done
                self._lines += 1
                self.log(f"{self.desc}: {self.status()}")

    def write(self, line: str) -> None:
        """Print ``line`` (a log line) above the bar, or through ``log``."""
        if self._bar is not None:
            self._bar.write(line)
        else:
            self.log(line)

    def close(self) -> None:
        """Finish the bar, or print the last plain line if any came before it."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._lines and self._last_done != self.done:
            self.log(f"{self.desc}: {self.status()}")
        self._lines = 0

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def iterate(items: Iterable, desc: str, *, unit: str = "it", total: int | None = None, **kwargs) -> Iterator:
    """Yield ``items``, counting one unit per item after its work (``kwargs``: :class:`Progress`'s)."""
    items = list(items) if total is None else items
    with Progress(len(items) if total is None else total, desc, unit=unit, **kwargs) as progress:
        for item in items:
            yield item
            progress.update(1)
