"""Job records in Redis: status, timestamps, cancel flags and delivery counts.

A job's record is a hash that both sides write: the API creates it and may flag it cancelled,
the worker moves it through running to a final status. Everything expires with the job TTL.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import redis

FINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled", "expired"})

# OpenAI object type of each job kind's result, shown in GET /v1/jobs/{id}.
KIND_TYPES = {
    "chat": "chat.completion",
    "completion": "text_completion",
    "embedding": "embedding",
    "tokenize": "tokenize",
    "detokenize": "detokenize",
    "response": "response",
    "chat_tokens": "response.input_tokens",
}


def job_key(job_id: str) -> str:
    return f"localq:job:{job_id}"


def cancel_key(job_id: str) -> str:
    """Set when a job's cancel is requested; a running job checks it between tokens."""
    return f"{job_key(job_id)}:cancel"


def new_job_id() -> str:
    return "job_" + uuid.uuid4().hex


class JobStore:
    def __init__(self, client: redis.Redis, ttl: float):
        self.client = client
        self.ttl = int(ttl)

    def create(self, job_id: str, *, kind: str, model: str, queue: str, priority: str, deadline: float,
               attached: bool, project: str = "", pipe=None) -> None:
        """A queued job's record; `project` owns the job, its events and its result."""
        self.update(
            job_id, pipe, id=job_id, kind=kind, model=model, queue=queue, priority=priority, status="queued",
            created_at=f"{time.time():.6f}", deadline=f"{deadline:.6f}", attached="1" if attached else "0",
            attempts="0", project=project,
        )

    def get(self, job_id: str, project: str | None = None) -> dict[str, str] | None:
        """The job's record; None when there is none, or it is not `project`'s (None: any project's)."""
        raw = self.client.hgetall(job_key(job_id))
        if not raw:
            return None
        record = {_text(k): _text(v) for k, v in raw.items()}
        if project is not None and record.get("project", "") != project:
            return None
        return record

    def projects(self, job_ids: list[str]) -> list[str | None]:
        """The owning project of each job (None for a job with no record), in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(job_key(job_id), "project")
        return [None if found is None else _text(found) for found in pipe.execute()]

    def update(self, job_id: str, pipe=None, **fields: Any) -> None:
        """Set fields (JSON-encoding non-strings); queued on `pipe` if given, else sent at once."""
        encoded = {k: v if isinstance(v, str) else json.dumps(v, separators=(",", ":")) for k, v in fields.items()}
        own = pipe is None
        pipe = self.client.pipeline() if own else pipe
        pipe.hset(job_key(job_id), mapping=encoded)
        pipe.expire(job_key(job_id), self.ttl)
        if own:
            pipe.execute()

    def begin_delivery(self, job_id: str, worker: str, pipe) -> None:
        """Queue on `pipe`: count this delivery, read the cancel flag, mark the job running.

        One round trip at the start of every job; the task reads the count (first reply) and
        the flag (second) and overwrites the status at once if the job must not run after all.
        """
        pipe.hincrby(job_key(job_id), "attempts", 1)
        pipe.exists(cancel_key(job_id))
        self.update(job_id, pipe, status="running", started_at=f"{time.time():.6f}", worker=worker)

    def finish(self, job_id: str, status: str, *, result: Any = None, error: Any = None, pipe=None) -> None:
        fields: dict[str, Any] = {"status": status, "finished_at": f"{time.time():.6f}"}
        if result is not None:
            fields["result"] = result
        if error is not None:
            fields["error"] = error
        self.update(job_id, pipe, **fields)

    def request_cancel(self, job_id: str) -> None:
        self.client.set(cancel_key(job_id), "1", ex=self.ttl)

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.client.exists(cancel_key(job_id)))

    def attach(self, job_id: str) -> int:
        """A client started reading the job's events; jobs with readers are not cancelled."""
        key = f"{job_key(job_id)}:readers"
        pipe = self.client.pipeline()
        pipe.incr(key)
        pipe.expire(key, self.ttl)
        return int(pipe.execute()[0])

    def detach(self, job_id: str) -> int:
        return int(self.client.decr(f"{job_key(job_id)}:readers"))

    def readers(self, job_id: str) -> int:
        return int(self.client.get(f"{job_key(job_id)}:readers") or 0)


def public_view(record: dict[str, str]) -> dict:
    """The job as `GET /v1/jobs/{id}` shows it (the overlay's LocalqJob)."""

    def seconds(name: str) -> int | None:
        value = record.get(name)
        return int(float(value)) if value else None

    def decoded(name: str):
        value = record.get(name)
        return json.loads(value) if value else None

    return {
        "id": record["id"],
        "object": "job",
        "status": record.get("status", "queued"),
        "type": KIND_TYPES.get(record.get("kind", ""), record.get("kind", "")),
        "model": record.get("model", ""),
        "created_at": seconds("created_at") or 0,
        "started_at": seconds("started_at"),
        "finished_at": seconds("finished_at"),
        "queue": record.get("queue", ""),
        "worker": record.get("worker", "").rpartition(":")[0] or None,  # "<node name>:<pid>" -> node name
        "error": decoded("error"),
        "result": decoded("result"),
    }


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value
