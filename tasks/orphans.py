"""Jobs left on the own queue of a worker that is gone, put back on their model's queue.

Dispatch sends a job to a worker's own queue (`worker.<id>`, see `tasks.routing`) only while
that worker's heartbeat says it is idle and holds the model, but the worker may stop before it
takes the job (a SIGTERM drain, a scale-down, a crash). Nothing else consumes that queue, so:
a stopping worker hands its own queue back (`tasks.worker_signals`), and the periodic sweep
(`tasks.sweeper`) does it for every worker whose heartbeat has expired.

Each message moves in a WATCH/MULTI transaction (never lost, never doubled), keeps its priority
step, goes to the front of its new queue (it has waited already), and is routed there: its
`routing_key` becomes the new queue, so a later redelivery restores it there too. The new queue
is the fallback the dispatcher wrote into the job (`fallback_queue`, the model's queue), else the
model's queue from the configs, else the `cpu` queue.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable

import redis
from kombu.transport.redis import Channel

from store.heartbeats import worker_key
from tasks.routing import PRIORITY_STEPS, own_queue, queue_for, step_key
from tasks.runtime import model_runtime

log = logging.getLogger(__name__)

PREFIX = own_queue("")
MOVE_LIMIT = 10_000  # messages moved per call, so one sweep stays short


def rescue(client: redis.Redis, worker_id: str, resolve: Callable[[str], str | None] | None = None) -> int:
    """Move every message on `worker_id`'s own queue to its job's fallback queue; how many moved."""
    moved = 0
    for step in PRIORITY_STEPS:
        source = step_key(own_queue(worker_id), step)
        while moved < MOVE_LIMIT and _move_newest(client, source, step, resolve):
            moved += 1
    if moved:
        log.warning("moved %d job(s) from the queue of %s, which is gone, to their models' queues", moved, worker_id)
    return moved


def rescue_gone(client: redis.Redis, resolve: Callable[[str], str | None] | None = None) -> int:
    """`rescue` for every worker whose own queue holds messages and whose heartbeat has expired."""
    owners = set()
    for key in client.scan_iter(match=f"{PREFIX}*", count=1000):
        key = key.decode() if isinstance(key, bytes) else key
        owners.add(key[len(PREFIX):].split(Channel.sep)[0])
    gone = [owner for owner in owners if owner and not client.exists(worker_key(owner))]
    return sum(rescue(client, owner, resolve) for owner in sorted(gone))


def _move_newest(client: redis.Redis, source: str, step: int, resolve) -> bool:
    """kombu pushes on the left and pops on the right: moving the newest first, each to the right
    end of its new list, leaves the oldest served first, then the others in their order."""
    def move(pipe) -> bool:
        raw = pipe.lindex(source, 0)
        if raw is None:
            return False
        target, rerouted = _reroute(raw, resolve)
        pipe.multi()
        pipe.lrem(source, 1, raw)
        pipe.rpush(step_key(target, step), rerouted)
        return True

    return client.transaction(move, source, value_from_callable=True)


def _reroute(raw, resolve) -> tuple[str, str]:
    """(queue to move to, the message routed there) for one kombu message."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    try:
        message = json.loads(text)
        target = _target(message, resolve)
        message.setdefault("properties", {}).setdefault("delivery_info", {}).update(exchange="", routing_key=target)
        return target, json.dumps(message)
    except (ValueError, TypeError, AttributeError, KeyError):
        log.warning("a message on a gone worker's queue could not be read; sent to the cpu queue as it is")
        return "cpu", text


def _target(message: dict, resolve) -> str:
    job = _first_argument(message)
    if isinstance(job, dict):
        if isinstance(job.get("fallback_queue"), str) and job["fallback_queue"]:
            return job["fallback_queue"]
        if resolve is not None and isinstance(job.get("model"), str):
            return resolve(job["model"]) or "cpu"
    return "cpu"


def _first_argument(message: dict):
    body = message.get("body")
    if message.get("properties", {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    args = json.loads(body)[0]  # Celery's message protocol 2: [args, kwargs, embed]
    return args[0] if args else None


def registry_resolver() -> Callable[[str], str | None]:
    """Model name -> its queue, from the worker's model configs."""
    registry = model_runtime()[0]

    def resolve(model: str) -> str | None:
        config = registry.resolve(model)
        return queue_for(config) if config is not None else None

    return resolve
