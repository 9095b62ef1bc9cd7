"""Poisoned job messages never stop a worker: the job fails with an OpenAI-shaped error, the message
is set aside in the dead letters (`store.dead_letters`), and the same worker serves the next job.

Real Redis, real Celery worker processes, the API under gunicorn (`tests.service`). The poisoned
messages go straight onto the queue, the way `tasks.dispatch.submit` sends a job, bypassing the
API's own validation:

* nested 5000 deep: the worker's main process cannot even decode it (JSON's recursion limit);
* nested 700 deep: it decodes, but cannot be pickled to hand it to the pool process (pickle
  needs two frames a level: the RecursionError of issue 10 that took the worker down);
* a batch line nested 700 deep: its line gets its error outcome, the batch completes.

And a job (or batch line) whose pool process is SIGKILLed at every delivery ends failed with
`worker_lost` after LOCALQ_MAX_DELIVERIES, its message in the dead letters.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
import redis

from tests import sse
from tests.service import CHAT, EMBEDDINGS, only_models, running_service, wait_until

MAX_DELIVERIES = 2


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dead-letters")
    env = {"LOCALQ_MAX_DELIVERIES": str(MAX_DELIVERIES), "LOCALQ_FILES_DIR": str(tmp / "files"),
           **only_models(tmp / "models", CHAT, EMBEDDINGS)}
    with running_service(tmp, env, slots=1) as svc:  # prefork: these tests kill its pool process
        yield svc


@pytest.fixture(scope="module")
def celery_app(service):
    from tasks.celery_app import make_app
    from tasks.settings import QueueSettings

    app = make_app(QueueSettings.from_env({"LOCALQ_REDIS_URL": service.redis.url}))
    yield app
    app.close()


@pytest.fixture(scope="module")
def rt(service):
    from tasks.runtime import connect
    from tasks.settings import QueueSettings

    return connect(QueueSettings.from_env({"LOCALQ_REDIS_URL": service.redis.url}))


def nested(depth: int, leaf="x") -> dict:
    """{"a": {"a": ... leaf}} `depth` levels deep, built without recursion."""
    value = leaf
    for _ in range(depth):
        value = {"a": value}
    return value


@contextmanager
def deep_recursion():
    """This (test) process may serialize what a worker's main process cannot take."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 50_000))
    try:
        yield
    finally:
        sys.setrecursionlimit(limit)


def send_job(rt, celery_app, request: dict, *, kind="chat", model="gpt-4o-mini", queue="cpu") -> str:
    """Create the job record and send its message, as `tasks.dispatch.submit` does; the job id."""
    from store.jobs import new_job_id
    from tasks.routing import RUN_TASK as TASK_NAME

    now = time.time()
    job = {"id": new_job_id(), "kind": kind, "model": model, "request": request, "created": int(now),
           "deadline": now + 300, "base_url": None}
    rt.jobs.create(job["id"], kind=kind, model=model, queue=queue, priority="interactive", deadline=now + 300,
                   attached=True)
    with deep_recursion():
        celery_app.send_task(TASK_NAME, args=[job], queue=queue, priority=0)
    return job["id"]


def poisoned_chat(depth: int) -> dict:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": nested(depth)}}}


def final_record(rt, job_id: str, timeout: float = 60) -> dict:
    return wait_until(lambda: (r := rt.jobs.get(job_id)) and r.get("status") in ("succeeded", "failed") and r,
                      timeout, f"job {job_id} to finish")


def assert_openai_error(error: dict) -> None:
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    for internal in ("Recursion", "pickl", "Traceback", "DecodeError", "billiard", "kombu"):
        assert internal not in error["message"], error


def dead_letter_of(service, job_id: str) -> dict:
    from store.dead_letters import read

    client = redis.Redis.from_url(service.redis.url, decode_responses=True)
    return wait_until(lambda: next((e for e in read(client, limit=1000) if e["job_id"] == job_id), None), 10,
                      f"a dead letter for {job_id}")


def embeddings_answer(service) -> dict:
    response = httpx.post(service.base_url + "/v1/embeddings", json={"model": "text-embedding-3-small",
                                                                    "input": "still here"}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def pool_children(parent: int) -> list[int]:
    return [int(pid) for pid in open(f"/proc/{parent}/task/{parent}/children").read().split()]


@pytest.mark.parametrize("depth", [5000, 700])
def test_a_poisoned_job_fails_alone_and_the_same_worker_serves_the_next(service, celery_app, rt, depth):
    worker = service.workers["cpu"]
    job_id = send_job(rt, celery_app, poisoned_chat(depth))
    record = final_record(rt, job_id)

    assert record["status"] == "failed"
    events = rt.events.all(job_id)
    assert events[-1].type == "error"
    payload = events[-1].data
    assert payload["status"] == 400  # the request's own content: sending it again fails the same way
    assert_openai_error(payload["error"])
    assert payload["error"]["type"] == "invalid_request_error"
    assert payload["error"]["code"] == "request_too_deep"
    shown = httpx.get(f"{service.base_url}/v1/jobs/{job_id}", timeout=10).json()
    assert shown["status"] == "failed" and shown["error"] == payload["error"]

    letter = dead_letter_of(service, job_id)
    assert letter["task"] == "localq.run_job" and letter["queue"] == "cpu"
    assert letter["reason"] in ("undecodable", "undeliverable")
    assert "RecursionError" in letter["error"]  # the operator does get the technical cause
    assert letter["body"].startswith("[[{") and len(letter["body"]) <= 5000

    assert worker.poll() is None, "the worker exited"
    assert embeddings_answer(service)["data"][0]["embedding"]
    assert service.workers["cpu"] is worker and worker.poll() is None  # the same process served it


def test_a_poisoned_batch_line_gets_its_error_and_the_batch_completes(service, celery_app):
    from openai import OpenAI

    from store.batches import lines_key
    from tasks.routing import LINES_TASK
    from store.batches import BatchStore
    from store.dead_letters import read

    store = redis.Redis.from_url(service.redis.url, decode_responses=True)
    batches = BatchStore(store)
    batch_id = batches.create(input_file_id="file-unused", endpoint="/v1/embeddings", completion_window="24h",
                              metadata=None, window_seconds=86400)["id"]
    store.hset(lines_key(batch_id), mapping={"fine": 0, "poisoned": 1})
    assert batches.start(batch_id, 2)
    body = {"model": "text-embedding-3-small", "input": "a fine line"}
    with deep_recursion():  # each line as `tasks.batch_run.send_lines` sends it
        for line, custom_id, line_body in ((0, "fine", body), (1, "poisoned", {**body, "input": nested(700)})):
            celery_app.send_task(LINES_TASK, args=[batch_id, [[line, custom_id, line_body]]], queue="cpu",
                                 priority=9)

    client = OpenAI(base_url=service.base_url + "/v1", api_key="unused", timeout=60, max_retries=0)
    final = wait_until(lambda: (b := client.batches.retrieve(batch_id)).status in (
        "completed", "failed", "expired", "cancelled") and b, 120, "the batch to finish", interval=0.5)
    assert final.status == "completed", final
    assert (final.request_counts.total, final.request_counts.completed, final.request_counts.failed) == (2, 1, 1)
    errors = [json.loads(x) for x in client.files.content(final.error_file_id).text.splitlines() if x]
    assert [e["custom_id"] for e in errors] == ["poisoned"]
    response = errors[0]["response"]
    assert response["status_code"] == 400
    assert_openai_error(response["body"]["error"])
    assert response["body"]["error"]["code"] == "request_too_deep"

    letter = next(e for e in read(store, limit=1000) if e["task"] == LINES_TASK)
    assert letter["job_id"] == batch_id and letter["reason"] == "undeliverable"
    assert service.workers["cpu"].poll() is None


def hold_unacked(client, queue: str) -> None:
    """Take the next message off `queue` into kombu's unacknowledged set, as a worker that died
    holding it leaves it (received long ago: the next worker restores it on its first check)."""
    raw = client.rpop(queue)
    message = json.loads(raw)
    tag = message["properties"]["delivery_tag"]
    client.hset("unacked", tag, json.dumps([message, "", queue]))
    client.zadd("unacked_index", {tag: 0})


def test_a_worker_started_on_a_queue_holding_poisoned_messages_keeps_running(service, celery_app, rt):
    """As after a restart on the same data: poisoned messages wait on the queue, and one in the
    unacknowledged set, before the worker starts; a client already streams a job's events."""
    queue = "gpu"  # no worker of the service consumes it yet
    held = send_job(rt, celery_app, poisoned_chat(700), queue=queue)
    hold_unacked(redis.Redis.from_url(service.redis.url, decode_responses=True), queue)
    deep = send_job(rt, celery_app, poisoned_chat(5000), queue=queue)
    unpicklable = send_job(rt, celery_app, poisoned_chat(700), queue=queue)
    normal = send_job(rt, celery_app, {"model": "text-embedding-3-small", "input": "after the poison"},
                      kind="embedding", model="text-embedding-3-small", queue=queue)
    events: list[sse.Event] = []

    def stream():
        with httpx.stream("GET", f"{service.base_url}/v1/jobs/{unpicklable}/events", timeout=120) as response:
            events.extend(sse.events(response.iter_lines()))

    reader = threading.Thread(target=stream, daemon=True)
    reader.start()
    worker = service.start_worker("gpu", queue)
    try:
        for job_id in (deep, unpicklable, held):
            assert final_record(rt, job_id, timeout=120)["status"] == "failed"
        assert final_record(rt, normal, timeout=120)["status"] == "succeeded"
        assert worker.poll() is None
        reader.join(30)
        assert "error" in [event.event for event in events], events
        data = json.loads(events[-1].data)
        assert_openai_error(data["error"])
    finally:
        service.stop_worker("gpu")


def test_a_job_that_kills_its_pool_process_every_time_ends_in_the_dead_letters(service, celery_app, rt):
    parent = service.workers["cpu"].pid
    # killed as soon as it is marked running: a fresh pool process is still importing the model code then
    job_id = send_job(rt, celery_app, {"model": "text-embedding-3-small", "input": "never embedded"},
                      kind="embedding", model="text-embedding-3-small")
    for delivery in range(1, MAX_DELIVERIES + 1):
        wait_until(lambda: (r := rt.jobs.get(job_id)) and r.get("attempts") == str(delivery)
                   and r.get("status") == "running", 60, f"delivery {delivery}", interval=0.01)
        for child in pool_children(parent):
            os.kill(child, signal.SIGKILL)
    record = final_record(rt, job_id, timeout=120)
    assert record["status"] == "failed"
    error = rt.events.all(job_id)[-1].data
    assert error["status"] == 500 and error["error"]["code"] == "worker_lost"
    letter = dead_letter_of(service, job_id)
    assert letter["reason"] == "worker_lost" and letter["task"] == "localq.run_job"
    assert service.workers["cpu"].pid == parent and service.workers["cpu"].poll() is None


def test_a_batch_line_that_kills_its_pool_process_every_time_gets_a_worker_lost_error(service, celery_app):
    from openai import OpenAI

    from store.batches import deliveries_key, lines_key
    from tasks.routing import LINES_TASK
    from store.batches import BatchStore
    from store.dead_letters import read

    store = redis.Redis.from_url(service.redis.url, decode_responses=True)
    batches = BatchStore(store)
    batch_id = batches.create(input_file_id="file-unused", endpoint="/v1/embeddings", completion_window="24h",
                              metadata=None, window_seconds=86400)["id"]
    store.hset(lines_key(batch_id), "killer", 0)
    assert batches.start(batch_id, 1)
    body = {"model": "text-embedding-3-small", "input": "never embedded"}
    celery_app.send_task(LINES_TASK, args=[batch_id, [[0, "killer", body]]], queue="cpu", priority=9)
    parent = service.workers["cpu"].pid
    for delivery in range(1, MAX_DELIVERIES + 1):
        wait_until(lambda: store.hget(deliveries_key(batch_id), "killer") == str(delivery), 60,
                   f"delivery {delivery}", interval=0.01)
        for child in pool_children(parent):
            os.kill(child, signal.SIGKILL)

    client = OpenAI(base_url=service.base_url + "/v1", api_key="unused", timeout=60, max_retries=0)
    final = wait_until(lambda: (b := client.batches.retrieve(batch_id)).status in (
        "completed", "failed", "expired", "cancelled") and b, 120, "the batch to finish", interval=0.5)
    assert final.status == "completed" and final.request_counts.failed == 1, final
    [error] = [json.loads(x) for x in client.files.content(final.error_file_id).text.splitlines() if x]
    assert error["custom_id"] == "killer" and error["response"]["status_code"] == 500
    assert error["response"]["body"]["error"]["code"] == "worker_lost"
    letter = next(e for e in read(store, limit=1000) if e["job_id"] == batch_id)
    assert letter["reason"] == "worker_lost" and letter["task"] == LINES_TASK
    assert service.workers["cpu"].pid == parent and service.workers["cpu"].poll() is None


def test_dead_letters_are_counted_and_listed(service, celery_app, rt):
    for depth in (5000, 700):
        final_record(rt, send_job(rt, celery_app, poisoned_chat(depth)))
    metrics = httpx.get(service.base_url + "/metrics", timeout=10).text
    counted = {line.split("}")[0]: float(line.split()[-1]) for line in metrics.splitlines()
               if line.startswith("localq_dead_letters_total{")}
    assert counted['localq_dead_letters_total{reason="undecodable"'] >= 1, metrics
    assert counted['localq_dead_letters_total{reason="undeliverable"'] >= 1, metrics

    import subprocess

    from ops.stack import REPO

    env = {**os.environ, "LOCALQ_REDIS_URL": service.redis.url, "COLUMNS": "250"}
    listed = subprocess.run([sys.executable, "-m", "ops.cli", "dead-letters", "--json", "--limit", "2"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=60, check=True)
    entries = json.loads(listed.stdout)
    assert len(entries) == 2 and all({"id", "job_id", "task", "reason", "error", "at"} <= set(e) for e in entries)
    table = subprocess.run([sys.executable, "-m", "ops.cli", "dead-letters"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=60, check=True)
    assert entries[0]["job_id"] in table.stdout


# --- the pure parts, without a service ----------------------------------------------------------


def test_the_client_sees_400_for_nesting_and_500_for_anything_else():
    from kombu.exceptions import DecodeError

    from tasks.handoff import client_error, describe

    decode_error = DecodeError("maximum recursion depth exceeded while decoding a JSON object")
    decode_error.__context__ = RecursionError("deep")  # kombu raises its DecodeError while handling it
    assert client_error(decode_error)["status"] == 400
    assert client_error(RecursionError())["error"]["code"] == "request_too_deep"
    other = client_error(OSError("pipe closed"))
    assert other["status"] == 500 and other["error"]["type"] == "server_error"
    assert "pipe closed" not in other["error"]["message"]
    assert describe(decode_error).startswith("DecodeError: ") and "<- RecursionError: deep" in describe(decode_error)


def test_the_job_id_comes_from_the_arguments_or_the_start_of_an_undecodable_body():
    from tasks.handoff import _job_id

    job = "job_" + "ab" * 16
    assert _job_id("localq.run_job", [{"id": job}], b"") == job
    assert _job_id("localq.batch.lines", ["batch_1f", []], b"") == "batch_1f"
    assert _job_id("localq.run_job", None, f'[[{{"id": "{job}", "request": {{"a": {{"a"'.encode()) == job
    assert _job_id("localq.batch.lines", None, b'[["batch_0a", [[0, "c", {"a":') == "batch_0a"
    # an id further in (say, inside the request) never names the job
    assert _job_id("localq.run_job", None, f'[[{{"kind": "chat", "id": "{job}"'.encode()) is None
    assert _job_id("localq.batch.finalize", None, b'["batch_0a"]') is None
