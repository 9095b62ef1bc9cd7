"""`GET /v1/workers` (a localq extension): the workers that sent a heartbeat recently, each with
its job slots, running jobs and batching engines (`store.worker_slots`)."""

from __future__ import annotations

from api.queue import queue_runtime
from store.heartbeats import live_workers
from store.worker_slots import with_slots


def list_workers(call):
    return {"object": "list", "data": [with_slots(beat) for beat in live_workers(queue_runtime().redis)]}


HANDLERS = {"listWorkers": list_workers}
