"""Progress of long work (training, feature computation, model forward passes, drift permutation
tests): a log line at least every ``interval_s`` seconds, for the Dagster run log, and a tqdm bar on
standard error, for whoever watches a terminal.

    with ProgressReporter("image features", total=len(images), unit="image", log=context.log.info)
        as progress:
        for chunk in chunks:
            ...
            progress.update(len(chunk))

A line is due when the time since the last one plus the typical duration of one update would pass
``interval_s``, so on steady work the gap between lines stays under the interval instead of
drifting just past it. Work that finishes within the interval logs nothing but its last line.

One long library call that reports nothing itself (alibi-detect's MMD permutation test) runs
inside :func:`heartbeat` instead: a helper thread logs how long it has been running at the same
interval, and a last line says how long it took.

``CIFAR_PROGRESS_BAR=0`` turns the bars off (log lines stay): for CI logs, or a terminal that
renders carriage returns badly.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any, Self

BAR_ENV = "CIFAR_PROGRESS_BAR"
DEFAULT_INTERVAL_S = 10.0


def bars_enabled() -> bool:
    """False when ``CIFAR_PROGRESS_BAR`` is 0, false, no or off."""
    return os.environ.get(BAR_ENV, "1").strip().lower() not in {"0", "false", "no", "off"}


def progress_bar(total: int, what: str, unit: str, initial: int = 0) -> Any:
    """A tqdm bar on standard error, or None when bars are off."""
    if not bars_enabled():
        return None
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=what,
        unit=unit,
        file=sys.stderr,
        mininterval=1.0,
        dynamic_ncols=True,
        leave=False,
    )


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class ProgressReporter:
    """Counts ``update(n)`` calls towards ``total``; see the module docstring."""

    def __init__(
        self,
        what: str,
        total: int,
        unit: str = "item",
        log: Callable[[str], None] | None = None,
        interval_s: float = DEFAULT_INTERVAL_S,
        bar: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if total < 0:
            raise ValueError(f"ProgressReporter({what!r}): total={total} must be 0 or more.")
        if interval_s <= 0:
            raise ValueError(f"ProgressReporter({what!r}): interval_s={interval_s} must be > 0.")
        self.what, self.total, self.unit = what, total, unit
        self.log, self.interval_s, self.clock = log, interval_s, clock
        self.done = 0
        self.updates = 0
        self.started = self.last_line = clock()
        show_bar = bars_enabled() if bar is None else bar
        self._bar = progress_bar(total, what, unit) if show_bar else None
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.done += n
        self.updates += 1
        if self._bar is not None:
            self._bar.update(n)
        if self.log is None:
            return
        now = self.clock()
        per_update = (now - self.started) / self.updates
        if now - self.last_line + per_update >= self.interval_s and self.done < self.total:
            self.last_line = now
            self.log(self.message(now))

    def message(self, now: float | None = None) -> str:
        """``what: done/total units (share), rate, time left``."""
        now = self.clock() if now is None else now
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        share = f" ({100.0 * self.done / self.total:.0f}%)" if self.total else ""
        text = f"{self.what}: {self.done:,}/{self.total:,} {self.unit}s{share}, {rate:,.1f} {self.unit}s/s"
        if 0 < self.done < self.total:
            text += f", about {_duration((self.total - self.done) / rate)} left"
        return text

    def close(self) -> None:
        """Close the bar and log the final line (once)."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        if self.log is not None:
            elapsed = self.clock() - self.started
            self.log(
                f"{self.what}: {self.done:,}/{self.total:,} {self.unit}s in {_duration(elapsed)}"
            )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if kind is None:
            self.close()
        else:
            # Leave no half-drawn bar behind; the error says what happened, not a done line.
            self._closed = True
            if self._bar is not None:
                self._bar.close()


@contextmanager
def heartbeat(
    what: str,
    log: Callable[[str], None] | None,
    interval_s: float = DEFAULT_INTERVAL_S,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[None]:
    """Log ``what: running for ...`` every ``interval_s`` while the block runs, from a helper
    thread (the block's own work stays on the calling thread), then ``what: done in ...``.
    With ``log`` None the block just runs."""
    if log is None:
        yield
        return
    if interval_s <= 0:
        raise ValueError(f"heartbeat({what!r}): interval_s={interval_s} must be > 0.")
    started = clock()
    finished = threading.Event()

    def beat() -> None:
        while not finished.wait(interval_s):
            log(f"{what}: running for {_duration(clock() - started)}")

    thread = threading.Thread(target=beat, name=f"heartbeat: {what}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        finished.set()
        thread.join()
    log(f"{what}: done in {_duration(clock() - started)}")
