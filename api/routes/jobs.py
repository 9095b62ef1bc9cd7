"""`GET /v1/jobs`, `GET /v1/jobs/{id}`, `POST /v1/jobs/{id}/cancel` and `GET /v1/jobs/{id}/events`:
the caller's recent jobs, any job's status, its cancellation and its resumable event stream.

A job list is read from the indexes of recent jobs (`store.jobs`): a member key lists its own
project's, an owner key (or a server without keys) every project's; each item is the job without
its `result`. A call looks at no more than SCAN_LIMIT index entries, so a filtered page may come
back short, or empty with `has_more` (then `last_id` says where to go on).

A cancel flags the job (a running one stops at its worker's next check) and ends a job still
queued at once, as a worker would end it at delivery (`store.jobs.JobStore.end_unstarted`): no
worker may ever take it. It then waits up to CANCEL_WAIT seconds for a final status and answers
the job as it stands.

A member key reads, follows and cancels its own project's jobs only (another project's is not
found); an owner key any job, as it sees every job in the list and in `GET /v1/workers`.

`Last-Event-ID` must be the id of an event of the job's log (or `0-0`, the default: from the
start). An id past the log's last event was never sent by us and nothing after it will come in
order: 400, at once, rather than a stream that waits. An id that is the finished job's last
event means the client saw everything: 204 No Content, which is also how SSE tells a client
(EventSource reconnects whenever a stream ends) to stop reconnecting.
"""

from __future__ import annotations

import time

from flask import Response

from api.auth import is_owner, project_scope
from api.errors import APIError
from api.model_jobs import client_socket, job_headers, last_event_id
from api.pages import page_limit
from api.queue import queue_runtime, setting
from api.sse import job_frames, relay, sse_response
from store.events import parse_event_id
from store.jobs import FINAL_STATUSES, UnknownCursor, final_event, public_view
from store.metrics import record_job

DEFAULT_LIMIT, MAX_LIMIT = 20, 100
SCAN_LIMIT = 500  # index entries one list call looks at, at most
CANCEL_WAIT = 2.0  # seconds a cancel waits for the job's final status
CANCEL_POLL = 0.05


def _not_found(job_id: str, param: str = "job_id") -> APIError:
    return APIError(404, f"No job found with id '{job_id}'.", param=param, code="job_not_found")


def _record(job_id: str) -> dict:
    # another project's job: not found, except for an owner key (as in the list)
    record = queue_runtime().jobs.get(job_id, None if is_owner() else project_scope())
    if record is None:
        raise _not_found(job_id)
    return record


def get_job(call):
    return public_view(_record(call.path["job_id"]))


def list_jobs(call):
    query = call.query
    limit = page_limit(query, DEFAULT_LIMIT, MAX_LIMIT)
    after = query.get("after") or None  # limit, status and the lengths: checked by the query's schema
    try:
        found = queue_runtime().jobs.recent(None if is_owner() else project_scope(), limit=limit, after=after,
                                            status=query.get("status") or None, type_=query.get("type") or None,
                                            model=query.get("model") or None, scan=SCAN_LIMIT)
    except UnknownCursor:
        raise _not_found(after, param="after") from None  # also another project's job: no listing of it
    items = [public_view(record, result=False) for record in found.records]
    return {
        "object": "list",
        "data": items,
        "first_id": items[0]["id"] if items else None,
        "last_id": items[-1]["id"] if items else found.resume_after,
        "has_more": found.has_more,
    }


def cancel_job(call):
    job_id = call.path["job_id"]
    record = _record(job_id)
    if record.get("status") in FINAL_STATUSES:
        return public_view(record)  # nothing to cancel: as it ended
    rt = queue_runtime()
    rt.jobs.request_cancel(job_id)  # first: a worker taking the job from now on sees the flag
    if rt.jobs.end_unstarted(job_id):  # nobody had taken it, and nobody may ever (a queue no worker serves)
        record_job(rt.redis, kind=record.get("kind", ""), outcome="cancelled")
    deadline = time.monotonic() + CANCEL_WAIT
    while True:
        record = rt.jobs.get(job_id) or record
        if record.get("status") in FINAL_STATUSES or time.monotonic() >= deadline:
            return public_view(record)
        time.sleep(CANCEL_POLL)


def stream_job_events(call):
    job_id = call.path["job_id"]
    record = _record(job_id)
    after = last_event_id()
    position = parse_event_id(after)
    if position is None:
        raise _bad_event_id(f"Invalid Last-Event-ID {after!r}: expected an id such as 1700000000000-0 "
                            "(two integers below 2**64).")
    rt = queue_runtime()
    # past its resume window a finished job has no log: its record's final event stands in for it
    last = rt.events.last(job_id) or final_event(record)
    last_position = parse_event_id(last.id) if last else (0, 0)
    if position > last_position:
        raise _bad_event_id(f"Last-Event-ID {after!r} is past the last event of job '{job_id}' "
                            f"({last.id if last else 'none yet'}); send the id of an event this stream sent.")
    if last is not None and last.terminal and position == last_position:
        return Response(status=204, headers=job_headers(job_id))  # the client has it all: nothing more will come
    return sse_response(relay(rt, job_id, job_frames, after=after, keepalive=setting("keepalive_interval"),
                              deadline=None, grace=rt.settings.resume_grace, sock=client_socket(),
                              patience=setting("relay_ride_over")), job_id)


def _bad_event_id(message: str) -> APIError:
    return APIError(400, message, param="Last-Event-ID", code="invalid_value")


HANDLERS = {"listJobs": list_jobs, "getJob": get_job, "cancelJob": cancel_job, "streamJobEvents": stream_job_events}
