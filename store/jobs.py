"""Job records in Redis: status, timestamps, cancel flags and delivery counts, and the index of
recent jobs.

A job's record is a hash that both sides write: the API creates it and may flag it cancelled,
the worker moves it through running to a final status. Everything expires with the job TTL.

A job that ends before any worker ran it ends one way, whoever ends it (`end_unstarted`): status
`cancelled` and a terminal `cancelled` event, "cancelled before it started". A worker that finds
its job's cancel flag up at delivery ends it so; the API's cancel (`POST /v1/jobs/{id}/cancel`)
ends a job still `queued` so at once, since no worker may ever take it (a queue nobody consumes).
A delivery of a job that has already ended (cancelled while its message waited, or finished
before a redelivery) leaves it as it is (`begin_delivery`).

Each new job's id is also scored by its creation time in two sorted sets, every project's
(`localq:jobs:recent`) and its own project's (`localq:jobs:recent:<project>`), each trimmed to its
newest RECENT_LIMIT ids and expiring with the job TTL (pushed back by every new job); `recent`
pages through them, newest first, and drops the ids whose record has expired.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, NamedTuple

import redis

from store.events import Event, events_key
from store.spill import Spill

FINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled", "expired"})
# The data of the terminal event of a job cancelled before any worker ran it.
CANCELLED_BEFORE_START = {"reason": "cancelled before it started"}

RECENT_KEY = "localq:jobs:recent"
RECENT_LIMIT = 2000  # ids kept in each index of recent jobs
# The record fields a job list reads: all but the result, which can be large.
LISTED_FIELDS = ("id", "status", "kind", "model", "created_at", "started_at", "finished_at", "queue", "worker",
                 "error", "project")

# OpenAI object type of each job kind's result, shown in GET /v1/jobs/{id}.
KIND_TYPES = {
    "chat": "chat.completion",
    "completion": "text_completion",
    "embedding": "embedding",
    "tokenize": "tokenize",
    "detokenize": "detokenize",
    "response": "response",
    "chat_tokens": "response.input_tokens",
}


def job_key(job_id: str) -> str:
    return f"localq:job:{job_id}"


def cancel_key(job_id: str) -> str:
    """Set when a job's cancel is requested; a running job checks it between tokens."""
    return f"{job_key(job_id)}:cancel"


def new_job_id() -> str:
    return "job_" + uuid.uuid4().hex


def recent_key(project: str = "") -> str:
    """The index of `project`'s recent jobs ("": every project's)."""
    return f"{RECENT_KEY}:{project}" if project else RECENT_KEY


class UnknownCursor(LookupError):
    """A list's `after` is not in the index read (never listed there, expired or trimmed)."""


class Delivery(NamedTuple):
    """What `begin_delivery` found: the delivery count, whether the cancel flag was up, and the
    final status the job already had (None: it was not final, and is `running` now)."""

    count: int
    cancel_flag: bool
    ended: str | None

    @classmethod
    def of(cls, reply) -> Delivery:
        count, flag, ended = reply
        ended = ended.decode() if isinstance(ended, bytes) else ended
        return cls(int(count), bool(flag), ended or None)


class Page(NamedTuple):
    """A page of `recent`: its records (without results), whether older ones may match, and the id
    to go on after when the page is empty but the scan stopped at its bound (else None)."""

    records: list[dict[str, str]]
    has_more: bool
    resume_after: str | None = None


_FINAL_TEST = " or ".join(f"status == '{status}'" for status in sorted(FINAL_STATUSES))

# A job's delivery, in one step (one round trip at the start of every job): a job that has
# already ended is left as it is; any other counts the delivery and becomes `running`, with its
# `status` event when one is given. KEYS: the record, its cancel flag, its event log. ARGV: the
# TTL, started_at, the worker, then the status event's data ("" for none). Returns {deliveries,
# cancel flag, the final status found ("" when none)}.
_BEGIN = f"""
local status = redis.call('HGET', KEYS[1], 'status')
if {_FINAL_TEST} then
  return {{0, 0, status}}
end
local count = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[2], 'worker', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[1])
if ARGV[4] ~= '' then
  redis.call('XADD', KEYS[3], '*', 'type', 'status', 'data', ARGV[4])
  redis.call('EXPIRE', KEYS[3], ARGV[1])
end
return {{count, redis.call('EXISTS', KEYS[2]), ''}}
"""

# Ends a job that never ran as cancelled: its record and its terminal event together, only from
# one of the statuses given. KEYS: the record, its event log. ARGV: the TTL, finished_at, the
# event's data, then the statuses it may end from. Returns 1 if it ended the job, else 0.
_END_UNSTARTED = """
local status = redis.call('HGET', KEYS[1], 'status')
for i = 4, #ARGV do
  if status == ARGV[i] then
    redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[2])
    redis.call('EXPIRE', KEYS[1], ARGV[1])
    redis.call('XADD', KEYS[2], '*', 'type', 'cancelled', 'data', ARGV[3])
    redis.call('EXPIRE', KEYS[2], ARGV[1])
    return 1
  end
end
return 0
"""


class JobStore:
    def __init__(self, client: redis.Redis, ttl: float, spill: Spill | None = None):
        self.client = client
        self.ttl = int(ttl)
        self.spill = spill  # where a large result goes instead of Redis (`store.spill`)

    def create(self, job_id: str, *, kind: str, model: str, queue: str, priority: str, deadline: float,
               attached: bool, project: str = "", pipe=None) -> None:
        """A queued job's record; `project` owns the job, its events and its result. The job is
        added to the indexes of recent jobs (every project's and its own) in the same round trip."""
        own = pipe is None
        pipe = self.client.pipeline(transaction=False) if own else pipe
        now = time.time()
        self.update(
            job_id, pipe, id=job_id, kind=kind, model=model, queue=queue, priority=priority, status="queued",
            created_at=f"{now:.6f}", deadline=f"{deadline:.6f}", attached="1" if attached else "0",
            attempts="0", project=project,
        )
        for index in {recent_key(), recent_key(project)}:
            pipe.zadd(index, {job_id: now})
            pipe.zremrangebyrank(index, 0, -RECENT_LIMIT - 1)  # all but the newest RECENT_LIMIT
            pipe.expire(index, self.ttl)
        if own:
            pipe.execute()

    def get(self, job_id: str, project: str | None = None) -> dict[str, str] | None:
        """The job's record; None when there is none, or it is not `project`'s (None: any project's)."""
        raw = self.client.hgetall(job_key(job_id))
        if not raw:
            return None
        record = {_text(k): _text(v) for k, v in raw.items()}
        if project is not None and record.get("project", "") != project:
            return None
        if self.spill is not None and "result" in record:  # a large result: back from its file
            record["result"] = self.spill.back(record["result"]) or "null"
        return record

    def projects(self, job_ids: list[str]) -> list[str | None]:
        """The owning project of each job (None for a job with no record), in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(job_key(job_id), "project")
        return [None if found is None else _text(found) for found in pipe.execute()]

    def update(self, job_id: str, pipe=None, **fields: Any) -> None:
        """Set fields (JSON-encoding non-strings); queued on `pipe` if given, else sent at once."""
        encoded = {k: v if isinstance(v, str) else json.dumps(v, separators=(",", ":")) for k, v in fields.items()}
        own = pipe is None
        pipe = self.client.pipeline() if own else pipe
        pipe.hset(job_key(job_id), mapping=encoded)
        pipe.expire(job_key(job_id), self.ttl)
        if own:
            pipe.execute()

    def begin_delivery(self, job_id: str, worker: str, pipe, *, status_event: bool = False) -> None:
        """Queue on `pipe` one atomic step: unless the job has already ended, count this delivery,
        read the cancel flag, mark the job running and (`status_event`) add its `status: running`
        event. Its reply, read with `Delivery.of`, says what was found.

        One round trip at the start of every job; the task overwrites the status at once if the
        job must not run after all, and leaves a job that had already ended alone.
        """
        event = json.dumps({"status": "running"}, separators=(",", ":")) if status_event else ""
        # EVAL, not EVALSHA: a retry after Redis restarted must not meet NOSCRIPT (see store.events)
        pipe.eval(_BEGIN, 3, job_key(job_id), cancel_key(job_id), events_key(job_id), self.ttl,
                  f"{time.time():.6f}", worker, event)

    def end_unstarted(self, job_id: str, *, delivered: bool = False) -> bool:
        """End a job no worker has run as `cancelled` ("cancelled before it started"), its record
        and its terminal event in one atomic step. Only a job still `queued` (nobody has taken
        it), or, with `delivered`, one the caller's delivery has just marked `running` (its cancel
        flag was up). False, changing nothing, for any other: a running job is stopped by its
        worker, and an ended one stays as it ended."""
        data = json.dumps(CANCELLED_BEFORE_START, separators=(",", ":"))
        statuses = ("running",) if delivered else ("queued",)
        return bool(self.client.eval(_END_UNSTARTED, 2, job_key(job_id), events_key(job_id), self.ttl,
                                     f"{time.time():.6f}", data, *statuses))

    def recent(self, project: str | None, *, limit: int, after: str | None = None, status: str | None = None,
               type_: str | None = None, model: str | None = None, scan: int = 500) -> Page:
        """`project`'s recent jobs (None: every project's), newest first, from the one after the job
        `after`, that match the filters (`type_` as `public_view` shows it): at most `limit`, each
        record without its result. At most `scan` index entries are looked at; ids whose record
        has expired are dropped from the index. Raises UnknownCursor for an `after` not in it."""
        index = recent_key(project or "")
        start = 0
        if after is not None:
            rank = self.client.zrevrank(index, after)
            if rank is None:
                raise UnknownCursor(after)
            start = rank + 1
        # without filters nearly every entry is listed: read just enough; with them, the whole
        # bound at once (one pipeline of reads)
        filtered = bool(status or type_ or model)
        found: list[dict[str, str]] = []
        scanned, last_seen, exhausted = 0, after, False
        while len(found) <= limit and scanned < scan and not exhausted:
            if scanned:  # a later read: new jobs may have moved the entries down since the last one
                start = self._after(index, last_seen, start)
            wanted = scan - scanned if filtered else min(scan - scanned, limit + 1 - len(found))
            ids = [_text(i) for i in self.client.zrevrange(index, start, start + wanted - 1)]
            exhausted = len(ids) < wanted
            pipe = self.client.pipeline(transaction=False)
            for job_id in ids:
                pipe.hmget(job_key(job_id), LISTED_FIELDS)
            gone = []
            for job_id, values in zip(ids, pipe.execute() if ids else [], strict=True):
                if len(found) > limit:
                    break
                scanned += 1
                record = {name: _text(value) for name, value in zip(LISTED_FIELDS, values, strict=True)
                          if value is not None}
                if not record.get("id"):  # expired (or never written: a job the queue refused)
                    gone.append(job_id)
                    continue
                start += 1  # the rank after this entry, once the gone ones are removed
                last_seen = job_id
                if _matches(record, project, status, type_, model):
                    found.append(record)
            if gone:
                self.client.zrem(index, *gone)
        if len(found) > limit:
            return Page(found[:limit], True)
        if exhausted:
            has_more = False
        else:  # the scan bound was reached: is anything left below?
            following = self._after(index, last_seen, start)
            has_more = bool(self.client.zrevrange(index, following, following))
        return Page(found, has_more, last_seen if has_more and not found else None)

    def _after(self, index: str, job_id: str | None, default: int) -> int:
        """The rank that follows `job_id` in `index` now (`default` without one, or once it is gone)."""
        rank = self.client.zrevrank(index, job_id) if job_id is not None else None
        return default if rank is None else rank + 1

    def finish(self, job_id: str, status: str, *, result: Any = None, error: Any = None, pipe=None) -> None:
        fields: dict[str, Any] = {"status": status, "finished_at": f"{time.time():.6f}"}
        if result is not None:
            text = result if isinstance(result, str) else json.dumps(result, separators=(",", ":"))
            fields["result"] = self.spill.out(job_id, text) if self.spill is not None else text
        if error is not None:
            fields["error"] = error
        self.update(job_id, pipe, **fields)

    def request_cancel(self, job_id: str) -> None:
        self.client.set(cancel_key(job_id), "1", ex=self.ttl)

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.client.exists(cancel_key(job_id)))

    def attach(self, job_id: str) -> int:
        """A client started reading the job's events; jobs with readers are not cancelled."""
        key = f"{job_key(job_id)}:readers"
        pipe = self.client.pipeline()
        pipe.incr(key)
        pipe.expire(key, self.ttl)
        return int(pipe.execute()[0])

    def detach(self, job_id: str) -> int:
        """The last reader gone, the counter goes too: a finished job keeps no key but its record."""
        return int(self.client.eval(_DETACH, 1, f"{job_key(job_id)}:readers"))

    def readers(self, job_id: str) -> int:
        return int(self.client.get(f"{job_key(job_id)}:readers") or 0)


# KEYS: a job's readers counter. One reader fewer; the counter is deleted when none is left.
_DETACH = """
local left = redis.call('DECR', KEYS[1])
if left <= 0 then redis.call('DEL', KEYS[1]) end
return left
"""


def public_type(record: dict[str, str]) -> str:
    """The job's type as `GET /v1/jobs/{id}` shows it: the OpenAI object of its result."""
    return KIND_TYPES.get(record.get("kind", ""), record.get("kind", ""))


def _matches(record: dict[str, str], project: str | None, status: str | None, type_: str | None,
             model: str | None) -> bool:
    return ((project is None or record.get("project", "") == project)
            and (status is None or record.get("status", "queued") == status)
            and (type_ is None or public_type(record) == type_)
            and (model is None or record.get("model", "") == model))


def final_event(record: dict[str, str] | None) -> Event | None:
    """What stands in for a finished job's event log once it is gone (its resume window passed):
    its terminal event rebuilt from the record, with an id from its finish time. None for a job
    that has not finished (or has no record)."""
    status = (record or {}).get("status")
    if status not in FINAL_STATUSES:
        return None
    finished = record.get("finished_at") or record.get("created_at") or "0"
    event_id = f"{int(float(finished) * 1000)}-0"
    if status == "succeeded":
        return Event(event_id, "result", record.get("result") or "null")
    if status == "cancelled":
        return Event(event_id, "cancelled", json.dumps({"reason": "cancelled"}))
    error = record.get("error") or json.dumps({"message": f"The job ended as {status}.", "type": "server_error",
                                               "param": None, "code": status})
    return Event(event_id, "error", f'{{"error":{error}}}')


def public_view(record: dict[str, str], *, result: bool = True) -> dict:
    """The job as `GET /v1/jobs/{id}` shows it (the overlay's LocalqJob); without `result`, as a
    job list shows it (no `result` field at all)."""

    def seconds(name: str) -> int | None:
        value = record.get(name)
        return int(float(value)) if value else None

    def decoded(name: str):
        value = record.get(name)
        return json.loads(value) if value else None

    view = {
        "id": record["id"],
        "object": "job",
        "status": record.get("status", "queued"),
        "type": public_type(record),
        "model": record.get("model", ""),
        "created_at": seconds("created_at") or 0,
        "started_at": seconds("started_at"),
        "finished_at": seconds("finished_at"),
        "queue": record.get("queue", ""),
        "worker": record.get("worker", "").rpartition(":")[0] or None,  # "<node name>:<pid>" -> node name
        "error": decoded("error"),
    }
    if result:
        view["result"] = decoded("result")
    return view


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value
