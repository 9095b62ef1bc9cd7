"""The hard time limit of a worker that runs its jobs in threads.

A prefork worker's main process kills a pool process whose job passed its hard time limit. A
worker with several job slots runs its jobs as threads of one process, and a thread cannot be
killed: a job stuck in native code past its hard limit (its soft limit already asked it to stop,
`tasks.cancel_check`) makes the whole worker exit instead. Its supervisor (`localq worker`,
`localq up`) starts it again under the same name, the successor puts the unacknowledged messages
back (`tasks.worker_signals`), and a job that keeps doing it is failed after `max_deliveries`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

EXIT_CODE = 70  # EX_SOFTWARE: the supervisor restarts the worker


class HardLimitWatchdog:
    """Every `interval` seconds, looks at `running()` ({job id: monotonic time its hard limit
    passes}); calls `stop(job_id)` (default: exit the process) for the first job past it."""

    def __init__(self, running: Callable[[], dict[str, float]], interval: float = 1.0,
                 stop: Callable[[str], None] | None = None):
        self._running = running
        self._interval = interval
        self._stop = stop or _exit
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="hard-limit-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._halt.set()

    def _watch(self) -> None:
        while not self._halt.wait(self._interval):
            now = time.monotonic()
            late = [job_id for job_id, limit in list(self._running().items()) if now >= limit]
            if late:
                self._stop(late[0])
                return


def _exit(job_id: str) -> None:
    log.critical("job %s ran past its hard time limit and does not stop: the worker exits, and its "
                 "supervisor starts it again", job_id)
    logging.shutdown()
    os._exit(EXIT_CODE)
