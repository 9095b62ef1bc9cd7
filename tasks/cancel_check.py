"""The cancel question a running job asks between tokens or steps, cheap enough to ask often.

It also keeps the job's soft time limit. A prefork worker gets Celery's SoftTimeLimitExceeded
from a signal; a worker with several job slots runs its jobs in threads, where Celery enforces no
time limit, so the job stops itself at the same points it would stop for a cancel.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class CancelCheck:
    """Callable: True once `ask()` (a Redis lookup) has said so, or once `deadline` (a
    `time.monotonic()` value) has passed (then `timed_out` is true too). Asks at most every
    `interval` seconds, and never again after a yes, so a tight token loop costs no extra round trips.
    `read_at`: when the job last read its flag (and found none) some other way; the first ask
    waits an interval from then."""

    def __init__(self, ask: Callable[[], bool], interval: float, deadline: float | None = None, *,
                 read_at: float | None = None):
        self._ask = ask
        self._interval = interval
        self._deadline = deadline
        self._next = 0.0 if read_at is None else read_at + interval
        self.cancelled = False
        self.timed_out = False

    def __call__(self) -> bool:
        now = time.monotonic()
        if not self.cancelled and self._deadline is not None and now >= self._deadline:
            self.cancelled = self.timed_out = True
        if not self.cancelled and now >= self._next:
            self._next = now + self._interval
            self.cancelled = bool(self._ask())
        return self.cancelled


def soft_deadline(request, default: float, started: float | None = None) -> float:
    """When a task started at `started` (monotonic, default now) must stop: its own soft time limit
    as sent (`request.timelimit`: hard, soft), else `default` seconds."""
    limits = getattr(request, "timelimit", None) or (None, None)
    soft = limits[1] if len(limits) > 1 and limits[1] else default
    return (time.monotonic() if started is None else started) + float(soft)
