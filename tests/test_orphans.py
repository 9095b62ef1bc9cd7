"""Jobs on a gone worker's own queue go back to their model's queue (`tasks.orphans`), on a real Redis."""

from __future__ import annotations

import base64
import json

import pytest

from store import heartbeats
from tasks import orphans
from tasks.routing import queue_keys
from tasks.routing import own_queue


@pytest.fixture
def client(redis_db):
    return redis_db


@pytest.fixture
def celery_app(redis_server):
    from tasks.celery_app import make_app
    from tasks.settings import QueueSettings

    app = make_app(QueueSettings.from_env({"LOCALQ_REDIS_URL": redis_server.url}))
    yield app
    app.close()


def send(app, queue: str, job: dict, priority: int = 0) -> None:
    app.send_task("localq.run_job", args=[job], queue=queue, priority=priority)


def jobs_on(client, queue: str) -> list[tuple[int, str, str]]:
    """(priority step index, job id, routing key) of every message on `queue`, next served first."""
    found = []
    for index, key in enumerate(queue_keys(queue)):
        for raw in reversed(client.lrange(key, 0, -1)):
            message = json.loads(raw)
            args = json.loads(base64.b64decode(message["body"]))[0]
            found.append((index, args[0]["id"], message["properties"]["delivery_info"]["routing_key"]))
    return found


def test_a_gone_workers_jobs_move_to_their_fallback_queues_in_order(client, celery_app):
    own = own_queue("gpu1@h")
    send(celery_app, own, {"id": "a", "model": "m", "fallback_queue": "gpu.1"})
    send(celery_app, own, {"id": "b", "model": "m", "fallback_queue": "gpu"})
    send(celery_app, own, {"id": "c", "model": "m", "fallback_queue": "gpu.1"}, priority=9)
    send(celery_app, own, {"id": "d", "model": "m", "fallback_queue": "gpu.1"})
    send(celery_app, "gpu.1", {"id": "waiting", "model": "m"})
    assert orphans.rescue(client, "gpu1@h") == 4
    assert jobs_on(client, own) == []
    # a then d (their order kept) before the job that was already waiting; c keeps its batch priority
    assert jobs_on(client, "gpu.1") == [(0, "a", "gpu.1"), (0, "d", "gpu.1"), (0, "waiting", "gpu.1"),
                                        (3, "c", "gpu.1")]
    assert jobs_on(client, "gpu") == [(0, "b", "gpu")]


def test_without_a_fallback_the_models_queue_then_cpu(client, celery_app):
    own = own_queue("w@h")
    send(celery_app, own, {"id": "known", "model": "pinned"})
    send(celery_app, own, {"id": "unknown", "model": "nobody"})
    resolve = {"pinned": "gpu.0"}.get
    assert orphans.rescue(client, "w@h", resolve) == 2
    assert jobs_on(client, "gpu.0") == [(0, "known", "gpu.0")]
    assert jobs_on(client, "cpu") == [(0, "unknown", "cpu")]


def test_only_workers_without_a_heartbeat_lose_their_queue(client, celery_app):
    send(celery_app, own_queue("alive@h"), {"id": "stays", "model": "m", "fallback_queue": "cpu"})
    send(celery_app, own_queue("gone@h"), {"id": "moves", "model": "m", "fallback_queue": "cpu"}, priority=9)
    heartbeats.publish(client, {"id": "alive@h"}, interval=10)
    assert orphans.rescue_gone(client) == 1
    assert [job for _, job, _ in jobs_on(client, own_queue("alive@h"))] == ["stays"]
    assert [job for _, job, _ in jobs_on(client, "cpu")] == ["moves"]
    assert orphans.rescue_gone(client) == 0


def test_a_stopping_worker_hands_back_its_own_queue(client, celery_app, redis_server, monkeypatch):
    """What `tasks.worker_signals` runs on Celery's worker_shutdown, in the worker's main process."""
    from tasks import worker_signals
    from tasks.runtime import runtime

    monkeypatch.setenv("LOCALQ_REDIS_URL", redis_server.url)
    monkeypatch.setenv("LOCALQ_WORKER_NAME", "cpu0@h")
    runtime.cache_clear()
    try:
        send(celery_app, own_queue("cpu0@h"), {"id": "late", "model": "m", "fallback_queue": "cpu"})
        worker_signals._hand_back_own_queue()
        assert [job for _, job, _ in jobs_on(client, "cpu")] == ["late"]
        assert jobs_on(client, own_queue("cpu0@h")) == []
    finally:
        runtime.cache_clear()
