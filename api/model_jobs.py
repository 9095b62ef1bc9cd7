"""The path every model call takes: resolve the model, check it can honour the request, enqueue,
then either stream the job's events or wait for its result.
"""

from __future__ import annotations

import logging
import time

from flask import Response, request

from api.auth import project_scope
from api.errors import APIError
from api.model_access import usable_model
from api.sse import (
    CLIENT_CHECK,
    JOB_HEADER,
    Renderer,
    audio_bytes,
    completion_frames,
    detached,
    followed,
    peer_closed,
    relay,
    sse_response,
)
from api.queue import live_workers_cached, queue_runtime, setting
from schemas import openai_errors as errors
from tasks.dispatch import QueueFull, submit
from store.events import TRANSIENT, ride_over
from tasks.routing import choose_queue, queue_for
from tasks.runtime import Runtime
from workers.capabilities import unsupported

EXTENSIONS = "x-localai-extensions"
log = logging.getLogger(__name__)


def resolve_model(name: str, kind: str, body: dict):
    config = usable_model(name)  # another project's model is as unknown as a missing one
    if config is None:
        raise errors.model_not_found(name)
    problem = unsupported(kind, config, body)
    if problem:
        param, message = problem
        raise errors.invalid(param, message, problem.code)
    return config


def run(kind: str, body: dict, *, stream: bool = False, frames: Renderer = completion_frames,
        files: dict[str, list] | None = None, model: str | None = None, respond=None):
    """Enqueue a job of `kind` for the validated `body` and answer as OpenAI would.

    `frames` renders the job's events when the client asked for a stream; `respond` turns the
    result's JSON text into the response otherwise (default: that JSON, as is).
    """
    rt, job = enqueue(kind, body, files=files, model=model)
    if stream:
        return sse_response(relay(rt, job["id"], frames, keepalive=setting("keepalive_interval"),
                                  deadline=job["deadline"], grace=rt.settings.resume_grace, sock=client_socket(),
                                  patience=setting("relay_ride_over")),
                            job["id"])
    return wait_for_result(rt, job, keepalive=setting("keepalive_interval"), respond=respond or json_response,
                           patience=setting("relay_ride_over"))


def enqueue(kind: str, body: dict, *, files: dict[str, list] | None = None, model: str | None = None,
            checked_as: str | None = None, job_id: str | None = None, extra: dict | None = None,
            attached: bool = True):
    """Queue a job of `kind` for `body`; the model is checked as for a job of `checked_as` (default:
    `kind`). `job_id`, `extra` and `attached` (a client waits for it: leaving cancels it): see
    `tasks.dispatch.submit`."""
    model = model or body["model"]
    config = resolve_model(model, checked_as or kind, body)
    extensions = body.get(EXTENSIONS) or {}
    rt = queue_runtime()
    try:
        job = submit(rt, kind=kind, model=model, queue=choose_queue(config, live_workers_cached()),
                     fallback_queue=queue_for(config), request=body,
                     priority=extensions.get("priority", "interactive"), timeout=extensions.get("timeout"),
                     max_depth=setting("max_queue_depth"), files=files, base_url=request.host_url,
                     project=project_scope(), job_id=job_id, extra=extra, attached=attached)
    except QueueFull as full:
        raise APIError(429, f"The {full.queue} queue is full ({full.depth} jobs waiting); retry later.",
                       type="requests", code="rate_limit_exceeded", headers={"Retry-After": "1"}) from None
    return rt, job


def json_response(raw: str, job_id: str) -> Response:
    """The worker's JSON, passed through as written."""
    return Response(raw, mimetype="application/json", headers=job_headers(job_id))


def job_headers(job_id: str) -> dict:
    return {JOB_HEADER: job_id, "x-request-id": job_id}


def _queue_lost(job_id: str, err: Exception) -> APIError:
    """What a client waiting for a job hears when Redis stayed away longer than the ride-over."""
    log.warning("job %s: wait ended, the job queue was unreachable: %s", job_id, err)
    return errors.queue_lost(job_id).with_headers({JOB_HEADER: job_id, "Retry-After": "5"})


def _raise_job_error(event, job_id: str):
    raise APIError.from_payload(event.data, headers={JOB_HEADER: job_id})


def stream_audio(kind: str, body: dict, mimetype: str, *, model: str | None = None) -> Response:
    """Speech as an audio body streamed as it is made. The first piece (or the job's error) is
    awaited before answering, so that a job that fails still gets its proper status code."""
    rt, job = enqueue(kind, body, model=model)
    job_id = job["id"]
    keepalive = setting("keepalive_interval")  # read here: the body below runs outside the app context
    patience = setting("relay_ride_over")
    sock = client_socket()
    first = None
    try:
        for event in followed(rt, job_id, after="0-0", keepalive=CLIENT_CHECK, deadline=job["deadline"],
                              patience=patience):
            if event is None:
                if client_gone():
                    ride_over(lambda: rt.jobs.request_cancel(job_id), patience)
                    return Response(status=499)
                continue
            if event.type == "error":
                _raise_job_error(event, job_id)
            if event.type == "delta" or event.terminal:
                first = event
                break
    except TRANSIENT as err:
        raise _queue_lost(job_id, err) from None

    def body_bytes():
        yield from audio_bytes(first)
        if not first.terminal:
            yield from relay(rt, job_id, audio_bytes, after=first.id, keepalive=keepalive,
                             deadline=job["deadline"], grace=rt.settings.resume_grace, keepalive_frame=None,
                             sock=sock, patience=patience)

    return Response(body_bytes(), mimetype=mimetype, headers=job_headers(job_id))


def client_socket():
    """The connection of the current request (gunicorn only), to notice a client that left."""
    return request.environ.get("gunicorn.socket")


def client_gone() -> bool:
    return peer_closed(client_socket())


def wait_for_result(rt: Runtime, job: dict, *, keepalive: float, respond=json_response, patience: float = 0.0):
    """The job's answer once it has one, riding over Redis being away for `patience` seconds
    (then 503, naming the job, which is left to run: the client may fetch its result later)."""
    job_id = job["id"]
    next_check = time.monotonic() + CLIENT_CHECK
    try:
        ride_over(lambda: rt.jobs.attach(job_id), patience)
    except TRANSIENT as err:
        raise _queue_lost(job_id, err) from None
    lost = False
    try:
        for event in followed(rt, job_id, after="0-0", keepalive=min(keepalive, CLIENT_CHECK),
                              deadline=job["deadline"], patience=patience):
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + CLIENT_CHECK
                if client_gone():
                    ride_over(lambda: rt.jobs.request_cancel(job_id), patience)  # nobody will read the answer
                    return Response(status=499)
            if event is None:
                continue
            if event.type == "result":
                return respond(event.raw, job_id)
            if event.type == "error":
                _raise_job_error(event, job_id)
            if event.type == "cancelled":
                raise errors.cancelled().with_headers({JOB_HEADER: job_id})
    except TRANSIENT as err:
        lost = True
        raise _queue_lost(job_id, err) from None
    finally:
        detached(rt, job_id, cancel=False, grace=0, patience=patience, background=lost)
    raise APIError(500, "The job's event log ended without a result.", type="server_error")


def last_event_id() -> str:
    return request.headers.get("Last-Event-ID", "0-0") or "0-0"
