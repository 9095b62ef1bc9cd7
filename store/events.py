"""The job event channel: one Redis Stream per job.

PUBLISH/SUBSCRIBE is at-most-once: an event published before the API subscribes is gone. A stream
keeps every event (XADD) until its TTL, readers block for new ones (XREAD BLOCK) from any position,
and each event's stream id doubles as the SSE `id:`, so a client that reconnects with
`Last-Event-ID` resumes exactly after the last event it saw: no gap, no duplicate.

A reader may ride over Redis being away for a while (`follow(ride_over=...)`): a read that
fails for a dropped, refused or timed-out connection is tried again with backoff, and the reader
gets a quiet tick (None) between tries, as while it waits for events. A writer's retry is safe
too: a batch whose reply was lost, sent again, is not added twice (`append_many`).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple, TypeVar

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from store.spill import Spill

# Event types that end a job's log: readers stop after one of them.
TERMINAL = frozenset({"result", "error", "cancelled"})
# Failures worth trying again: Redis restarting, stalled or briefly unreachable.
TRANSIENT = (RedisConnectionError, RedisTimeoutError)
# Waits between tries while riding over: 0.1, 0.2, 0.4, 0.8 s, then 1 s each.
RIDE_OVER_BACKOFF = ExponentialBackoff(cap=1.0, base=0.05)

# A stream entry id: milliseconds and sequence number, each an unsigned 64-bit integer.
_EVENT_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")
_U64_MAX = 2**64 - 1

T = TypeVar("T")


def events_key(job_id: str) -> str:
    return f"localq:job:{job_id}:events"


def parse_event_id(value: str) -> tuple[int, int] | None:
    """`ms-seq` as two integers, ordered as Redis orders entries; None unless Redis could have made it."""
    match = _EVENT_ID.fullmatch(value)
    if not match:
        return None
    ms, seq = int(match[1]), int(match[2])
    return (ms, seq) if ms <= _U64_MAX and seq <= _U64_MAX else None


def valid_event_id(value: str) -> bool:
    return parse_event_id(value) is not None


class Patience:
    """One run of failed tries: the wait before the next one, until `seconds` after the first began."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.reset()

    def reset(self) -> None:
        self.give_up: float | None = None
        self.failures = 0

    def next_wait(self, started: float) -> float | None:
        """After a try begun at `started` (monotonic) failed: seconds to wait, or None to give up."""
        if self.give_up is None:
            self.give_up = started + self.seconds
        self.failures += 1
        left = self.give_up - time.monotonic()
        return min(RIDE_OVER_BACKOFF.compute(self.failures), left) if left > 0 else None


def ride_over(call: Callable[[], T], seconds: float) -> T:
    """`call()`, tried again with backoff while Redis is away, for up to `seconds` from the first failed try."""
    patience = Patience(seconds)
    while True:
        started = time.monotonic()
        try:
            return call()
        except TRANSIENT:
            wait = patience.next_wait(started)
            if wait is None:
                raise
            time.sleep(wait)


class Event(NamedTuple):
    id: str
    type: str
    raw: str  # the data as JSON text, exactly as the worker wrote it: relayed without re-encoding
    n: int | None = None  # its position in the log (1 for the first), if written with one

    @property
    def data(self) -> Any:
        return json.loads(self.raw)

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL


# Adds one batch of events, unless that very batch (its token) is the last one added: a writer
# whose reply was lost (a stalled Redis outlasting the socket timeout) sends the same batch again
# when it retries, and its events must not appear twice. KEYS: the log, its last-batch marker.
# ARGV: the TTL, the batch's token, the writer's last position ('' if it has none), then the type
# and data of each event. Each entry's `n` is its position in the log (1 for the first). A log
# shorter than the writer's last position lost entries (a Redis failover took back writes the old
# primary had acknowledged): a `lost` entry saying which positions goes first. Returns the entry
# ids, then the position of the last one.
_APPEND_ONCE = """
local prefix = ARGV[2] .. ' '
local marker = redis.call('GET', KEYS[2])
local out = {}
if marker and string.sub(marker, 1, #prefix) == prefix then
  for id in string.gmatch(string.sub(marker, #prefix + 1), '%S+') do out[#out + 1] = id end
  return out
end
local position = redis.call('XLEN', KEYS[1])
local expected = tonumber(ARGV[3])
if expected and expected > position then
  out[#out + 1] = redis.call('XADD', KEYS[1], '*', 'type', 'lost', 'n', position + 1,
                             'data', '{"after":' .. position .. ',"through":' .. expected .. '}')
  position = position + 1
end
for i = 4, #ARGV, 2 do
  position = position + 1
  out[#out + 1] = redis.call('XADD', KEYS[1], '*', 'type', ARGV[i], 'data', ARGV[i + 1], 'n', position)
end
out[#out + 1] = tostring(position)
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], prefix .. table.concat(out, ' '), 'EX', ARGV[1])
return out
"""


class EventLog:
    """A job's log lives `ttl` seconds from its last write while the job runs; the write of its
    terminal event gives it `resume_window` seconds more (if set), after which the finished job is
    only its record (`store.jobs`; `final_event` stands in for the log)."""

    def __init__(self, client: redis.Redis, ttl: float, resume_window: float | None = None,
                 spill: Spill | None = None):
        self.client = client
        self.spill = spill  # where a large result goes instead of Redis (`store.spill`)
        self.ttl = int(ttl)
        self.resume_window = max(1, int(resume_window)) if resume_window else None

    def append(self, job_id: str, type_: str, data: Any = None) -> str:
        return self.append_many(job_id, [(type_, data)])[-1]

    def append_many(self, job_id: str, events: Iterable[tuple[str, Any]], pipe=None) -> list[str]:
        """Add events in order in one round trip, and push the log's expiry forward; their ids.

        Sent again by a client's retry, the same call adds nothing more (see `_APPEND_ONCE`).
        With `pipe`, the command is only queued on it (and nothing is returned).
        """
        reply = self._append(job_id, events, pipe, None)
        return [] if reply is None else appended(reply)[0]

    def append_after(self, job_id: str, events: Iterable[tuple[str, Any]], last: int | None,
                     pipe=None) -> tuple[list[str], int] | None:
        """`append_many` for the log's one writer while a job runs, which knows the position of the
        last entry it wrote (`last`, None before its first): if the log holds fewer entries, a
        failover lost some, and a `lost` entry goes first. (ids, position of the last); with `pipe`
        None, and `appended(reply)` reads the pipeline's reply."""
        reply = self._append(job_id, events, pipe, last)
        return None if reply is None else appended(reply)

    def _append(self, job_id: str, events: Iterable[tuple[str, Any]], pipe, last: int | None):
        events = list(events)
        ends = self.resume_window is not None and any(type_ in TERMINAL for type_, _ in events)
        args: list[Any] = [self.resume_window if ends else self.ttl, uuid.uuid4().hex, "" if last is None else last]
        for type_, data in events:
            text = json.dumps(data, separators=(",", ":"))
            if type_ == "result" and self.spill is not None:
                text = self.spill.out(job_id, text)
            args += [type_, text]
        key = events_key(job_id)
        # EVAL, not EVALSHA: a retry after Redis restarted must not meet NOSCRIPT (in a pipeline,
        # redis-py loads scripts once, before its retries)
        reply = (self.client if pipe is None else pipe).eval(_APPEND_ONCE, 2, key, f"{key}:last-batch", *args)
        return None if pipe is not None else reply

    def read(self, job_id: str, after: str = "0-0", block_ms: int | None = None, count: int | None = None) -> list[Event]:
        reply = self.client.xread({events_key(job_id): after}, block=block_ms, count=count)
        return [self._event(entry_id, fields) for _, entries in reply or [] for entry_id, fields in entries]

    def all(self, job_id: str) -> list[Event]:
        return [self._event(entry_id, fields) for entry_id, fields in self.client.xrange(events_key(job_id))]

    def exists(self, job_id: str) -> bool:
        """Whether the job has a log (none yet, or no more once its resume window has passed)."""
        return bool(self.client.exists(events_key(job_id)))

    def last(self, job_id: str) -> Event | None:
        """The log's newest event (None while it is empty)."""
        entries = self.client.xrevrange(events_key(job_id), count=1)
        return self._event(*entries[0]) if entries else None

    def _event(self, entry_id, fields: dict) -> Event:
        event = _event(entry_id, fields)
        if self.spill is not None and event.type == "result":  # a large result: back from its file
            event = event._replace(raw=self.spill.back(event.raw) or "null")
        return event

    def follow(self, job_id: str, after: str = "0-0", block_ms: int = 1000,
               ride_over: float = 0.0) -> Iterator[Event | None]:
        """Every event after `after` as it arrives, until a terminal one; None each quiet `block_ms`
        (see `follow_reads`)."""
        for events in self.follow_reads(job_id, after, block_ms, ride_over):
            if events is None:
                yield None
            else:
                yield from events

    def follow_reads(self, job_id: str, after: str = "0-0", block_ms: int = 1000,
                     ride_over: float = 0.0) -> Iterator[list[Event] | None]:
        """The events after `after` as each read returns them (so a relay writes them at once), up to
        a terminal one; None each quiet `block_ms`.

        Reads that fail while Redis is away are tried again (a None between tries) for up to
        `ride_over` seconds from the first failed one; then the last error is raised. `block_ms` must stay below
        the client's socket timeout, or every quiet read would fail as a timeout.
        """
        patience = Patience(ride_over)
        while True:
            started = time.monotonic()
            try:
                batch = self.read(job_id, after, block_ms=block_ms)
            except TRANSIENT:
                wait = patience.next_wait(started)
                if wait is None:
                    raise
                yield None
                time.sleep(wait)
                continue
            patience.reset()
            if not batch:
                yield None
                continue
            for i, event in enumerate(batch):
                if event.terminal:
                    yield batch[:i + 1]
                    return
            after = batch[-1].id
            yield batch


def appended(reply) -> tuple[list[str], int]:
    """(entry ids, position of the last) from `_APPEND_ONCE`'s reply."""
    items = [_text(item) for item in reply]
    return items[:-1], int(items[-1])


class Continuity:
    """Whether a reader got every entry of a log in order, by the entries' positions (`n`).

    A reader that knows the position of the last event it passed on expects the next one right
    after it. A `lost` entry (see `_APPEND_ONCE`) is harmless to a reader that had passed on every
    position it names (it read them before the failover took them back): it is skipped, and the
    reader goes on from the `lost` entry's position. Anything else means the client missed
    events: `check` says so, and the reader must end with an error instead of going on silently.
    A reader starting mid-log (resuming after a Last-Event-ID) learns the position from the first
    entry it reads; a `lost` entry then cannot be judged and counts as a gap.
    """

    def __init__(self):
        self.position: int | None = None

    def check(self, events: list[Event]) -> tuple[list[Event], bool]:
        """(the events to pass on, whether a gap was found after them)."""
        passed: list[Event] = []
        for event in events:
            if event.n is None:  # written without a position (a job's status, a rebuilt end)
                if self.position is not None and event.id:
                    self.position += 1
                passed.append(event)
                continue
            if event.type == "lost":
                through = event.data.get("through") if isinstance(event.data, dict) else None
                if self.position is None or not isinstance(through, int) or self.position < through:
                    return passed, True
                self.position = event.n
                continue
            if self.position is not None and event.n != self.position + 1:
                return passed, True
            self.position = event.n
            passed.append(event)
        return passed, False


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _event(entry_id, fields: dict) -> Event:
    fields = {_text(k): _text(v) for k, v in fields.items()}
    position = fields.get("n")
    return Event(_text(entry_id), fields.get("type", ""), fields.get("data") or "null",
                 int(position) if position and position.isdigit() else None)
