"""End to end through the queue: the `openai` SDK -> API (gunicorn) -> Redis -> Celery worker -> SmolLM2.

One service (embedded Redis, one CPU worker process, the API) serves the whole module; every
request really travels API -> queue -> worker -> Redis Stream -> API -> client.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import struct
import threading
import time

import httpx
import pytest
import redis
from openai import OpenAI

from tests import sse
from tests.service import CHAT, EMBEDDINGS, only_models, running_service, wait_until

CHAT_MODEL = "gpt-4o-mini"
EMBED_MODEL = "text-embedding-3-small"
HELLO = [{"role": "user", "content": "Write one sentence about the sea."}]
GREEDY = {"temperature": 0, "seed": 7}


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    # one slot: a prefork worker, whose pool process these tests kill (a worker with several slots,
    # killed whole, is tests/test_slot_redelivery.py's)
    tmp = tmp_path_factory.mktemp("svc")
    env = {"LOCALQ_RESUME_GRACE": "2", **only_models(tmp / "models", CHAT, EMBEDDINGS)}
    with running_service(tmp, env, slots=1) as svc:
        warm = OpenAI(base_url=svc.base_url + "/v1", api_key="unused", timeout=180, max_retries=0)
        warm.chat.completions.create(model=CHAT_MODEL, messages=HELLO, max_tokens=1)
        yield svc


@pytest.fixture(scope="module")
def client(service):
    return OpenAI(base_url=service.base_url + "/v1", api_key="unused", timeout=120, max_retries=0)


@pytest.fixture(scope="module")
def store(service):
    return redis.Redis.from_url(service.redis.url, decode_responses=True)


def job_record(store, job_id):
    return store.hgetall(f"localq:job:{job_id}")


# ----- the SDK, every endpoint -------------------------------------------------------------------


def test_chat_non_streaming(client, store):
    raw = client.chat.completions.with_raw_response.create(model=CHAT_MODEL, messages=HELLO, max_tokens=12, **GREEDY)
    job_id = raw.headers["x-localq-job-id"]
    completion = raw.parse()
    assert completion.object == "chat.completion" and completion.model == CHAT_MODEL
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    usage = completion.usage
    assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert job_record(store, job_id)["status"] == "succeeded"


def test_chat_streaming(client, service):
    raw = client.chat.completions.with_raw_response.create(model=CHAT_MODEL, messages=HELLO, max_tokens=24,
                                                           stream=True, stream_options={"include_usage": True},
                                                           **GREEDY)
    job_id = raw.headers["x-localq-job-id"]
    chunks = list(raw.parse())
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and 0 < chunks[-1].usage.completion_tokens <= 24
    assert len({c.id for c in chunks}) == 1
    # the same job's non-streaming body (what a non-streaming client would get) says the same
    result = httpx.get(f"{service.base_url}/v1/jobs/{job_id}").json()["result"]
    assert text == result["choices"][0]["message"]["content"] and text
    assert result["usage"] == chunks[-1].usage.model_dump(exclude_none=True)


def test_finish_reason_length(client):
    completion = client.chat.completions.create(model=CHAT_MODEL, messages=HELLO, max_tokens=3, **GREEDY)
    assert completion.choices[0].finish_reason == "length" and completion.usage.completion_tokens == 3


def test_completions_non_streaming_and_streaming(client):
    result = client.completions.create(model=CHAT_MODEL, prompt="The capital of France is", **GREEDY)
    assert result.object == "text_completion" and result.choices[0].text
    assert result.usage.completion_tokens <= 16  # OpenAI's default max_tokens for completions
    streamed = list(client.completions.create(model=CHAT_MODEL, prompt="The capital of France is", stream=True,
                                              **GREEDY))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == result.choices[0].text


def test_embeddings_float_and_base64(client, service):
    floats = client.embeddings.create(model=EMBED_MODEL, input=["hello world", "goodbye"], encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1] and len(floats.data[0].embedding) == 384
    assert floats.usage.prompt_tokens > 0
    raw = httpx.post(service.base_url + "/v1/embeddings", timeout=60,
                     json={"model": EMBED_MODEL, "input": ["hello world", "goodbye"], "encoding_format": "base64"})
    assert raw.status_code == 200
    for item, reference in zip(raw.json()["data"], floats.data):
        decoded = struct.unpack(f"<{len(reference.embedding)}f", base64.b64decode(item["embedding"]))
        assert decoded == pytest.approx(reference.embedding, abs=1e-6)
    # the SDK's own default path (it asks for base64 and decodes it)
    sdk_default = client.embeddings.create(model=EMBED_MODEL, input="hello world")
    assert sdk_default.data[0].embedding == pytest.approx(floats.data[0].embedding, abs=1e-6)


def test_tokenize_and_detokenize(service):
    tokens = httpx.post(service.base_url + "/v1/tokenize", json={"model": CHAT_MODEL, "content": "Hello there"},
                        timeout=60).json()
    assert tokens["tokens"] and all(isinstance(t, int) for t in tokens["tokens"])
    text = httpx.post(service.base_url + "/v1/detokenize", json={"model": CHAT_MODEL, "tokens": tokens["tokens"]},
                      timeout=60).json()
    assert text["content"].strip() == "Hello there"


def test_unknown_model_is_404_before_anything_is_queued(client):
    with pytest.raises(Exception) as info:
        client.chat.completions.create(model="no-such-model", messages=HELLO)
    assert info.value.status_code == 404 and info.value.body["code"] == "model_not_found"


# ----- SSE wire format, resume, job endpoints -------------------------------------------------------


def test_sse_wire_format(service):
    body = {"model": CHAT_MODEL, "messages": HELLO, "max_tokens": 8, "stream": True, **GREEDY}
    with httpx.stream("POST", service.base_url + "/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-localq-job-id"].startswith("job_")
        text = response.read().decode()
    # keep-alives are single comment lines, never a block of their own (see api.sse.KEEPALIVE)
    comments = [line for line in text.split("\n") if line.startswith(":")]
    assert comments and all(line == ": keep-alive" for line in comments)
    data_blocks = sse.blocks(text)
    for block in data_blocks[:-1]:
        assert re.fullmatch(r"id: \d+-\d+\ndata: \{.*\}", block), block
        assert json.loads(block.split("data: ", 1)[1])["object"] == "chat.completion.chunk"
    assert re.fullmatch(r"id: \d+-\d+\ndata: \[DONE\]", data_blocks[-1])
    assert text.endswith("data: [DONE]\n\n")


def test_resume_with_last_event_id_gives_the_uninterrupted_text(client, service, store):
    request = {"model": CHAT_MODEL, "messages": HELLO, "max_tokens": 48, **GREEDY}

    first_part, last_id = [], None
    with httpx.stream("POST", service.base_url + "/v1/chat/completions", json={**request, "stream": True},
                      timeout=60) as response:
        job_id = response.headers["x-localq-job-id"]
        for event in sse.events(response.iter_lines()):
            if not event.done:
                first_part.append(json.loads(event.data))
                last_id = event.id
            if len(first_part) >= 6:
                break  # drop the connection mid-stream
    assert last_id and len(first_part) >= 6

    resumed = httpx.get(f"{service.base_url}/v1/jobs/{job_id}/events", headers={"Last-Event-ID": last_id},
                        timeout=60)
    events = sse.parse(resumed.text)
    ids = [e.id for e in events]
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-")))) and last_id not in ids
    deltas = [json.loads(e.data) for e in events if e.event == "delta"]
    assert events[-1].event == "result"

    def content(chunks):
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])

    # what a client that never lost its connection got: the job's own complete response
    reference = events[-1].data and json.loads(events[-1].data)["choices"][0]["message"]["content"]
    assert content(first_part) + content(deltas) == reference
    assert job_record(store, job_id)["status"] == "succeeded"


def test_job_status_endpoint(client, service):
    raw = client.chat.completions.with_raw_response.create(model=CHAT_MODEL, messages=HELLO, max_tokens=4, **GREEDY)
    job = httpx.get(f"{service.base_url}/v1/jobs/{raw.headers['x-localq-job-id']}").json()
    assert job["object"] == "job" and job["status"] == "succeeded" and job["type"] == "chat.completion"
    assert job["result"]["choices"][0]["message"]["content"] == raw.parse().choices[0].message.content
    assert job["created_at"] <= job["started_at"] <= job["finished_at"] and job["queue"] == "cpu"
    missing = httpx.get(f"{service.base_url}/v1/jobs/job_nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "job_not_found"
    bad_id = httpx.get(f"{service.base_url}/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": "yesterday"})
    assert bad_id.status_code == 400


# ----- cancellation and worker failure ---------------------------------------------------------------


LONG = {"model": CHAT_MODEL, "messages": HELLO, "max_tokens": 1500, "ignore_eos": True, **GREEDY}


def test_client_disconnect_frees_the_worker(service, store, client):
    with httpx.stream("POST", service.base_url + "/v1/chat/completions", json={**LONG, "stream": True},
                      timeout=60) as response:
        long_job = response.headers["x-localq-job-id"]
        seen = 0
        for event in sse.events(response.iter_lines()):
            seen += event.data.startswith("{")
            if seen >= 3:
                break
    raw = client.chat.completions.with_raw_response.create(model=CHAT_MODEL, messages=HELLO, max_tokens=4, **GREEDY)
    next_job = job_record(store, raw.headers["x-localq-job-id"])
    long_record = wait_until(lambda: (r := job_record(store, long_job))["status"] == "cancelled" and r, 30,
                             "the abandoned job to be cancelled")
    generated = sum(1 for _, f in store.xrange(f"localq:job:{long_job}:events") if f["type"] == "delta")
    assert generated < 1000, "the abandoned job kept generating"
    # the worker was freed for the next job (the disconnected job ended before it started)
    assert float(long_record["finished_at"]) <= float(next_job["started_at"]) + 0.5


def test_non_streaming_client_that_gives_up_cancels_its_job(service, store):
    started = time.time()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(service.base_url + "/v1/chat/completions", json=LONG, timeout=httpx.Timeout(30, read=2.0))
    job = wait_until(lambda: next((store.hgetall(k) for k in store.scan_iter("localq:job:job_*")
                                   if k.count(":") == 2 and float(store.hget(k, "created_at")) >= started), None),
                     10, "the job record")
    wait_until(lambda: job_record(store, job["id"])["status"] == "cancelled", 15, "the job to be cancelled")


def _running_job(store, since: float):
    for key in store.scan_iter("localq:job:job_*"):
        if key.count(":") != 2:
            continue
        record = store.hgetall(key)
        if record.get("status") == "running" and float(record.get("created_at", 0)) >= since and record.get("worker"):
            return record
    return None


def _post_in_background(service, body: dict) -> tuple[threading.Thread, dict]:
    """Send a non-streaming chat request from a thread; its response lands in the dict."""
    outcome: dict = {}

    def call():
        outcome["response"] = httpx.post(service.base_url + "/v1/chat/completions", json=body, timeout=300)

    caller = threading.Thread(target=call)
    caller.start()
    return caller, outcome


def test_killed_worker_process_job_is_redelivered_and_completes(service, store):
    started = time.time()
    caller, outcome = _post_in_background(service, {**LONG, "max_tokens": 200})
    job = wait_until(lambda: _running_job(store, started), 60, "the job to start")
    wait_until(lambda: store.xlen(f"localq:job:{job['id']}:events") > 5, 30, "some tokens")
    os.kill(int(job["worker"].rsplit(":", 1)[1]), signal.SIGKILL)  # the pool process running the job
    caller.join(180)
    response = outcome["response"]
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 200
    record = job_record(store, job["id"])
    assert record["status"] == "succeeded" and int(record["attempts"]) == 2


def test_job_that_kills_every_worker_ends_failed(service, store):
    started = time.time()
    caller, outcome = _post_in_background(service, {**LONG, "max_tokens": 400})
    killed = set()
    for _ in range(3):  # LOCALQ_MAX_DELIVERIES defaults to 3
        job = wait_until(lambda: (r := _running_job(store, started)) and r["worker"] not in killed and r, 60,
                         "a delivery of the job")
        killed.add(job["worker"])
        os.kill(int(job["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
    caller.join(120)
    response = outcome["response"]
    assert response.status_code == 500 and response.json()["error"]["code"] == "worker_lost"
    assert job_record(store, job["id"])["status"] == "failed"
