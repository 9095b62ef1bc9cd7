"""The delivery tags a worker's main process received, written to Redis off its event loop.

A successor of a killed worker puts its predecessor's unacknowledged messages back on their queues
by these tags (`tasks.worker_signals`). Writing a tag in Celery's `task_received` signal cost a
round trip in the event loop before every message was handed to the pool: on the time of the
job's first token, and of each message behind it when several came at once. One thread writes
them instead, all it has been given in one pipelined round trip. A worker killed in the
millisecond before its tag is written leaves that message to kombu's visibility timeout, as
before this log existed.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

import redis

log = logging.getLogger(__name__)


class DeliveryLog:
    """Remembers up to `keep()` recent tags in the list `key`; `add` never waits for Redis."""

    def __init__(self, client: Callable[[], redis.Redis], key: Callable[[], str], keep: Callable[[], int]):
        self._client = client
        self._key = key
        self._keep = keep
        self._tags: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def add(self, tag: str) -> None:
        self._tags.put(tag)
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="delivery-log", daemon=True)
                    self._thread.start()

    def _run(self) -> None:
        while True:
            tags = [self._tags.get()]
            while True:
                try:
                    tags.append(self._tags.get_nowait())
                except queue.Empty:
                    break
            self.write(tags)

    def write(self, tags: list[str]) -> None:
        try:
            key = self._key()
            pipe = self._client().pipeline(transaction=False)
            for tag in tags:
                pipe.lpush(key, tag)
            pipe.ltrim(key, 0, self._keep() - 1)
            pipe.execute()
        except Exception:  # noqa: BLE001 - the log is a head start for a successor, never the job's fate
            log.warning("%d delivery tag(s) not remembered", len(tags), exc_info=True)
