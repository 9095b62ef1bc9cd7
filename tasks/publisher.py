"""Publish a running job's events from a background thread.

Generation must not wait on Redis round trips: `emit` only puts the event on an in-process queue;
one thread sends whatever has accumulated in a single pipelined round trip, in order. llama.cpp
releases the GIL while it computes, so the thread's work overlaps the model's.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

from store.events import EventLog

_STOP = object()


class BackgroundPublisher:
    def __init__(self, events: EventLog, job_id: str, *, skip_deltas: int = 0):
        self.events = events
        self.job_id = job_id
        # after a redelivery, the first attempt's deltas are already in the log: don't repeat them
        self.skip_deltas = skip_deltas
        self.result: Any = None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None  # started by the first event: most jobs that
        # answer in one piece (embeddings, tokenize) never need it

    def emit(self, type_: str, data: Any = None) -> None:
        if type_ == "delta" and self.skip_deltas > 0:
            self.skip_deltas -= 1
            return
        if type_ == "result":
            # held back: the task records the final status first, then publishes the result, so
            # whoever sees the result event also sees a finished job record
            self.result = data
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"publish-{self.job_id}", daemon=True)
            self._thread.start()
        self._queue.put((type_, data))

    def close(self) -> None:
        """Send everything emitted so far, then stop the thread; re-raise a publishing failure."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch = [self._queue.get()]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if batch[-1] is _STOP:
                stopping = True
                batch.pop()
            if batch and self._error is None:
                try:
                    self.events.append_many(self.job_id, batch)
                except BaseException as err:  # reported by close()
                    self._error = err
