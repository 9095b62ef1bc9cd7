"""Server-sent events framed as OpenAI frames them, relayed from a job's event log.

`data: {chunk}` per event with the event log position as `id:` (so `Last-Event-ID` resumes),
in-stream errors as `data: {"error": {...}}`, `data: [DONE]` at the end, and comment lines as
keep-alives while the job waits in the queue.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

from flask import Response

from tasks.events import Event
from tasks.jobs import FINAL_STATUSES
from tasks.runtime import Runtime

JOB_HEADER = "x-localq-job-id"
KEEPALIVE = ": keep-alive\n\n"
DONE = "data: [DONE]\n\n"


def frame(data: Any, *, event_id: str | None = None, event: str | None = None) -> str:
    lines = []
    if event_id:
        lines.append(f"id: {event_id}")
    if event:
        lines.append(f"event: {event}")
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    lines.append(f"data: {payload}")
    return "\n".join(lines) + "\n\n"


def sse_response(body: Iterator[str], job_id: str) -> Response:
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", JOB_HEADER: job_id, "x-request-id": job_id}
    return Response(body, mimetype="text/event-stream", headers=headers)


def timeout_error() -> dict:
    return {"status": 504, "error": {"message": "The job did not finish within its timeout.", "type": "timeout_error",
                                     "param": None, "code": "job_timeout"}}


def followed(rt: Runtime, job_id: str, *, after: str, keepalive: float, deadline: float | None) -> Iterator[Event | None]:
    """The job's events after `after`; None for keep-alive ticks; a synthetic error past the deadline."""
    for event in rt.events.follow(job_id, after, block_ms=max(1, int(keepalive * 1000))):
        if event is None and deadline is not None and time.time() > deadline + 1.0:
            rt.jobs.request_cancel(job_id)
            yield Event("", "error", json.dumps(timeout_error()))
            return
        yield event


def openai_stream(rt: Runtime, job_id: str, *, after: str = "0-0", keepalive: float, deadline: float | None,
                  grace: float) -> Iterator[str]:
    """An OpenAI completion stream (`chat.completion.chunk` / `text_completion` chunks) from the log."""
    finished = False
    rt.jobs.attach(job_id)
    try:
        yield KEEPALIVE  # sends the headers (and the job id) at once, even while the job waits
        for event in followed(rt, job_id, after=after, keepalive=keepalive, deadline=deadline):
            if event is None:
                yield KEEPALIVE
            elif event.type == "delta":
                yield frame(event.raw, event_id=event.id)
            elif event.type == "error":
                finished = True
                yield frame({"error": event.data["error"]}, event_id=event.id or None)
                yield DONE
            elif event.type in ("result", "cancelled"):
                finished = True
                yield frame("[DONE]", event_id=event.id)
    finally:
        _detached(rt, job_id, finished, grace)


def job_event_stream(rt: Runtime, job_id: str, *, after: str, keepalive: float, grace: float) -> Iterator[str]:
    """Every event of a job as `event: <type>` frames; ends after the job's last event."""
    finished = False
    rt.jobs.attach(job_id)
    try:
        yield KEEPALIVE
        for event in followed(rt, job_id, after=after, keepalive=keepalive, deadline=None):
            if event is None:
                yield KEEPALIVE
                continue
            finished = finished or event.terminal
            yield frame(event.raw, event_id=event.id, event=event.type)
    finally:
        _detached(rt, job_id, finished, grace)


def _detached(rt: Runtime, job_id: str, finished: bool, grace: float) -> None:
    """A reader left. If it left an unfinished job nobody else reads, cancel it after the grace period.

    The grace period lets a client whose connection dropped resume with Last-Event-ID instead
    of losing its job; a client that is really gone frees the worker right after.
    """
    remaining = rt.jobs.detach(job_id)
    if finished or remaining > 0:
        return

    def cancel_if_abandoned() -> None:
        record = rt.jobs.get(job_id)
        if record and record.get("status") not in FINAL_STATUSES and rt.jobs.readers(job_id) <= 0:
            rt.jobs.request_cancel(job_id)

    if grace <= 0:
        cancel_if_abandoned()
    else:
        timer = threading.Timer(grace, cancel_if_abandoned)
        timer.daemon = True
        timer.start()
