"""A Redis that stalls (SIGSTOP, then SIGCONT) under running jobs: the API rides over it.

One service of its own (embedded Redis, one CPU worker, the API under gunicorn): stopping its
Redis cannot disturb another module. A stream or a waiting request carries on after a stall
shorter than the API's ride-over with nothing lost; past the ride-over it ends with an
OpenAI-shaped error (in-stream, then `[DONE]`), and the job it was following is not cancelled.
"""

from __future__ import annotations

import json
import os
import signal
import threading

import httpx
import pytest
import redis

from ops.stack import ServiceProcesses
from tests import sse
from tests.service import CHAT, only_models, running_service, wait_until

LONG = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Tell a long story about the sea."}],
        "max_tokens": 300, "ignore_eos": True, "temperature": 0, "seed": 7}
STALL = 10.0  # seconds Redis is stopped (the reproduction): longer than a socket read timeout (5 s)
SHORT_STALL = 7.0  # enough to outlast the 5 s socket read timeout, where a 1 s ride-over gives up
STALL_AT = 20  # chunks read before Redis stops
TIMEOUT = httpx.Timeout(120)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("svc")
    with running_service(tmp, {"LOCALQ_RESUME_GRACE": "1", **only_models(tmp / "models", CHAT)}) as svc:
        warm = httpx.post(svc.base_url + "/v1/chat/completions", json={**LONG, "max_tokens": 1}, timeout=180)
        assert warm.status_code == 200, warm.text
        yield svc


@pytest.fixture(scope="module")
def impatient(service, tmp_path_factory):
    """A second API process, on the same Redis and worker, whose streams and waits ride over Redis
    being away for only 1 s."""
    api = ServiceProcesses(env={**service.env, "LOCALQ_RELAY_RIDE_OVER": "1"},
                           log_dir=tmp_path_factory.mktemp("impatient"))
    api.start_api()
    yield api
    api.stop()


@pytest.fixture(scope="module")
def store(service):
    client = redis.Redis.from_url(service.redis.url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def stall(service):
    """`stall(seconds)`: stop Redis now and let it go on after `seconds` (and at teardown, whatever happened)."""
    pid = service.redis.process.pid
    timers = []

    def start(seconds: float) -> None:
        os.kill(pid, signal.SIGSTOP)
        timer = threading.Timer(seconds, os.kill, (pid, signal.SIGCONT))
        timers.append(timer)
        timer.start()

    yield start
    for timer in timers:
        timer.cancel()
    os.kill(pid, signal.SIGCONT)


def read_stream(url: str, on_chunk=None) -> tuple[str, list[tuple[str | None, str]]]:
    """POST a streaming chat request; its job id and every `(id, data)` event, calling `on_chunk(n)` per event."""
    events = []
    with httpx.stream("POST", url + "/v1/chat/completions", json={**LONG, "stream": True}, timeout=TIMEOUT) as response:
        assert response.status_code == 200
        job_id = response.headers["x-localq-job-id"]
        for event in sse.events(response.iter_lines()):
            events.append((event.id, event.data))
            if on_chunk:
                on_chunk(len(events))
    return job_id, events


def content(chunks: list[dict]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))


def finished(store, job_id: str) -> dict:
    return wait_until(lambda: (r := store.hgetall(f"localq:job:{job_id}")).get("finished_at") and r, 120,
                      f"job {job_id} to finish")


def result_text(record: dict) -> str:
    return json.loads(record["result"])["choices"][0]["message"]["content"]


def deltas_in_log(store, job_id: str) -> int:
    return sum(1 for _, fields in store.xrange(f"localq:job:{job_id}:events") if fields["type"] == "delta")


def test_a_stream_rides_over_a_redis_stall(service, store, stall):
    job_id, events = read_stream(service.base_url, lambda n: n == STALL_AT and stall(STALL))
    assert events[-1][1] == "[DONE]"
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert not [c for c in chunks if "error" in c]
    record = finished(store, job_id)
    assert record["status"] == "succeeded"
    assert len(chunks) == deltas_in_log(store, job_id) and content(chunks) == result_text(record)


def post_across_a_stall(base_url: str, store, stall) -> tuple[httpx.Response, str]:
    """A non-streaming chat call with Redis stalled for SHORT_STALL s once its job is generating;
    (the answer, the job's event log key)."""
    before = set(store.keys("localq:job:*:events"))
    answer = {}
    request = threading.Thread(target=lambda: answer.update(response=httpx.post(
        base_url + "/v1/chat/completions", json=LONG, timeout=TIMEOUT)))
    request.start()
    key = wait_until(lambda: next(iter(set(store.keys("localq:job:*:events")) - before), None), 60, "the job")
    wait_until(lambda: store.xlen(key) >= STALL_AT, 60, "the job to be generating")
    stall(SHORT_STALL)
    request.join(120)
    return answer["response"], key


def test_a_wait_for_a_result_rides_over_a_redis_stall(service, store, stall):
    response, _ = post_across_a_stall(service.base_url, store, stall)
    assert response.status_code == 200, response.text
    record = finished(store, response.headers["x-localq-job-id"])
    assert record["status"] == "succeeded"
    assert response.json()["choices"][0]["message"]["content"] == result_text(record)


def test_past_the_ride_over_a_stream_ends_with_an_error_and_the_job_goes_on(impatient, store, stall):
    job_id, events = read_stream(impatient.base_url, lambda n: n == STALL_AT and stall(SHORT_STALL))
    assert events[-1] == (None, "[DONE]")
    error_id, error_data = events[-2]
    error = json.loads(error_data)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "queue_unavailable"
    assert error_id is None  # the client's Last-Event-ID stays on the last event it really got
    record = finished(store, job_id)
    assert record["status"] == "succeeded"  # not cancelled by the relay that gave up
    # and the client can pick up where it was cut off, losing nothing
    last_id = next(i for i, _ in reversed(events) if i)
    resumed = httpx.get(f"{impatient.base_url}/v1/jobs/{job_id}/events", headers={"Last-Event-ID": last_id},
                        timeout=TIMEOUT)
    rest = [json.loads(event.data) for event in sse.parse(resumed.text)]
    first = [json.loads(data) for _, data in events[:-2]]
    assert content(first) + content(rest[:-1]) == result_text(record)


def test_past_the_ride_over_a_wait_answers_503_and_the_job_goes_on(impatient, store, stall):
    response, key = post_across_a_stall(impatient.base_url, store, stall)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "queue_unavailable"
    job_id = response.headers["x-localq-job-id"]  # where to look for the answer later
    assert f"localq:job:{job_id}:events" == key
    assert finished(store, job_id)["status"] == "succeeded"
