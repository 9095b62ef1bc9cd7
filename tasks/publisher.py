"""Publish running jobs' events from one background thread per process.

Generation must not wait on Redis round trips: `emit` only hands the event over; one sender thread
per process sends whatever every job emitted since its last send in ONE pipelined round trip, one
command per job (`EventLog.append_many`: the job's events in order, each its own stream entry,
since each entry's id is an SSE id a client may resume from). A worker running several jobs at
once (a batching engine gives each a token per step) thus makes one round trip per send, not one
per job. llama.cpp releases the GIL while it computes, so the sender's work overlaps the model's.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from store.events import EventLog


class BackgroundPublisher:
    """One job's events, sent in order by the process's shared sender; `close()` flushes them."""

    def __init__(self, events: EventLog, job_id: str, *, skip_deltas: int = 0):
        self.events = events
        self.job_id = job_id
        # after a redelivery, the first attempt's deltas are already in the log: don't repeat them
        self.skip_deltas = skip_deltas
        self.result: Any = None
        # guarded by the sender's lock: events handed over, events sent (or dropped), the failure
        self._emitted = 0
        self._handled = 0
        self._error: BaseException | None = None

    def emit(self, type_: str, data: Any = None) -> None:
        if type_ == "delta" and self.skip_deltas > 0:
            self.skip_deltas -= 1
            return
        if type_ == "result":
            # held back: the task records the final status first, then publishes the result, so
            # whoever sees the result event also sees a finished job record
            self.result = data
            return
        sender().put(self, (type_, data))

    def close(self) -> None:
        """Wait until everything this job emitted so far is sent; re-raise its publishing failure."""
        if self._emitted:
            sender().wait_sent(self)
        if self._error is not None:
            raise self._error


class Sender:
    """Sends what every job emitted since the last send, in one round trip per Redis client.

    One job's failure (a command Redis refuses, data that is not JSON) stops only that job's events:
    once one of its batches failed, its later ones are dropped rather than sent with a gap.
    """

    def __init__(self):
        lock = threading.Lock()
        self._work = threading.Condition(lock)  # something to send
        self._sent = threading.Condition(lock)  # a send finished
        self._pending: dict[BackgroundPublisher, list[tuple[str, Any]]] = {}  # in the order jobs emitted
        self._thread: threading.Thread | None = None  # started by the first event: most jobs that
        # answer in one piece (embeddings, tokenize) never need it

    def put(self, publisher: BackgroundPublisher, event: tuple[str, Any]) -> None:
        with self._work:
            publisher._emitted += 1
            self._pending.setdefault(publisher, []).append(event)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="publish-events", daemon=True)
                self._thread.start()
            self._work.notify()

    def wait_sent(self, publisher: BackgroundPublisher) -> None:
        """Until the events the publisher emitted so far are sent: at most the send in flight and the next."""
        with self._sent:
            target = publisher._emitted
            self._sent.wait_for(lambda: publisher._handled >= target)

    def _run(self) -> None:
        while True:
            with self._work:
                self._work.wait_for(lambda: self._pending)
                batches, self._pending = self._pending, {}
            try:
                send(batches)
            except BaseException as err:  # a bug, not Redis: fail this round's jobs, keep the sender
                for publisher in batches:
                    publisher._error = publisher._error or err
            with self._sent:
                for publisher, events in batches.items():
                    publisher._handled += len(events)
                self._sent.notify_all()


def send(batches: dict[BackgroundPublisher, list[tuple[str, Any]]]) -> None:
    """One round trip per Redis client (in practice one): each job's batch as one command.

    A lone batch goes as a plain command; several go on one pipeline, whose per-command errors
    fail only their own job. A lost connection (after the client's own retries) fails them all.
    """
    by_client: dict[int, list[tuple[BackgroundPublisher, list]]] = {}
    for publisher, events in batches.items():
        if publisher._error is None:  # a job that failed sends nothing more: no gap in its log
            by_client.setdefault(id(publisher.events.client), []).append((publisher, events))
    for group in by_client.values():
        if len(group) == 1:
            publisher, events = group[0]
            try:
                publisher.events.append_many(publisher.job_id, events)
            except Exception as err:  # reported by close()
                publisher._error = err
            continue
        pipe = group[0][0].events.client.pipeline(transaction=False)
        queued = []
        for publisher, events in group:
            try:
                publisher.events.append_many(publisher.job_id, events, pipe=pipe)
                queued.append(publisher)
            except Exception as err:  # its data could not be encoded: nothing of it was queued
                publisher._error = err
        try:
            replies = pipe.execute(raise_on_error=False) if queued else []
        except Exception as err:
            replies = [err] * len(queued)
        for publisher, reply in zip(queued, replies, strict=True):
            if isinstance(reply, Exception):
                publisher._error = reply


_sender: Sender | None = None
_sender_lock = threading.Lock()


def sender() -> Sender:
    """This process's sender (built on first use)."""
    global _sender
    if _sender is None:
        with _sender_lock:
            if _sender is None:
                _sender = Sender()
    return _sender


def _forget_after_fork() -> None:
    """A forked child (a prefork pool process) has none of its parent's threads: it builds its own."""
    global _sender, _sender_lock
    _sender, _sender_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)
