"""`GET /v1/workers` (a localq extension): the workers that sent a heartbeat recently, each with
its job slots, running jobs and batching engines (`store.worker_slots`).

A member key sees only its own project's running jobs: the ids of other projects' jobs are left
out (and their count with them), so no one finds another project's live job here. Owner keys, and
a server without keys, see every job.
"""

from __future__ import annotations

from api.auth import is_owner, project_scope
from api.queue import queue_runtime
from store.heartbeats import live_workers
from store.worker_slots import with_slots


def list_workers(call):
    rt = queue_runtime()
    workers = [with_slots(beat) for beat in live_workers(rt.redis)]
    if not is_owner():
        workers = _own_jobs_only(rt, workers, project_scope())
    return {"object": "list", "data": workers}


def _own_jobs_only(rt, workers: list[dict], project: str) -> list[dict]:
    ids = sorted({job["id"] for worker in workers for job in worker["running_jobs"]}
                 | {worker["current_job"] for worker in workers if isinstance(worker.get("current_job"), str)})
    own = {job_id for job_id, owner in zip(ids, rt.jobs.projects(ids), strict=True) if owner == project}
    shown = []
    for worker in workers:
        running = [job for job in worker["running_jobs"] if job["id"] in own]
        visible = {**worker, "running_jobs": running}
        if isinstance(worker.get("current_job"), str) and worker["current_job"] not in own:
            first = running[0] if running else {"id": None, "model": None}  # as a worker shows its first job
            visible["current_job"], visible["current_job_model"] = first["id"], first["model"]
        shown.append(visible)
    return shown


HANDLERS = {"listWorkers": list_workers}
