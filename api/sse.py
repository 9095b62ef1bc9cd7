"""Server-sent events framed as OpenAI frames them, relayed from a job's event log.

`data: {chunk}` per event with the event log position as `id:` (so `Last-Event-ID` resumes),
in-stream errors as `data: {"error": {...}}`, `data: [DONE]` at the end, and comment lines as
keep-alives while the job waits in the queue.

A relay rides over Redis being away (for `patience` seconds: the `relay_ride_over` setting): it
keeps the client's connection alive with keep-alives and carries on where it was. If Redis stays away,
the stream ends with an in-stream error (without an `id:`, so the client's Last-Event-ID still
names the last event it got) and `[DONE]`; the job runs on, since the client did not leave.
"""

from __future__ import annotations

import base64
import json
import logging
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from flask import Response

from schemas import openai_errors as errors
from store.events import TRANSIENT, Continuity, Event, ride_over
from store.events import parse_event_id
from store.jobs import FINAL_STATUSES, final_event
from tasks.runtime import Runtime

log = logging.getLogger(__name__)
JOB_HEADER = "x-localq-job-id"
# How often a waiting or relaying handler looks whether its client is still connected.
CLIENT_CHECK = 0.5
# A comment line with no blank line after it: it keeps proxies and the connection busy, and no
# client dispatches an event for it. A blank line would end an "event" of its own, and the openai
# SDK, which keeps the last event id across events (as the SSE spec says), turns such an empty
# event after an `id:` into a message whose empty data it fails to decode as JSON.
KEEPALIVE = ": keep-alive\n"
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


def followed_reads(rt: Runtime, job_id: str, *, after: str, keepalive: float, deadline: float | None,
                   patience: float = 0.0) -> Iterator[list[Event] | None]:
    """The job's events after `after`, as each read returns them; None for keep-alive ticks; a
    synthetic error past the deadline.

    Rides over Redis being away for `patience` seconds, then raises the Redis error.
    """
    continuity = Continuity()
    for events in rt.events.follow_reads(job_id, after, block_ms=max(1, int(keepalive * 1000)), ride_over=patience):
        if events:
            events, gap = continuity.check(events)
            if gap:  # events the client never got were lost in a Redis failover: say so, never skip them
                yield [*events, Event("", "error", json.dumps(errors.events_lost(job_id).payload()))]
                return
        if events is None and deadline is not None and time.time() > deadline + 1.0:
            ride_over(lambda: rt.jobs.request_cancel(job_id), patience)
            yield [Event("", "error", json.dumps(errors.deadline_passed().payload()))]
            return
        if events is None:
            compacted = ride_over(lambda: _compacted_end(rt, job_id), patience)
            if compacted is not None:
                if parse_event_id(compacted.id) > (parse_event_id(after) or (0, 0)):
                    yield [compacted]
                return
        yield events


def _compacted_end(rt: Runtime, job_id: str) -> Event | None:
    """A finished job whose log is gone (past its resume window): its terminal event, rebuilt from
    its record (`store.jobs.final_event`). None while the job has a log, or has not finished."""
    if rt.events.exists(job_id):
        return None
    return final_event(rt.jobs.get(job_id))


def followed(rt: Runtime, job_id: str, *, after: str, keepalive: float, deadline: float | None,
             patience: float = 0.0) -> Iterator[Event | None]:
    """`followed_reads`, one event at a time."""
    for events in followed_reads(rt, job_id, after=after, keepalive=keepalive, deadline=deadline, patience=patience):
        if events is None:
            yield None
        else:
            yield from events


Renderer = Callable[[Event], Iterable[str | bytes]]


def rendered(render: Renderer, events: Iterable[Event]) -> str | bytes:
    """What the client reads for these events, as one piece: one write to its socket, not one per
    event (each event's frame is the same as alone)."""
    pieces = [piece for event in events for piece in render(event)]
    return pieces[0][:0].join(pieces) if pieces else ""


def peer_closed(sock) -> bool:
    """Whether the client at the other end of `sock` has closed the connection.

    A handler that is not writing never learns that its client left; the socket tells: readable
    with nothing to read means the peer closed it. Only gunicorn exposes the socket (None: unknown).
    """
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


def relay(rt: Runtime, job_id: str, render: Renderer, *, after: str = "0-0", keepalive: float,
          deadline: float | None, grace: float, keepalive_frame: str | None = KEEPALIVE,
          sock=None, patience: float = 0.0) -> Iterator[str | bytes]:
    """Follow a job's log and turn each event into what the client reads; the client counts as a
    reader of the job while it is connected (see `detached` for what leaving does).

    Events the client is not sent (progress) write nothing, so the connection is also looked at
    every CLIENT_CHECK seconds: a client that left is noticed even while nothing is written.
    Redis being away is ridden over for `patience` seconds (keep-alives meanwhile); past that the
    client is told in-stream, and the job is left running.
    """
    finished = attached = lost = False
    next_check = time.monotonic() + CLIENT_CHECK
    last_write = time.monotonic()
    try:
        ride_over(lambda: rt.jobs.attach(job_id), patience)
        attached = True
        if keepalive_frame:
            yield keepalive_frame  # sends the headers (and the job id) at once, even while the job waits
        for events in followed_reads(rt, job_id, after=after, keepalive=min(keepalive, CLIENT_CHECK),
                                     deadline=deadline, patience=patience):
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + CLIENT_CHECK
                if peer_closed(sock):
                    return
            if events is None:
                if keepalive_frame and time.monotonic() - last_write >= keepalive:
                    last_write = time.monotonic()
                    yield keepalive_frame
                continue
            finished = finished or events[-1].terminal
            chunk = rendered(render, events)
            if chunk:
                last_write = time.monotonic()
                yield chunk
    except TRANSIENT as err:
        lost = True
        log.warning("job %s: stream ended, the job queue was unreachable for %g s: %s", job_id, patience, err)
        told = rendered(render, [Event("", "error", json.dumps(errors.queue_lost(job_id).payload()))])
        if not told:
            raise  # a body with no place for an error (raw audio): a cut connection is the only word left
        yield told
    finally:
        if attached:
            detached(rt, job_id, cancel=not (finished or lost), grace=grace, patience=patience,
                      background=lost)


def completion_frames(event: Event) -> Iterable[str]:
    """Chat and completions streams: `data: {chunk}` per delta, errors in-stream, `data: [DONE]`."""
    if event.type == "delta":
        yield frame(event.raw, event_id=event.id)
    elif event.type == "error":
        yield frame({"error": event.data["error"]}, event_id=event.id or None)
        yield DONE
    elif event.type in ("result", "cancelled"):
        yield frame("[DONE]", event_id=event.id)


def typed_frames(event: Event) -> Iterable[str]:
    """Image, transcription and speech-SSE streams: each delta is a typed event object
    (`image_generation.partial_image`, `transcript.text.delta`, ...) sent with its type as the SSE
    event name; the stream ends with the job."""
    if event.type == "delta":
        yield frame(event.raw, event_id=event.id, event=event.data.get("type"))
    elif event.type == "error":
        yield frame({"error": event.data["error"]}, event_id=event.id or None, event="error")


def audio_bytes(event: Event) -> Iterable[bytes]:
    """Speech as a plain audio body: the encoded bytes of each piece, as soon as it is made."""
    if event.type == "delta":
        data = event.data
        if data.get("type") == "speech.audio.delta":
            yield base64.b64decode(data["audio"])


def job_frames(event: Event) -> Iterable[str]:
    """`GET /v1/jobs/{id}/events`: every event, named by its type."""
    yield frame(event.raw, event_id=event.id, event=event.type)


def detached(rt: Runtime, job_id: str, *, cancel: bool, grace: float, patience: float = 0.0,
              background: bool = False) -> None:
    """A reader left. If it left an unfinished job nobody else reads, cancel it after the grace period.

    The grace period lets a client whose connection dropped resume with Last-Event-ID instead
    of losing its job; a client that is really gone frees the worker right after. A reader that
    stopped because Redis was away (`cancel=False`) only detaches, in the `background` so that
    its client's response ends now; nothing is ever cancelled because our own reads failed.
    """
    if background:
        threading.Thread(target=detached, args=(rt, job_id), daemon=True,
                         kwargs={"cancel": cancel, "grace": grace, "patience": patience}).start()
        return
    try:
        remaining = ride_over(lambda: rt.jobs.detach(job_id), patience)
    except TRANSIENT as err:
        log.warning("job %s: reader not detached, the job queue is unreachable: %s", job_id, err)
        return
    if not cancel or remaining > 0:
        return

    def cancel_if_abandoned() -> None:
        try:
            record = rt.jobs.get(job_id)
            # only jobs a client is waiting for (not batch lines someone merely watches) are cancelled
            if (record and record.get("attached") == "1" and record.get("status") not in FINAL_STATUSES
                    and rt.jobs.readers(job_id) <= 0):
                rt.jobs.request_cancel(job_id)
        except TRANSIENT as err:  # the job runs on: better than a cancel nobody can be sure of
            log.warning("job %s: abandoned job not cancelled, the job queue is unreachable: %s", job_id, err)

    if grace <= 0:
        cancel_if_abandoned()
    else:
        timer = threading.Timer(grace, cancel_if_abandoned)
        timer.daemon = True
        timer.start()
