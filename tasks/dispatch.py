"""What the API uses to hand work to the queue: create the job record, check depth, send the task.

Tasks are sent by name (`tasks.routing`): the API never imports a task module.
"""

from __future__ import annotations

import logging
import time

from store.files import store_uploads
from store.jobs import job_key, new_job_id
from tasks.celery_app import app
from tasks.routing import PRIORITIES, RUN_TASK, queue_keys
from tasks.runtime import Runtime

log = logging.getLogger(__name__)


class QueueFull(Exception):
    def __init__(self, queue: str, depth: int):
        super().__init__(f"queue {queue!r} holds {depth} jobs")
        self.queue = queue
        self.depth = depth


def submit(rt: Runtime, *, kind: str, model: str, queue: str, request: dict, priority: str = "interactive",
           timeout: float | None = None, attached: bool = True, max_depth: int | None = None,
           files: dict[str, list] | None = None, base_url: str | None = None,
           fallback_queue: str | None = None, project: str = "", job_id: str | None = None,
           extra: dict | None = None) -> dict:
    """Enqueue one job of `project` (its owner); returns the job message (with its id). Raises
    QueueFull over `max_depth`.

    `fallback_queue`: where the job belongs if `queue` (a worker's own queue) loses its worker
    before the job is taken (`tasks.orphans`). `job_id`: an id chosen by the caller (who recorded
    something under it first); `extra`: more fields for the job message.

    The depth check and the job record share one round trip; a refused job's record is removed.
    """
    limit = min(timeout or rt.settings.job_timeout, rt.settings.job_timeout)
    now = time.time()
    job = {**(extra or {}), "id": job_id or new_job_id(), "kind": kind, "model": model, "request": request, "created": int(now),
           "deadline": now + limit, "base_url": base_url, "project": project}
    if fallback_queue and fallback_queue != queue:
        job["fallback_queue"] = fallback_queue
    pipe = rt.redis.pipeline(transaction=False)
    # only jobs that would be served before this one count: batch lines waiting at a lower
    # priority never make an interactive call wait, so they never refuse one either
    keys = queue_keys(queue, up_to=PRIORITIES[priority]) if max_depth is not None else []
    for key in keys:
        pipe.llen(key)
    rt.jobs.create(job["id"], kind=kind, model=model, queue=queue, priority=priority, deadline=now + limit,
                   attached=attached, project=project, pipe=pipe)
    depth = sum(pipe.execute()[:len(keys)])
    if max_depth is not None and depth >= max_depth:
        rt.redis.delete(job_key(job["id"]))
        raise QueueFull(queue, depth)
    if files:
        # kept for as long as the job may live, redeliveries included
        job["request"] = store_uploads(rt.blobs, job["id"], request, files, ttl=int(limit + 120))
    # argsrepr: what logs and Flower show of the arguments. Celery's default is a repr of the whole
    # job, request text included, built on every send (about 1 ms of a 2 ms enqueue).
    app.send_task(RUN_TASK, args=[job], queue=queue, priority=PRIORITIES[priority], soft_time_limit=limit,
                  time_limit=rt.settings.hard_limit_for(limit), argsrepr=f"[{job['id']!r}]", kwargsrepr="{}")
    return job


def prepare() -> None:
    """Build Celery's sending side now (its result backend stub, the producer pool, a broker
    connection) instead of on the first job, which otherwise pays about 35 ms for it; never raises
    (without Redis the first job builds it, as before)."""
    try:
        app.backend  # noqa: B018 - built on first use
        with app.producer_or_acquire() as producer:
            producer.connection.ensure_connection(max_retries=1)
    except Exception:  # noqa: BLE001 - only a head start
        log.debug("could not prepare Celery's producer", exc_info=True)
