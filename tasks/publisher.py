"""Publish running jobs' events from one background thread per process.

Generation must not wait on Redis round trips: `emit` only hands the event over; one sender thread
per process sends whatever every job emitted since its last send in ONE pipelined round trip, one
command per job (`EventLog.append_many`: the job's events in order, each its own stream entry,
since each entry's id is an SSE id a client may resume from). A worker running several jobs at
once (a batching engine gives each a token per step) thus makes one round trip per send, not one
per job. llama.cpp releases the GIL while it computes, so the sender's work overlaps the model's.

Sends are at least `interval` apart (`LOCALQ_STREAM_INTERVAL`), unless something waits on one:
a job's first output (the time to first token is never held back; the role chunk just before it
goes in the same send), any event that is not a delta (a status, a progress step), and a job
closing. Later tokens go together:
one round trip, one read by the API and one write to the client carry several, as vLLM's
`--stream-interval` does in tokens. On a small machine every wake-up of the sender, Redis, the
API and the client is time taken from the model's own threads. A held send goes with the next
event after the interval (so sends fall right after an engine step, when the model's threads
wait for the next batch, not in the middle of one), once the burst of that step's events has
paused for `GATHER`; a producer slower than that waits at most two intervals.

Each send also reads, for the jobs in it, their cancel flag (`cancel_key`): a streaming job's
cancel check (`tasks.cancel_check`) then needs no round trip of its own.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from store.events import EventLog, appended
from store.metrics import carries_output

GATHER = 0.001  # seconds without a new event that end one engine step's burst of them


class BackgroundPublisher:
    """One job's events, sent in order by the process's shared sender; `close()` flushes them."""

    def __init__(self, events: EventLog, job_id: str, *, skip_deltas: int = 0, cancel_key: str | None = None,
                 cancel_every: float = 0.025):
        self.events = events
        self.job_id = job_id
        # after a redelivery, the first attempt's deltas are already in the log: don't repeat them
        self.skip_deltas = skip_deltas
        self.result: Any = None
        # the job's cancel flag, read along with a send at most every `cancel_every` seconds
        self.cancel_key = cancel_key
        self.cancel_every = cancel_every
        self._cancel_read: tuple[float, bool] | None = None  # (monotonic time of the send, the flag)
        # guarded by the sender's lock: events handed over, events sent (or dropped), the failure,
        # whether an event with output was handed over yet (the first one is urgent)
        self._emitted = 0
        self._handled = 0
        self._error: BaseException | None = None
        self._output = False
        # the log position of the last event this publisher wrote: a log found shorter lost events
        # in a Redis failover, which the next send marks for its readers (`EventLog.append_after`)
        self.position: int | None = None

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

    def cancel_seen(self, max_age: float) -> bool | None:
        """The cancel flag as a send read it within the last `max_age` seconds; None if none did."""
        read = self._cancel_read
        if read is None or time.monotonic() - read[0] > max_age:
            return None
        return read[1]

    def _cancel_due(self, now: float) -> bool:
        return self.cancel_key is not None and (
            self._cancel_read is None or now - self._cancel_read[0] >= self.cancel_every)


class Sender:
    """Sends what every job emitted since the last send, in one round trip per Redis client.

    One job's failure (a command Redis refuses, data that is not JSON) stops only that job's events:
    once one of its batches failed, its later ones are dropped rather than sent with a gap.
    """

    def __init__(self, interval: float = 0.0):
        self.interval = interval  # seconds between sends, unless one is urgent
        lock = threading.Lock()
        self._work = threading.Condition(lock)  # something to send
        self._sent = threading.Condition(lock)  # a send finished
        self._pending: dict[BackgroundPublisher, list[tuple[str, Any]]] = {}  # in the order jobs emitted
        self._urgent = False  # something pending must not wait for the interval
        self._puts = 0  # events handed over so far (tells a burst from a pause)
        self._last_put = -float("inf")  # when the last one was
        self._last_send = -float("inf")
        self._thread: threading.Thread | None = None  # started by the first event: most jobs that
        # answer in one piece (embeddings, tokenize) never need it

    def put(self, publisher: BackgroundPublisher, event: tuple[str, Any]) -> None:
        with self._work:
            publisher._emitted += 1
            self._puts += 1
            self._last_put = time.monotonic()
            self._pending.setdefault(publisher, []).append(event)
            type_, data = event
            if type_ != "delta":
                self._urgent = True
            elif not publisher._output and carries_output(data):  # the first output (with what came before)
                self._urgent = publisher._output = True
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="publish-events", daemon=True)
                self._thread.start()
            self._work.notify()

    def wait_sent(self, publisher: BackgroundPublisher) -> None:
        """Until the events the publisher emitted so far are sent: at most the send in flight and the next."""
        with self._sent:
            target = publisher._emitted
            if publisher._handled < target:
                self._urgent = True  # its job is ending: its last events go now
                self._work.notify()
            self._sent.wait_for(lambda: publisher._handled >= target)

    def _hold(self) -> None:
        """Wait (the lock held) until what is pending should go: see the module's docstring."""
        while not self._urgent and self.interval > 0:
            now = time.monotonic()
            due = self._last_send + self.interval
            if now >= due + self.interval:  # a producer slower than the interval
                return
            if now >= due and self._last_put >= due:  # an event came after the interval: its burst
                seen = self._puts
                self._work.wait(GATHER)
                if self._puts == seen:
                    return
                continue
            self._work.wait(due + self.interval - now)  # until an event comes, or two intervals

    def _run(self) -> None:
        while True:
            with self._work:
                self._work.wait_for(lambda: self._pending)
                self._hold()
                batches, self._pending = self._pending, {}
                self._urgent = False
                self._last_send = time.monotonic()
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
    """One round trip per Redis client (in practice one): each job's batch as one command, and
    the cancel flag of each job whose last reading is due.

    A lone batch with no flag to read goes as a plain command; anything more on one pipeline,
    whose per-command errors fail only their own job. A lost connection (after the client's own
    retries) fails them all.
    """
    now = time.monotonic()
    by_client: dict[int, list[tuple[BackgroundPublisher, list]]] = {}
    for publisher, events in batches.items():
        if publisher._error is None:  # a job that failed sends nothing more: no gap in its log
            by_client.setdefault(id(publisher.events.client), []).append((publisher, events))
    for group in by_client.values():
        if len(group) == 1 and not group[0][0]._cancel_due(now):
            publisher, events = group[0]
            try:
                publisher.position = publisher.events.append_after(publisher.job_id, events, publisher.position)[1]
            except Exception as err:  # reported by close()
                publisher._error = err
            continue
        pipe = group[0][0].events.client.pipeline(transaction=False)
        queued: list[tuple[BackgroundPublisher, bool]] = []  # and whether its flag is read after it
        for publisher, events in group:
            try:
                publisher.events.append_after(publisher.job_id, events, publisher.position, pipe=pipe)
            except Exception as err:  # its data could not be encoded: nothing of it was queued
                publisher._error = err
                continue
            reads_flag = publisher._cancel_due(now)
            if reads_flag:
                pipe.exists(publisher.cancel_key)
            queued.append((publisher, reads_flag))
        commands = sum(1 + reads_flag for _, reads_flag in queued)
        try:
            replies = iter(pipe.execute(raise_on_error=False) if queued else [])
        except Exception as err:
            replies = iter([err] * commands)
        for publisher, reads_flag in queued:
            reply = next(replies)
            if isinstance(reply, Exception):
                publisher._error = reply
            else:
                publisher.position = appended(reply)[1]
            if reads_flag:
                flag = next(replies)
                if not isinstance(flag, Exception):
                    publisher._cancel_read = (now, bool(flag))


_sender: Sender | None = None
_sender_lock = threading.Lock()


def sender() -> Sender:
    """This process's sender (built on first use; `configure` sets its interval)."""
    global _sender
    if _sender is None:
        with _sender_lock:
            if _sender is None:
                _sender = Sender(_interval)
    return _sender


_interval = 0.0


def configure(interval: float) -> None:
    """Seconds between this process's sends (`LOCALQ_STREAM_INTERVAL`), for its sender now or to come."""
    global _interval
    _interval = interval
    if _sender is not None:
        _sender.interval = interval


def _forget_after_fork() -> None:
    """A forked child (a prefork pool process) has none of its parent's threads: it builds its own."""
    global _sender, _sender_lock
    _sender, _sender_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)
