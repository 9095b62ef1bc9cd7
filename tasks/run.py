"""The one task every model job runs through: deliver the job to `workers.execute`, record the outcome.

The task itself is model-agnostic: the job's kind and model pick the backend inside the worker.
A job that stopped its worker more than `max_deliveries` times is failed and its message kept in
the dead letters (`store.dead_letters`); `give_up` fails the job of a message that never reached
a pool process (`tasks.handoff`).
"""

from __future__ import annotations

import logging
import os
import time

from celery.exceptions import SoftTimeLimitExceeded

from schemas import openai_errors as errors
from schemas.openai_errors import OpenAIError
from store import dead_letters
from store.files import fetch_uploads, generated_folder, publish_outputs, url_maker
from store.jobs import FINAL_STATUSES, Delivery, cancel_key
from store.metrics import FirstToken, completion_tokens, queue_jobs
from store.usage import Usage, configured_retention, queue_usage, transcribed_seconds, usage_of
from tasks import publisher as publishing
from tasks.cancel_check import CancelCheck, soft_deadline
from tasks.celery_app import app
from tasks.publisher import BackgroundPublisher
from tasks.responses.job import KIND as RESPONSE
from tasks.responses.job import ResponseJob
from tasks.routing import RUN_TASK as TASK_NAME
from tasks.runtime import model_runtime, runtime, worker_settings
from workers.execute import execute  # light at import: model libraries load inside the backends
from workers.files import UploadedFile

log = logging.getLogger(__name__)

# How often a running job looks at its cancel flag: often enough to free the worker at once,
# rarely enough that the Redis round trip costs nothing next to a token.
CANCEL_POLL = 0.05
# Job kinds whose output arrives token by token (and whose log says when they start running).
STREAMING_KINDS = frozenset({"chat", "completion", RESPONSE})
# Job kinds that read an uploaded audio file, counted in seconds of audio (`store.usage`).
AUDIO_INPUT_KINDS = frozenset({"transcription", "translation"})
# What Whisper resamples its input to (`workers.audio.decode`'s default).
AUDIO_RATE = 16000


def _end(rt, job_id: str, status: str, event: str, data, *, result=None, error=None) -> None:
    """Record the final status, then publish the terminal event, in one round trip (in that order,
    so whoever sees the event also sees a finished job record)."""
    pipe = rt.redis.pipeline(transaction=False)
    rt.jobs.finish(job_id, status, result=result, error=error, pipe=pipe)
    rt.events.append_many(job_id, [(event, data)], pipe=pipe)
    pipe.execute()


def _fail(rt, job_id: str, payload: dict, status: str = "failed") -> None:
    _end(rt, job_id, status, "error", payload, error=payload["error"])


def _record(rt, job: dict, outcome: str, usage: Usage | None = None, **measures) -> None:
    """Count the finished job in the cluster-wide metrics (`store.metrics`) and what it used in its
    project's usage (`store.usage`), in one round trip; called after its terminal event is out, so
    the client never waits for it; never fails the job."""
    try:
        pipe = rt.redis.pipeline(transaction=True)
        queue_jobs(pipe, [{"kind": job["kind"], "outcome": outcome, **measures}])
        if usage is not None:
            queue_usage(pipe, [usage], time.time(), configured_retention())
        pipe.execute()
    except Exception:
        log.warning("job %s: metrics not recorded", job["id"], exc_info=True)


def _usage(job: dict, model: str, result) -> Usage | None:
    """What a successful job's answer used; None (logged) if it cannot be read, never a failure."""
    try:
        seconds = None
        if job["kind"] in AUDIO_INPUT_KINDS and transcribed_seconds(result) is None:
            seconds = _audio_seconds(job["request"].get("file"))  # text, srt, vtt: the answer has no usage
        return usage_of(project=job.get("project", ""), kind=job["kind"], model=model, request=job["request"],
                        result=result, audio_seconds=seconds)
    except Exception:
        log.warning("job %s: usage not read", job["id"], exc_info=True)
        return None


def _audio_seconds(upload) -> float | None:
    """The length of an uploaded audio file as Whisper read it (decoded again: the answers in
    text, srt and vtt do not say); None for anything but an uploaded file."""
    if not isinstance(upload, UploadedFile):
        return None
    from workers.audio import decode  # PyAV and NumPy: loaded by audio jobs only

    return len(decode(upload.data, rate=AUDIO_RATE)) / AUDIO_RATE


def give_up(rt, job_id: str, payload: dict) -> bool:
    """Fail a job whose message no worker can run (`tasks.handoff`), as `run_job` fails one: the
    failed record, then the terminal error event a waiting client gets. False, doing nothing, if
    the job is unknown or already final (the same message seen again)."""
    record = rt.jobs.get(job_id)
    if record is None or record.get("status") in FINAL_STATUSES:
        return False
    _fail(rt, job_id, payload)
    _record(rt, {"id": job_id, "kind": record.get("kind", "")}, "failed")
    return True


def _dead_letter_lost(rt, job: dict, request, deliveries: int) -> None:
    """Keep the message of a job given up for stopping its worker; never fails the job."""
    try:
        dead_letters.add(rt.redis, reason="worker_lost", task=TASK_NAME, job_id=job["id"],
                         queue=(request.delivery_info or {}).get("routing_key"),
                         error=f"the job stopped its worker {deliveries - 1} times", body=job)
    except Exception:
        log.warning("job %s: dead letter not kept", job["id"], exc_info=True)


def _cancel_requested(rt, publisher: BackgroundPublisher, job_id: str) -> bool:
    """The job's cancel flag: as the publisher's last send read it, when recent; else asked."""
    seen = publisher.cancel_seen(CANCEL_POLL)
    return rt.jobs.cancel_requested(job_id) if seen is None else seen


def _close(publisher: BackgroundPublisher, job_id: str) -> bool:
    """Flush the job's events; False when some could not be published (the job then fails with a
    final event of its own, instead of leaving its client waiting for a result that never comes)."""
    try:
        publisher.close()
    except Exception:
        log.exception("job %s: its events could not be published", job_id)
        return False
    return True


def causes(exc: BaseException | None) -> list[BaseException]:
    """`exc` and what caused it (at most 5 deep, never looping)."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen and len(seen) < 5:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def too_deep(exc: BaseException | None) -> bool:
    """Whether a RecursionError caused `exc`: the request's nesting, which fails the same way every time."""
    return any(isinstance(cause, RecursionError) for cause in causes(exc))


@app.task(name=TASK_NAME, bind=True)
def run_job(self, job: dict) -> None:
    """Run one job; anything that escapes its steps fails the job (a `request_too_deep` 400 for a
    request nested too deep to walk), never leaves its client waiting, and never stops the worker."""
    try:
        _run_job(self, job)
    except Exception as exc:  # noqa: BLE001 - the job's own failure, reported to its client
        job_id = job.get("id") if isinstance(job, dict) else None
        log.error("job %s could not run", job_id, exc_info=not too_deep(exc))
        if job_id:
            payload = (errors.request_too_deep() if too_deep(exc) else errors.server_error()).payload()
            give_up(runtime(), job_id, payload)


def _run_job(self, job: dict) -> None:
    started = time.monotonic()
    rt = runtime()
    job_id = job["id"]
    pipe = rt.redis.pipeline(transaction=False)
    # one-piece jobs go straight to their result: no `status` event, one wake-up less
    rt.jobs.begin_delivery(job_id, f"{self.request.hostname}:{os.getpid()}", pipe,
                           status_event=job["kind"] in STREAMING_KINDS)
    delivery = Delivery.of(pipe.execute()[0])
    flag_read_at = time.monotonic()
    deliveries, cancel_flag = delivery.count, delivery.cancel_flag
    if delivery.ended:  # cancelled while its message waited (`POST /v1/jobs/{id}/cancel`), or a redelivery
        log.info("job %s had already ended (%s): not run", job_id, delivery.ended)
        return
    if deliveries > rt.settings.max_deliveries:
        _fail(rt, job_id, errors.worker_lost(deliveries - 1).payload())
        _record(rt, job, "failed")
        _dead_letter_lost(rt, job, self.request, deliveries)
        return
    if cancel_flag:
        if rt.jobs.end_unstarted(job_id, delivered=True):  # as the API ends a job cancelled while queued
            _record(rt, job, "cancelled")
        return
    if time.time() > float(job.get("deadline") or "inf"):
        _fail(rt, job_id, errors.queue_timeout().payload(), status="expired")
        _record(rt, job, "expired")
        return

    try:
        job = {**job, "request": fetch_uploads(rt.blobs, job["request"])}
    except LookupError as err:
        _fail(rt, job_id, errors.upload_expired(str(err)).payload())
        _record(rt, job, "failed")
        return

    already_sent = 0
    if deliveries > 1:
        already_sent = sum(1 for event in rt.events.all(job_id) if event.type == "delta")
        log.warning("job %s redelivered (delivery %d); %d deltas already published", job_id, deliveries,
                    already_sent)
    publishing.configure(worker_settings().stream_interval)
    publisher = BackgroundPublisher(rt.events, job_id, skip_deltas=already_sent, cancel_key=cancel_key(job_id),
                                    cancel_every=CANCEL_POLL / 2)

    registry, cache = model_runtime()
    first_token = FirstToken(publisher.emit, started)
    is_cancelled = CancelCheck(lambda: _cancel_requested(rt, publisher, job_id), CANCEL_POLL,
                               soft_deadline(self.request, rt.settings.job_timeout, started), read_at=flag_read_at)

    outcome, error = "succeeded", None
    running, emit, response = job, first_token.emit, None
    if job["kind"] == RESPONSE:  # a Responses API request: its chat job, with its events translated
        response = ResponseJob(rt, job, first_token.emit)
        running, emit = response.chat_job, response.emit
        response.start()
    try:
        execute(running, emit, is_cancelled, registry=registry, cache=cache)
    except OpenAIError as err:  # what the client caused (`workers.errors.JobError`)
        outcome, error = "failed", err.payload()
    except SoftTimeLimitExceeded:
        outcome, error = "failed", errors.job_timeout().payload()
    except Exception:
        log.exception("job %s failed", job_id)
        outcome, error = "failed", errors.server_error().payload()
    finally:
        published = _close(publisher, job_id)
    if error is None and is_cancelled.timed_out:  # stopped at its soft time limit (threads pool)
        outcome, error = "failed", errors.job_timeout().payload()
    if error is None and not published:
        outcome, error = "failed", errors.output_lost().payload()
    elif error is None and not is_cancelled.cancelled and publisher.result is None:
        log.error("job %s: the backend returned without a result", job_id)
        outcome, error = "failed", errors.no_result().payload()

    tokens = None
    if response is not None:
        response.ended(error, cancelled=error is None and is_cancelled.cancelled)
    if error is not None:
        _fail(rt, job_id, error)
    elif is_cancelled.cancelled:
        outcome = "cancelled"
        _end(rt, job_id, "cancelled", "cancelled", {"reason": "cancelled by the client"})
    else:
        tokens = completion_tokens(publisher.result)
        result = publish_outputs(rt.redis, publisher.result, url_maker(job.get("base_url")),
                                 int(rt.settings.generated_ttl), job.get("project", ""),
                                 folder=generated_folder(rt.settings.files_dir))
        _end(rt, job_id, outcome, "result", result, result=result)
    config = registry.resolve(job["model"])  # the model's own name: aliases share its series
    model = config.name if config else job["model"]
    usage = _usage(job, model, publisher.result) if outcome == "succeeded" else None
    _record(rt, job, outcome, usage, model=model, duration=time.monotonic() - started, ttft=first_token.seconds,
            completion_tokens=tokens)
