"""The dead letters: job messages the workers gave up on, kept for an operator to look at.

A message that would otherwise take its worker down, or come back for ever, is acknowledged (so
it is never delivered again), its job or batch line gets its error, and the message lands here:

    undecodable    the worker's main process could not decode it (e.g. JSON nested too deeply)
    undeliverable  it could not hand it to a pool process (e.g. nested too deeply to pickle)
    invalid        Celery refused it (bad headers, a content type that is not accepted)
    worker_lost    the job stopped its worker more than LOCALQ_MAX_DELIVERIES times

Each is one entry of the Redis stream `localq:dead_letters`, capped near `MAX_ENTRIES` (XADD
MAXLEN ~, so an endless stream of bad messages cannot fill Redis), with the fields `job_id` (the
batch id for batch lines), `task`, `queue`, `reason`, `error` (the exception, for the operator:
clients never see it), `at` (epoch seconds) and `body` (the message body, cut at `BODY_CHARS`).
Entries expire with the stream only through the cap: an operator reads them with `localq
dead-letters`, and Prometheus counts them as `localq_dead_letters_total{reason}` (`store.metrics`).
"""

from __future__ import annotations

import json
import time
from typing import Any

from store.metrics import count_dead_letter

STREAM = "localq:dead_letters"
MAX_ENTRIES = 10_000
BODY_CHARS = 4_000
ERROR_CHARS = 2_000
REASONS = ("undecodable", "undeliverable", "invalid", "worker_lost")


def add(client, *, reason: str, task: str, queue: str | None, job_id: str | None, error: str, body: Any) -> str:
    """Keep one dead letter and count it, in one MULTI round trip; the entry id."""
    fields = {
        "job_id": job_id or "", "task": task or "", "queue": queue or "", "reason": reason,
        "error": _cut(error, ERROR_CHARS), "at": f"{time.time():.3f}", "body": _cut(_text(body), BODY_CHARS),
    }
    pipe = client.pipeline(transaction=True)
    pipe.xadd(STREAM, fields, maxlen=MAX_ENTRIES, approximate=True)
    count_dead_letter(pipe, reason)
    return _str(pipe.execute()[0])


def read(client, limit: int = 20) -> list[dict]:
    """The newest `limit` dead letters, newest first, each a dict of its fields plus its `id`."""
    return [{"id": _str(entry_id), **{_str(k): _str(v) for k, v in fields.items()}}
            for entry_id, fields in client.xrevrange(STREAM, count=limit)]


def _text(body: Any) -> str:
    """The body as text: raw bytes as they came (never re-encoded: a poisoned one may not be)."""
    if isinstance(body, bytes | bytearray | memoryview):
        return bytes(body).decode("utf-8", errors="replace")
    if isinstance(body, str):
        return body
    try:
        return json.dumps(body, separators=(",", ":"), default=repr)
    except (ValueError, TypeError, RecursionError) as err:
        return f"<not shown: {type(err).__name__}>"


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _str(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
