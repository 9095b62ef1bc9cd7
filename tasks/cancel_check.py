"""The cancel question a running job asks between tokens or steps, cheap enough to ask often."""

from __future__ import annotations

import time
from collections.abc import Callable


class CancelCheck:
    """Callable: True once `ask()` (a Redis lookup) has said so. Asks at most every `interval`
    seconds, and never again after a yes, so a tight token loop costs no extra round trips."""

    def __init__(self, ask: Callable[[], bool], interval: float):
        self._ask = ask
        self._interval = interval
        self._next = 0.0
        self.cancelled = False

    def __call__(self) -> bool:
        now = time.monotonic()
        if not self.cancelled and now >= self._next:
            self._next = now + self._interval
            self.cancelled = bool(self._ask())
        return self.cancelled
