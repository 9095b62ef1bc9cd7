"""`GET /v1/queues` (a localq extension): every known queue, how many jobs wait in it (interactive
and batch) and how many live workers consume it, plus the live workers' finished jobs added up.

The queues and their depths are read as `/metrics` reads them (`tasks.queue_depths`). Any valid
key may read it: counts and queue names only, no job ids.
"""

from __future__ import annotations

from api.metrics import model_queues
from api.queue import queue_runtime
from store.heartbeats import live_workers
from tasks.queue_depths import known_queues, parse_depths, read_depths


def list_queues(call):
    rt = queue_runtime()
    workers = live_workers(rt.redis)
    queues = known_queues(model_queues(), workers)
    pipe = rt.redis.pipeline(transaction=False)
    read_depths(pipe, queues)
    depths = parse_depths(pipe.execute(), queues)
    data = [{"object": "queue", "name": queue, "waiting": depth.total, "waiting_interactive": depth.interactive,
             "waiting_batch": depth.batch, "workers": sum(1 for worker in workers if queue in _queues(worker))}
            for queue, depth in depths.items()]
    return {"object": "list", "data": data, "jobs_done": sum(_count(worker.get("jobs_done")) for worker in workers)}


def _queues(worker: dict) -> list:
    queues = worker.get("queues")
    return queues if isinstance(queues, list) else []


def _count(value) -> int:
    """A heartbeat's counter; 0 for one an older worker does not send (or sends wrong)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


HANDLERS = {"listQueues": list_queues}
