"""A poisoned message fails its own job, never the worker.

A Celery worker's main process decodes each message and pickles its arguments to hand them to a
pool process. Either step can fail on a message that passed the API: JSON nested about 500 deep
decodes but cannot be pickled (RecursionError), and Celery lets that escape its event loop and
stops the worker; with late acks the message then comes back to every worker that starts. One
nested 1000 deep cannot even be decoded: Celery acknowledges it and logs, but its job would stay
queued until its deadline.

Here, for any message the main process cannot decode or hand over:

* the pool forgets the job it never got (billiard keeps each job it is given until its result
  comes back: this one would stay for the worker's life), and the worker's slot is released, as
  Celery does for a revoked request (else, at concurrency 1, no job would ever run again);
* the message goes to the dead letters (`store.dead_letters`) and is acknowledged: it is never
  delivered again;
* its job fails as `tasks.run` fails one (failed record, terminal `error` event), so a waiting
  client gets an OpenAI-shaped error: 400 `request_too_deep` when the request's nesting is the
  cause (sending it again would fail the same way), else 500 `job_undeliverable`. A batch lines
  message records that error as the outcome of each of its lines (`tasks.batch_run.give_up_lines`).

`Worker` (the app's worker class, `tasks.celery_app`) guards the hand-over, `Consumer` (its
`worker_consumer`) the decoding. Both run in the event loop, so their Redis client gives up quickly
rather than riding over an outage (`tasks.sweeper.sweep_client`); a failure to record is logged and
the message still acknowledged.
"""

from __future__ import annotations

import logging
import re
from functools import cache

from celery.apps.worker import Worker as CeleryWorker
from celery.worker import state
from celery.worker.consumer import Consumer as CeleryConsumer

from schemas import openai_errors as errors
from store import dead_letters
from store.events import EventLog
from store.jobs import JobStore
from tasks.batch_run import give_up_lines
from tasks.routing import LINES_TASK, RUN_TASK
from tasks.run import causes, give_up, too_deep
from tasks.runtime import Runtime
from tasks.settings import QueueSettings
from tasks.sweeper import sweep_client

log = logging.getLogger(__name__)

# The id a message body starts with ([[{"id": "job_..." or [["batch_...", ...), for one that cannot be decoded.
_BODY_IDS = {
    RUN_TASK: re.compile(rb'^\s*\[\s*\[\s*\{\s*"id"\s*:\s*"(job_[0-9a-f]{1,64})"'),
    LINES_TASK: re.compile(rb'^\s*\[\s*\[\s*"(batch_[0-9a-f]{1,64})"'),
}


class Worker(CeleryWorker):
    """Celery's worker, whose hand-over of a request to the pool never raises."""

    def _process_task(self, req):
        try:
            super()._process_task(req)
        except Exception as exc:  # noqa: BLE001 - one message must never stop the worker
            self._set_aside(req, exc)

    def _set_aside(self, req, exc: Exception) -> None:
        log.error("%s[%s] could not be handed to a pool process; set aside", req.name, req.id, exc_info=exc)
        _forget(self.pool, req.id)
        if getattr(self, "semaphore", None) is not None and self.process_task == self._process_task_sem:
            self._quick_release()  # taken by _process_task_sem for a job that never ran
        set_aside(_settings(self.app), reason="undeliverable", task=req.name,
                  queue=(req.delivery_info or {}).get("routing_key"), args=req.args, body=req.body, exc=exc)
        req.acknowledge()
        state.task_ready(req)


class Consumer(CeleryConsumer):
    """Celery's consumer, which also fails the job of a message it cannot decode or accept."""

    def on_decode_error(self, message, exc):
        _set_aside_message(self.app, "undecodable", message, exc)
        super().on_decode_error(message, exc)  # logs it, acknowledges it

    def on_invalid_task(self, body, message, exc):
        _set_aside_message(self.app, "invalid", message, exc)
        super().on_invalid_task(body, message, exc)  # logs it, rejects it (not requeued)

    def on_connection_error_after_connected(self, exc):
        """Celery's cleanup of a lost connection, which must not stop the worker.

        kombu closes the dead connection's channel by putting back the messages it held, through a
        connection pool it has already dropped: with its transport collected that raises
        AttributeError, which Celery takes for an unrecoverable error and stops the worker (seen
        in a Redis Sentinel failover). The connection is gone either way, and the messages it
        could not put back are found by the worker's own check (`tasks.lost_acks`).
        """
        try:
            super().on_connection_error_after_connected(exc)
        except AttributeError:
            log.warning("closing the lost broker connection failed; its unacknowledged messages are left to "
                        "the lost-message check", exc_info=True)
            self.connection = None


def _set_aside_message(app, reason: str, message, exc: Exception) -> None:
    headers = message.headers if isinstance(getattr(message, "headers", None), dict) else {}
    set_aside(_settings(app), reason=reason, task=str(headers.get("task") or ""),
              queue=(message.delivery_info or {}).get("routing_key"), args=None, body=message.body, exc=exc)


def set_aside(settings: QueueSettings, *, reason: str, task: str, queue: str | None, args, body, exc: Exception):
    """Keep the message in the dead letters and fail its job (or batch lines); never raises."""
    job_id = _job_id(task, args, body)
    payload = client_error(exc)
    rt = _runtime(settings)
    try:
        dead_letters.add(rt.redis, reason=reason, task=task, queue=queue, job_id=job_id, error=describe(exc),
                         body=body)
        if task == RUN_TASK and job_id:
            give_up(rt, job_id, payload)
        elif task == LINES_TASK and job_id and args is not None:
            give_up_lines(rt.redis, job_id, list(args[1]), payload, args[2] if len(args) > 2 else None)
        else:  # undecodable lines: which lines is unknown; the batch's expiry fails them at the latest
            log.error("a %r message (%s) set aside; no job of it could be failed", task, job_id or "no id")
    except Exception:  # noqa: BLE001 - Redis away, or a message of an unexpected shape
        log.exception("%s message %s set aside (%s), but its outcome was not recorded", task, job_id, reason)


def client_error(exc: BaseException) -> dict:
    """The error event a waiting client gets (an `OpenAIError.payload()`)."""
    return (errors.request_too_deep() if too_deep(exc) else errors.job_undeliverable()).payload()


def describe(exc: BaseException) -> str:
    """The exception and what caused it, for the operator (`DecodeError: ... <- RecursionError: ...`)."""
    return " <- ".join(f"{type(e).__name__}: {e}" for e in causes(exc))


def _job_id(task: str, args, body) -> str | None:
    """The job id (batch id for lines) from the decoded arguments, else from the body's start."""
    try:
        if task == RUN_TASK and args:
            return str(args[0]["id"])
        if task == LINES_TASK and args:
            return str(args[0])
    except (TypeError, KeyError, IndexError):
        return None
    pattern = _BODY_IDS.get(task)
    raw = bytes(body[:512]) if isinstance(body, bytes | bytearray | memoryview) else str(body or "")[:512].encode()
    match = pattern.match(raw) if pattern is not None else None
    return match.group(1).decode() if match else None


def _forget(pool, task_id: str) -> None:
    """Drop the pool's record of the job it was given but never got (`ApplyResult.discard`)."""
    jobs = getattr(getattr(pool, "_pool", None), "_cache", None)
    for job in list((jobs or {}).values()):
        if (getattr(job, "correlation_id", None) == task_id and not getattr(job, "_accepted", True)
                and getattr(job, "_payload", None) is None):
            job.discard()


def _settings(app) -> QueueSettings:
    return getattr(app, "localq_settings", None) or QueueSettings.from_env()


@cache
def _runtime(settings: QueueSettings) -> Runtime:
    """The main process's own clients: quick to give up (it runs the event loop)."""
    client = sweep_client(settings.redis_url)
    return Runtime(settings, client, client, JobStore(client, settings.job_ttl), EventLog(client, settings.job_ttl, settings.resume_window))
