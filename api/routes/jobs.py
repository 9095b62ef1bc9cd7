"""`GET /v1/jobs/{id}` and `GET /v1/jobs/{id}/events`: any job's status and its resumable event stream."""

from __future__ import annotations

from api.errors import APIError
from api.model_jobs import client_socket, last_event_id
from api.queue import queue_runtime, setting
from api.sse import job_frames, relay, sse_response
from tasks.events import valid_event_id
from tasks.jobs import public_view


def _record(job_id: str) -> dict:
    record = queue_runtime().jobs.get(job_id)
    if record is None:
        raise APIError(404, f"No job found with id '{job_id}'.", param="job_id", code="job_not_found")
    return record


def get_job(call):
    return public_view(_record(call.path["job_id"]))


def stream_job_events(call):
    job_id = call.path["job_id"]
    _record(job_id)
    after = last_event_id()
    if not valid_event_id(after):
        raise APIError(400, f"Invalid Last-Event-ID {after!r}: expected an id such as 1700000000000-0.",
                       param="Last-Event-ID", code="invalid_value")
    rt = queue_runtime()
    return sse_response(relay(rt, job_id, job_frames, after=after, keepalive=setting("keepalive_interval"),
                              deadline=None, grace=rt.settings.resume_grace, sock=client_socket()), job_id)


HANDLERS = {"getJob": get_job, "streamJobEvents": stream_job_events}
