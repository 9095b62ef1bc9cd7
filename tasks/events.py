"""The job event channel: one Redis Stream per job.

PUBLISH/SUBSCRIBE is at-most-once: an event published before the API subscribes is gone. A stream
keeps every event (XADD) until its TTL, readers block for new ones (XREAD BLOCK) from any position,
and each event's stream id doubles as the SSE `id:`, so a client that reconnects with
`Last-Event-ID` resumes exactly after the last event it saw: no gap, no duplicate.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import redis

# Event types that end a job's log: readers stop after one of them.
TERMINAL = frozenset({"result", "error", "cancelled"})

_EVENT_ID = re.compile(r"^\d+-\d+$")


def events_key(job_id: str) -> str:
    return f"localq:job:{job_id}:events"


def valid_event_id(value: str) -> bool:
    return bool(_EVENT_ID.match(value))


class Event(NamedTuple):
    id: str
    type: str
    raw: str  # the data as JSON text, exactly as the worker wrote it: relayed without re-encoding

    @property
    def data(self) -> Any:
        return json.loads(self.raw)

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL


class EventLog:
    def __init__(self, client: redis.Redis, ttl: float):
        self.client = client
        self.ttl = int(ttl)

    def append(self, job_id: str, type_: str, data: Any = None) -> str:
        return self.append_many(job_id, [(type_, data)])[-1]

    def append_many(self, job_id: str, events: Iterable[tuple[str, Any]], pipe=None) -> list[str]:
        """Add events in order in one round trip, and push the log's expiry forward.

        With `pipe`, the commands are only queued on it (and nothing is returned).
        """
        key = events_key(job_id)
        own = pipe is None
        pipe = self.client.pipeline(transaction=False) if own else pipe
        count = 0
        for type_, data in events:
            pipe.xadd(key, {"type": type_, "data": json.dumps(data, separators=(",", ":"))})
            count += 1
        pipe.expire(key, self.ttl)
        return [_text(i) for i in pipe.execute()[:count]] if own else []

    def read(self, job_id: str, after: str = "0-0", block_ms: int | None = None, count: int | None = None) -> list[Event]:
        reply = self.client.xread({events_key(job_id): after}, block=block_ms, count=count)
        return [_event(entry_id, fields) for _, entries in reply or [] for entry_id, fields in entries]

    def all(self, job_id: str) -> list[Event]:
        return [_event(entry_id, fields) for entry_id, fields in self.client.xrange(events_key(job_id))]

    def follow(self, job_id: str, after: str = "0-0", block_ms: int = 1000) -> Iterator[Event | None]:
        """Every event after `after` as it arrives, until a terminal one; None each quiet `block_ms`."""
        while True:
            batch = self.read(job_id, after, block_ms=block_ms)
            if not batch:
                yield None
                continue
            for event in batch:
                after = event.id
                yield event
                if event.terminal:
                    return


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _event(entry_id, fields: dict) -> Event:
    fields = {_text(k): _text(v) for k, v in fields.items()}
    return Event(_text(entry_id), fields.get("type", ""), fields.get("data") or "null")
