"""`GET /v1/jobs/{id}` and `GET /v1/jobs/{id}/events`: any job's status and its resumable event stream.

`Last-Event-ID` must be the id of an event of the job's log (or `0-0`, the default: from the
start). An id past the log's last event was never sent by us and nothing after it will come in
order: 400, at once, rather than a stream that waits. An id that is the finished job's last
event means the client saw everything: 204 No Content, which is also how SSE tells a client
(EventSource reconnects whenever a stream ends) to stop reconnecting.
"""

from __future__ import annotations

from flask import Response

from api.auth import project_scope
from api.errors import APIError
from api.model_jobs import client_socket, job_headers, last_event_id
from api.queue import queue_runtime, setting
from api.sse import job_frames, relay, sse_response
from store.events import parse_event_id
from store.jobs import public_view


def _record(job_id: str) -> dict:
    record = queue_runtime().jobs.get(job_id, project_scope())  # another project's job: not found
    if record is None:
        raise APIError(404, f"No job found with id '{job_id}'.", param="job_id", code="job_not_found")
    return record


def get_job(call):
    return public_view(_record(call.path["job_id"]))


def stream_job_events(call):
    job_id = call.path["job_id"]
    _record(job_id)
    after = last_event_id()
    position = parse_event_id(after)
    if position is None:
        raise _bad_event_id(f"Invalid Last-Event-ID {after!r}: expected an id such as 1700000000000-0 "
                            "(two integers below 2**64).")
    rt = queue_runtime()
    last = rt.events.last(job_id)
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


HANDLERS = {"getJob": get_job, "streamJobEvents": stream_job_events}
