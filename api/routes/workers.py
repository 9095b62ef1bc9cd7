"""`GET /v1/workers` (a localq extension): the workers that sent a heartbeat recently."""

from __future__ import annotations

from api.queue import queue_runtime
from store.heartbeats import live_workers


def list_workers(call):
    return {"object": "list", "data": live_workers(queue_runtime().redis)}


HANDLERS = {"listWorkers": list_workers}
