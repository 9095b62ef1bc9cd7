"""`GET /metrics`: Prometheus text that parses, request counters that move by exactly what was sent,
cluster-wide job metrics recorded by the worker in Redis, and correct sums across the several
processes of `localq api --workers 2` (prometheus_client's multiprocess mode)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import redis
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from api.health import monitor_client
from api.settings import Settings
from ops.redis_server import free_port
from store import heartbeats, metrics
from tasks.routing import queue_keys
from tests.service import wait_until

REPO = Path(__file__).resolve().parent.parent
CHAT_MODEL = "gpt-4o-mini"
CHAT_CONFIG = "smollm2-135m-instruct"  # the config gpt-4o-mini is an alias of
HELLO = [{"role": "user", "content": "Write one sentence about the sea."}]


class Scrape:
    """One parsed scrape: sample values by name and labels, metric types by family."""

    def __init__(self, text: str):
        self.text = text
        self.samples: dict[tuple[str, frozenset], float] = {}
        self.types: dict[str, str] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def value(self, name: str, **labels) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def labels(self, name: str, label: str) -> set[str]:
        return {dict(key)[label] for sample, key in self.samples if sample == name and label in dict(key)}

    def bucket(self, name: str, le: str, **labels) -> float:
        return self.value(name + "_bucket", le=le, **labels)


def delta(after: Scrape, before: Scrape, name: str, **labels) -> float:
    return after.value(name, **labels) - before.value(name, **labels)


@pytest.fixture
def store(redis_db):
    return redis_db


def make_client(env: dict):
    from api.app import create_app

    return create_app(Settings.from_env(env)).test_client()


@pytest.fixture
def api(redis_server, store):
    return make_client({"LOCALQ_REDIS_URL": redis_server.url})


def scrape(client) -> Scrape:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    return Scrape(response.get_data(as_text=True))


# ----- this API's requests ------------------------------------------------------------------------


def test_request_counters_move_by_exactly_the_requests_sent(api):
    before = scrape(api)
    for _ in range(5):
        assert api.get("/v1/models").status_code == 200
    for _ in range(3):
        assert api.get("/v1/models/gpt-4o-mini").status_code == 200
    for _ in range(2):
        assert api.get("/v1/models/no-such-model").status_code == 404
    for _ in range(4):
        assert api.get(f"/no/such/path/{_}").status_code == 404
    assert api.post("/v1/models").status_code == 405
    assert api.open("/v1/models", method="BREW").status_code == 405
    after = scrape(api)

    requests = "localq_http_requests_total"
    assert delta(after, before, requests, route="/v1/models", method="GET", status="200") == 5
    assert delta(after, before, requests, route="/v1/models/<model>", method="GET", status="200") == 3
    assert delta(after, before, requests, route="/v1/models/<model>", method="GET", status="404") == 2
    assert delta(after, before, requests, route="unmatched", method="GET", status="404") == 4
    assert delta(after, before, requests, route="unmatched", method="POST", status="405") == 1
    assert delta(after, before, requests, route="unmatched", method="other", status="405") == 1
    # the first scrape itself is counted once it has answered
    assert delta(after, before, requests, route="/metrics", method="GET", status="200") == 1
    # labels are URL rules, never what a client put in the path
    routes = after.labels(requests, "route")
    assert not any("gpt-4o-mini" in r or "no-such" in r or "/no/such" in r for r in routes), routes
    # methods are HTTP's own or "other" (other tests in this process may have used any of them)
    assert after.labels(requests, "method") <= {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "other"}
    assert "BREW" not in after.labels(requests, "method")

    latency = "localq_http_request_duration_seconds"
    assert delta(after, before, latency + "_count", route="/v1/models", method="GET") == 5
    assert delta(after, before, latency + "_count", route="/v1/models/<model>", method="GET") == 5
    assert delta(after, before, latency + "_sum", route="/v1/models", method="GET") > 0
    buckets = [after.bucket(latency, le, route="/v1/models", method="GET") for le in ("0.005", "0.1", "1.0", "+Inf")]
    assert buckets == sorted(buckets) and buckets[-1] == after.value(latency + "_count", route="/v1/models",
                                                                     method="GET")
    assert after.types[latency] == "histogram" and after.types["localq_http_requests"] == "counter"


def test_an_api_key_is_not_asked_for_metrics(redis_server, store):
    locked = make_client({"LOCALQ_REDIS_URL": redis_server.url, "LOCALQ_API_KEYS": "sk-secret"})
    before = scrape(locked)
    assert locked.get("/v1/models").status_code == 401
    after = scrape(locked)
    assert delta(after, before, "localq_http_requests_total", route="/v1/models", method="GET", status="401") == 1


# ----- the cluster: queues, workers, jobs (from Redis) ----------------------------------------------


def test_cluster_metrics_come_from_redis(api, store):
    store.lpush(queue_keys("cpu")[0], "m1", "m2")
    store.lpush(queue_keys("cpu")[-1], "m3", "m4", "m5")  # the batch priority list of the same queue
    heartbeats.publish(store, {"id": "cpu@a", "device": "cpu", "queues": ["cpu", "worker.cpu@a"]}, 30)
    heartbeats.publish(store, {"id": "cpu@b", "device": "cpu", "queues": ["cpu", "worker.cpu@b"]}, 30)
    store.lpush("worker.cpu@a", "m6")
    for duration, ttft, tokens in ((0.2, 0.02, 5), (0.3, 0.04, 6), (7.0, 0.6, 7)):
        metrics.record_job(store, kind="chat", outcome="succeeded", model="smol", duration=duration, ttft=ttft,
                           completion_tokens=tokens)
    metrics.record_job(store, kind="chat", outcome="failed")
    metrics.record_job(store, kind="embedding", outcome="succeeded", model="mini", duration=0.01)

    after = scrape(api)
    assert after.value("localq_redis_up") == 1
    assert after.value("localq_queue_depth", queue="cpu") == 5
    assert after.value("localq_queue_depth", queue="worker.cpu@a") == 1
    assert ("localq_queue_depth", frozenset({("queue", "worker.cpu@b")})) in after.samples  # 0, but there
    assert ("localq_queue_depth", frozenset({("queue", "gpu")})) in after.samples
    assert after.value("localq_workers_alive", device="cpu") == 2
    assert ("localq_workers_alive", frozenset({("device", "gpu")})) in after.samples
    assert after.value("localq_workers_alive", device="gpu") == 0

    assert after.value("localq_jobs_total", kind="chat", outcome="succeeded") == 3
    assert after.value("localq_jobs_total", kind="chat", outcome="failed") == 1
    assert after.value("localq_jobs_total", kind="embedding", outcome="succeeded") == 1
    assert after.value("localq_tokens_generated_total", kind="chat", model="smol") == 18
    assert after.labels("localq_tokens_generated_total", "kind") == {"chat"}

    duration = "localq_job_duration_seconds"
    bounds = ("0.1", "0.25", "0.5", "5.0", "10.0", "+Inf")
    assert [after.bucket(duration, le, kind="chat", model="smol") for le in bounds] == [0, 1, 2, 2, 3, 3]
    assert after.value(duration + "_count", kind="chat", model="smol") == 3
    assert after.value(duration + "_sum", kind="chat", model="smol") == pytest.approx(7.5)
    assert after.value(duration + "_count", kind="embedding", model="mini") == 1
    ttft = "localq_time_to_first_token_seconds"
    bounds = ("0.01", "0.025", "0.05", "0.5", "1.0", "+Inf")
    assert [after.bucket(ttft, le, kind="chat", model="smol") for le in bounds] == [0, 1, 2, 2, 3, 3]
    assert after.value(ttft + "_sum", kind="chat", model="smol") == pytest.approx(0.66)
    assert after.value(ttft + "_count", kind="embedding", model="mini") == 0  # one-piece jobs have none
    assert after.types == {**after.types, "localq_jobs": "counter", "localq_tokens_generated": "counter",
                           duration: "histogram", ttft: "histogram", "localq_queue_depth": "gauge",
                           "localq_workers_alive": "gauge", "localq_redis_up": "gauge"}

    store.delete(heartbeats.worker_key("cpu@b"))  # gone: its TTL ran out
    assert scrape(api).value("localq_workers_alive", device="cpu") == 1


def test_every_configured_models_queue_is_reported(redis_server, store, models_dir, write_model):
    write_model("big.yaml", {"name": "big", "backend": "llama-cpp", "device": "gpu", "gpus": [1],
                             "parameters": {"model": "b.gguf"}})
    client = make_client({"LOCALQ_REDIS_URL": redis_server.url, "LOCALQ_MODELS_DIR": str(models_dir)})
    store.lpush(queue_keys("gpu.1")[0], "m")
    assert scrape(client).value("localq_queue_depth", queue="gpu.1") == 1


def within(seconds: float, call):
    """`call()`'s result, or a failure if it has not returned after `seconds` (a daemon thread, so a
    hung call neither hangs the test nor the end of the session)."""
    outcome: dict = {}

    def run():
        try:
            outcome["result"] = call()
        except BaseException as err:  # re-raised in the test's own thread
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"no answer after {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def test_a_scrape_without_redis_still_answers():
    client = make_client({"LOCALQ_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    client.get("/v1/models")
    # a scrape that never answers fails here (60 s: a hang, not a speed target), and the client it
    # reads Redis with gives up at once rather than waiting out retries (see api.health)
    after = within(60, lambda: scrape(client))
    with client.application.app_context():
        monitor = monitor_client()
    kwargs = monitor.connection_pool.connection_kwargs
    assert kwargs["socket_connect_timeout"] and kwargs["socket_timeout"]  # set: never the OS's minutes
    assert monitor.get_retry().get_retries() == 0
    assert after.value("localq_redis_up") == 0
    assert "localq_queue_depth" not in after.types and "localq_jobs" not in after.types  # unknown, not zero
    assert after.value("localq_http_requests_total", route="/v1/models", method="GET", status="200") >= 1


def test_stored_buckets_that_are_no_longer_configured_fold_into_the_next_one_up():
    field = metrics._field
    parsed = metrics.parse_job_metrics([{}, {}, {
        field("chat", "m", "0.07"): "2",  # an old bound, between 0.05 and 0.1
        field("chat", "m", "0.1"): "1",
        field("chat", "m", "+Inf"): "1",
        field("chat", "m", "sum"): "1000.5",
        "not json": "9",
    }, {}])
    histogram = parsed.duration[("chat", "m")]
    cumulative = dict(histogram.buckets)
    assert cumulative[0.05] == 0 and cumulative[0.1] == 3 and cumulative[600.0] == 3
    assert cumulative[float("inf")] == histogram.count == 4 and histogram.sum == 1000.5


def test_the_first_token_is_the_first_delta_with_output():
    sent, clock = [], iter([1.0, 2.5, 9.0])
    first = metrics.FirstToken(lambda *event: sent.append(event), started=0.5, clock=lambda: next(clock))
    role = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    first.emit("status", {"status": "running"})
    first.emit("delta", role)
    assert first.seconds is None
    first.emit("delta", {"choices": [{"index": 0, "delta": {"content": "Hi"}}]})
    first.emit("delta", {"choices": [{"index": 0, "text": "more"}]})
    first.emit("result", {"usage": {"completion_tokens": 2}})
    assert first.seconds == 0.5  # 1.0 - 0.5: the clock is read once, at the first token
    assert [type_ for type_, _ in sent] == ["status", "delta", "delta", "delta", "result"]
    assert metrics.carries_output({"type": "speech.audio.delta", "audio": "AAAA"})
    assert not metrics.carries_output({"choices": [], "usage": {"completion_tokens": 3}})
    assert metrics.completion_tokens({"usage": {"prompt_tokens": 4, "total_tokens": 4}}) is None
    assert metrics.completion_tokens({"usage": {"completion_tokens": 7}}) == 7


# ----- a real job through a real worker ----------------------------------------------------------------


def test_a_real_job_moves_the_job_metrics(stack):
    """On the session's shared service: every figure is a difference between two scrapes."""
    base = stack.base_url
    client = OpenAI(base_url=base + "/v1", api_key="unused", timeout=180, max_retries=0)
    get = lambda: Scrape(httpx.get(base + "/metrics", timeout=10).text)  # noqa: E731
    before = get()

    plain = client.chat.completions.create(model=CHAT_MODEL, messages=HELLO, max_tokens=8, temperature=0,
                                           seed=1)
    usage = None
    text = []
    for chunk in client.chat.completions.create(model=CHAT_MODEL, messages=HELLO, max_tokens=6, stream=True,
                                                stream_options={"include_usage": True}, temperature=0, seed=1):
        text.extend(choice.delta.content or "" for choice in chunk.choices)
        usage = chunk.usage or usage
    assert "".join(text) and usage is not None  # the stream went through whole
    tokenized = httpx.post(base + "/v1/tokenize", json={"model": CHAT_MODEL, "content": "Hello there"}, timeout=60)
    assert tokenized.status_code == 200

    # the worker records a job's metrics just after publishing its result: poll briefly
    labels = {"kind": "chat", "model": CHAT_CONFIG}
    after = wait_until(
        lambda: (s := get()) and delta(s, before, "localq_jobs_total", kind="tokenize", outcome="succeeded") == 1
        and delta(s, before, "localq_jobs_total", kind="chat", outcome="succeeded") == 2 and s,
        30, "the job metrics")

    assert delta(after, before, "localq_time_to_first_token_seconds_count", **labels) == 2
    assert delta(after, before, "localq_job_duration_seconds_count", **labels) == 2
    assert delta(after, before, "localq_job_duration_seconds_count", kind="tokenize", model=CHAT_CONFIG) == 1
    assert delta(after, before, "localq_time_to_first_token_seconds_count", kind="tokenize",
                 model=CHAT_CONFIG) == 0
    assert delta(after, before, "localq_tokens_generated_total", **labels) == \
        plain.usage.completion_tokens + usage.completion_tokens
    ttft_sum = delta(after, before, "localq_time_to_first_token_seconds_sum", **labels)
    assert 0 < ttft_sum <= delta(after, before, "localq_job_duration_seconds_sum", **labels)
    assert delta(after, before, "localq_http_requests_total", route="/v1/chat/completions", method="POST",
                 status="200") == 2
    assert after.value("localq_workers_alive", device="cpu") == 1  # the shared service runs one
    # the gauge is what the queue's lists hold (whatever other modules left there)
    with redis.Redis.from_url(stack.redis.url) as queues:
        wait_until(lambda: get().value("localq_queue_depth", queue="cpu") == sum(
            queues.llen(key) for key in queue_keys("cpu")), 30, "the queue depth to match the queue")


# ----- several API processes ---------------------------------------------------------------------------


def test_localq_api_with_two_processes_reports_the_sum_of_both(tmp_path, redis_server):
    samples_dir = tmp_path / "prometheus"
    samples_dir.mkdir()
    port = free_port()
    env = {**os.environ, "LOCALQ_REDIS_URL": redis_server.url, "PROMETHEUS_MULTIPROC_DIR": str(samples_dir)}
    argv = [sys.executable, "-m", "ops.cli", "api", "--host", "127.0.0.1", "--port", str(port), "--workers", "2",
            "--connections", "50"]
    base = f"http://127.0.0.1:{port}"
    with open(tmp_path / "api.log", "wb") as log:
        api = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: httpx.get(base + "/healthz", timeout=1).status_code == 200, 60, "the API")
        sent = 0
        # a new connection per request, so that both processes take some; until both have
        while sent < 600 and len(list(samples_dir.glob("counter_*.db"))) < 2:
            for _ in range(20):
                assert httpx.get(base + "/v1/models", headers={"Connection": "close"}, timeout=10).status_code == 200
                sent += 1
        assert len(list(samples_dir.glob("counter_*.db"))) == 2, "one process took every request"
        counts = set()
        for _ in range(10):  # whichever process answers the scrape
            scraped = Scrape(httpx.get(base + "/metrics", headers={"Connection": "close"}, timeout=10).text)
            counts.add(scraped.value("localq_http_requests_total", route="/v1/models", method="GET", status="200"))
            assert scraped.value("localq_http_request_duration_seconds_count", route="/v1/models",
                                 method="GET") == sent
            assert scraped.value("localq_redis_up") == 1
        assert counts == {sent}
    finally:
        os.killpg(api.pid, signal.SIGTERM)
        try:
            api.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(api.pid, signal.SIGKILL)
            api.wait()


def test_prepare_multiprocess_dir(tmp_path):
    from api.metrics import MULTIPROC_ENV, prepare_multiprocess_dir

    given = tmp_path / "samples"
    given.mkdir()
    (given / "counter_123.db").write_bytes(b"old")
    (given / "keep.txt").write_text("not ours")
    environ = {MULTIPROC_ENV: str(given)}
    assert prepare_multiprocess_dir(environ) == given
    assert sorted(p.name for p in given.iterdir()) == ["keep.txt"]

    environ = {}
    made = prepare_multiprocess_dir(environ)
    assert environ[MULTIPROC_ENV] == str(made) and made.is_dir() and not any(made.iterdir())
    made.rmdir()
