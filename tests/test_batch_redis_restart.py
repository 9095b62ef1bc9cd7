"""Redis (append-only file) restarted in the middle of a batch: the batch still completes, at once.

A real stack: embedded Redis with AOF, one Celery worker, the API, the default SmolLM2 chat and
MiniLM embedding models. While the batch runs, Redis is shut down (SHUTDOWN flushes the AOF) and
started again on the same port with the same data. The worker's task code rides over the outage
(`tasks.runtime` retries Redis commands), Celery's consumer reconnects, the task running across
the restart is acknowledged afterwards, and the batch must finish well within the broker's
visibility timeout (660 s) with every line in the output exactly once and no error lines.

kombu's Redis transport can lose the message it is fetching at the moment Redis goes down (BRPOP
takes it off the queue before it is recorded as unacknowledged; the AOF shows the pop and no
record). The worker's sweep (`tasks.sweeper`) sends such lines again; a test loses a message on
purpose to show it.
"""

from __future__ import annotations

import base64
import json
import threading
import time

import httpx
import pytest
import redis
from celery import signals
from openai import APIConnectionError, APIStatusError, OpenAI

from ops.redis_server import RedisServer
from tasks.celery_app import WORKER_PUBLISH_RETRY_POLICY, make_app
from tasks.routing import queue_keys
from tasks.runtime import connect
from tasks.settings import QueueSettings
from tasks.sweeper import LOCK_KEY
from store.admission import Admission
from tests.service import running_service, wait_until

FINISH_WITHIN = 120  # seconds after Redis is back; the visibility timeout is 660
OUTAGE = 1.0  # seconds Redis stays down
API_RESTART_AFTER = 30  # seconds: an outage the API's clients must not wait out
FINAL = {"completed", "failed", "expired", "cancelled"}


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("redis-restart")
    env = {"LOCALQ_FILES_DIR": str(tmp / "files"), "LOCALQ_BATCH_SWEEP_INTERVAL": "1"}
    with running_service(tmp, env) as svc:
        yield svc


def tolerant(call, what: str, timeout: float = 60):
    """`call()`, again while the API answers 503 or cannot be reached (Redis down, or coming back)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except (APIConnectionError, APIStatusError, httpx.HTTPError) as err:
            if isinstance(err, APIStatusError) and err.status_code != 503:
                raise
            assert time.monotonic() < deadline, f"{what}: still failing after {timeout} s ({err!r})"
            time.sleep(0.2)


def batch_input(endpoint: str, count: int) -> bytes:
    def body(i: int) -> dict:
        if endpoint == "/v1/embeddings":
            return {"model": "text-embedding-3-small", "input": f"sentence number {i} about the sea"}
        return {"model": "gpt-4o-mini", "max_tokens": 4, "temperature": 0, "seed": i,
                "messages": [{"role": "user", "content": f"Say the number {i}."}]}

    return "\n".join(json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": endpoint, "body": body(i)})
                     for i in range(count)).encode()


@pytest.mark.parametrize(("endpoint", "lines"), [("/v1/chat/completions", 60), ("/v1/embeddings", 1500)])
def test_batch_completes_across_a_redis_restart(service, endpoint, lines):
    client = OpenAI(base_url=service.base_url + "/v1", api_key="unused", timeout=60, max_retries=0)
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    client.embeddings.create(model="text-embedding-3-small", input="hi")
    source = client.files.create(file=("restart.jsonl", batch_input(endpoint, lines)), purpose="batch")
    batch = client.batches.create(input_file_id=source.id, endpoint=endpoint, completion_window="24h")

    def progress():
        found = tolerant(lambda: client.batches.retrieve(batch.id), "retrieve")
        return found, found.request_counts.completed + found.request_counts.failed

    seen = wait_until(lambda: ((s := progress())[1] >= lines // 5 or s[0].status in FINAL) and s, 180,
                      f"a fifth of the {lines} lines to be done", interval=0.05)
    assert seen[0].status == "in_progress", seen[0]

    service.redis.stop()  # graceful: SHUTDOWN, the append-only file is flushed
    time.sleep(OUTAGE)
    service.redis.start()  # same port, same data dir
    back = time.monotonic()

    final = wait_until(lambda: (f := progress()[0]).status in FINAL and f, FINISH_WITHIN,
                       f"the batch to finish within {FINISH_WITHIN} s of the restart", interval=0.25)
    took = time.monotonic() - back
    print(f"\n{endpoint} batch of {lines} lines: {seen[1]} done before the restart, final {took:.1f} s after it")

    assert final.status == "completed", final
    assert final.request_counts.total == lines
    assert final.request_counts.completed == lines and final.request_counts.failed == 0, final.request_counts
    assert final.error_file_id is None
    output = [json.loads(x) for x in client.files.content(final.output_file_id).text.splitlines() if x]
    ids = [o["custom_id"] for o in output]
    assert ids == [f"line-{i}" for i in range(lines)]  # every line exactly once, in input order
    assert all(o["response"]["status_code"] == 200 and o["error"] is None for o in output)

    store = redis.Redis.from_url(service.redis.url, decode_responses=True)
    # the message the worker was running across the restart was acknowledged afterwards (through
    # the consumer's old channel): nothing is left for the 660 s visibility timeout to bring back
    wait_until(lambda: not store.hlen("unacked"), 10, "every message to be acknowledged")
    # the worker's expiry sweep lives on after the restart: it takes its lock again
    store.delete(LOCK_KEY)
    wait_until(lambda: store.exists(LOCK_KEY), 10, "the batch sweep to take its lock again after the Redis restart")


def test_a_line_whose_message_the_broker_lost_still_runs(service):
    """What a restart can do to the message being fetched at that moment, done on purpose: the
    worker's sweep notices the line has no message left anywhere, gives back the room its chunk
    held in the fair-share admission, and sends the line again."""
    client = OpenAI(base_url=service.base_url + "/v1", api_key="unused", timeout=60, max_retries=0)
    lines = 40
    source = client.files.create(file=("lost.jsonl", batch_input("/v1/chat/completions", lines)), purpose="batch")
    batch = client.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h")
    store = redis.Redis.from_url(service.redis.url, decode_responses=True)
    batch_list = queue_keys("cpu")[-1]  # where batch lines wait (priority 9)

    def take_a_line_message():
        """Remove a queued line message of the batch (one admitted, waiting for a free slot)."""
        for raw in store.lrange(batch_list, 0, -1):
            args = json.loads(base64.b64decode(json.loads(raw)["body"]))[0]
            if args[0] == batch.id and store.lrem(batch_list, 1, raw) == 1:  # the broker "lost" it
                return args
        return None

    args = wait_until(take_a_line_message, 30, "a line message of the batch to take", interval=0.01)
    lost = [item[1] for item in args[1]]
    assert len(args) == 3 and args[2]["token"].startswith(batch.id), "an admitted chunk carries its ticket"

    final = wait_until(lambda: (f := client.batches.retrieve(batch.id)).status in FINAL and f, 90,
                       "the batch to finish", interval=0.25)
    assert final.status == "completed" and final.request_counts.completed == lines, final
    output = [json.loads(x) for x in client.files.content(final.output_file_id).text.splitlines() if x]
    assert [o["custom_id"] for o in output] == [f"line-{i}" for i in range(lines)]
    log = (service.log_dir / "worker-cpu.log").read_text()
    assert f"cpu: admitted batch chunks with no message left, their room given back: {args[2]['token']}" in log
    assert (f"batch {batch.id}: no message left for {len(lost)} line(s) without an outcome; "
            f"sent them again: {', '.join(lost)}") in log
    assert Admission(store).in_flight("cpu") == 0, "no room is held by a lost chunk"


def test_worker_clients_ride_over_a_redis_restart(tmp_path):
    """`tasks.runtime`'s worker clients: commands during a restart wait for Redis instead of failing."""
    with RedisServer(tmp_path / "redis") as server:
        rt = connect(QueueSettings(redis_url=server.url), ride_over=True)
        rt.redis.set("k", "before")
        script = rt.redis.register_script("return redis.call('GET', KEYS[1])")
        assert script(keys=["k"]) == "before"
        first_run = rt.redis.info("server")["run_id"]
        server.stop()
        restarter = threading.Timer(2.0, server.start)
        restarter.start()
        try:
            # issued while Redis is down: it can only succeed by waiting for the restart
            assert rt.redis.get("k") == "before"  # and the AOF kept the value
            assert rt.redis.info("server")["run_id"] != first_run, "answered by the server that was stopped"
            assert script(keys=["k"]) == "before"  # the script cache is gone: redis-py loads it again
            pipe = rt.redis.pipeline(transaction=False)
            pipe.hset("h", "a", 1).hget("h", "a")
            assert pipe.execute() == [1, "1"]
        finally:
            restarter.join()
        api = connect(QueueSettings(redis_url=server.url))  # the API's: no long ride-over
        server.stop()
        # a restart the worker's clients would wait for (their ride-over lasts longer); the API's fail first
        late_restart = threading.Timer(API_RESTART_AFTER, server.start)
        late_restart.start()
        try:
            with pytest.raises(redis.ConnectionError):
                api.redis.get("k")
        finally:
            late_restart.cancel()
            late_restart.join()


def test_workers_publish_with_a_long_retry_policy():
    worker_app = make_app(QueueSettings())
    default = dict(worker_app.conf.task_publish_retry_policy)
    assert default["max_retries"] == 3  # Celery's: what the API publishes with
    worker_app.amqp.send_task_message  # noqa: B018 - built (and cached) with the default policy

    class Worker:  # what Celery sends worker_init with (hashable, as signal senders must be)
        app = worker_app

    signals.worker_init.send(sender=Worker())
    assert worker_app.conf.task_publish_retry_policy == WORKER_PUBLISH_RETRY_POLICY
    assert "send_task_message" not in worker_app.amqp.__dict__  # built again, from the new policy
