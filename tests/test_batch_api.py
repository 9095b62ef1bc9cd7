"""The Batch API end to end: the `openai` SDK -> API -> Redis -> Celery worker (`tasks.batch_run`) -> files.

The session's shared service (`stack` in conftest: embedded Redis, one CPU worker, the API, the
default models) serves the module; other modules' batches live there too, so listings are checked
on this module's own batches.
Every batch is uploaded with `files.create(purpose="batch")`, created with `batches.create`, polled
with `batches.retrieve` until it is final, and its output read back with `files.content`.
"""

from __future__ import annotations

import base64
import json
import struct
import threading
import time

import httpx
import pytest
import redis
from openai import BadRequestError, NotFoundError, OpenAI

from store.metrics import JOBS_KEY
from tasks.sweeper import LOCK_KEY as SWEEP_LOCK
from tests.service import wait_until
from workers.config import DEFAULT_PARALLEL

CHAT_MODEL = "gpt-4o-mini"
EMBED_MODEL = "text-embedding-3-small"
FINAL = {"completed", "failed", "expired", "cancelled"}
DEADLINE = 120


@pytest.fixture(scope="module")
def service(stack):
    warm = OpenAI(base_url=stack.base_url + "/v1", api_key="unused", timeout=180, max_retries=0)
    warm.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    warm.embeddings.create(model=EMBED_MODEL, input="hi")
    return stack


@pytest.fixture(scope="module")
def client(service):
    return OpenAI(base_url=service.base_url + "/v1", api_key="unused", timeout=120, max_retries=0)


@pytest.fixture(scope="module")
def store(service):
    with redis.Redis.from_url(service.redis.url, decode_responses=True) as client:
        yield client


def jsonl(items) -> bytes:
    return b"".join((item if isinstance(item, str) else json.dumps(item)).encode() + b"\n" for item in items)


def upload(client, items, name="input.jsonl"):
    return client.files.create(file=(name, jsonl(items)), purpose="batch")


def chat_line(custom_id, content, **extra):
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": CHAT_MODEL, "messages": [{"role": "user", "content": content}], **extra}}


def wait_final(client, batch_id, deadline=DEADLINE):
    return wait_until(lambda: (batch := client.batches.retrieve(batch_id)).status in FINAL and batch, deadline,
                      f"batch {batch_id} to finish", interval=0.2)


def read_jsonl(client, file_id) -> list[dict]:
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines() if line.strip()]


CHAT_PARAMS = {"max_tokens": 8, "temperature": 0, "seed": 1}
PROMPTS = ["Name a colour.", "Say hello.", "Count to three.", "Name a fruit."]


def test_chat_batch_matches_synchronous_answers(client):
    lines = [chat_line(f"req-{i}", prompt, **CHAT_PARAMS) for i, prompt in enumerate(PROMPTS)]
    source = upload(client, lines)
    batch = client.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h",
                                  metadata={"suite": "batch"})
    assert batch.status == "validating" and batch.object == "batch" and batch.metadata == {"suite": "batch"}
    assert batch.expires_at - batch.created_at == 86400
    done = wait_final(client, batch.id)
    assert done.status == "completed", done
    assert done.request_counts.total == 4 and done.request_counts.completed == 4 and done.request_counts.failed == 0
    assert done.output_file_id and done.error_file_id is None
    assert done.in_progress_at and done.finalizing_at and done.completed_at
    output = read_jsonl(client, done.output_file_id)
    assert sorted(o["custom_id"] for o in output) == [f"req-{i}" for i in range(4)]
    output_file = client.files.retrieve(done.output_file_id)
    assert output_file.purpose == "batch_output" and output_file.filename == f"{batch.id}_output.jsonl"
    for outcome in output:
        assert outcome["id"].startswith("batch_req_") and outcome["error"] is None
        response = outcome["response"]
        assert response["status_code"] == 200 and response["request_id"]
        body = response["body"]
        assert body["object"] == "chat.completion" and body["model"] == CHAT_MODEL
        prompt = PROMPTS[int(outcome["custom_id"].split("-")[1])]
        direct = client.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": prompt}],
                                                **CHAT_PARAMS)
        assert body["choices"][0]["message"]["content"] == direct.choices[0].message.content
        assert body["choices"][0]["finish_reason"] == direct.choices[0].finish_reason
        counts = {"prompt_tokens", "completion_tokens", "total_tokens"}  # cached_tokens depends on the cache
        assert {key: body["usage"][key] for key in counts} == direct.usage.model_dump(include=counts)
    usage = [o["response"]["body"]["usage"] for o in output]
    assert done.usage.input_tokens == sum(u["prompt_tokens"] for u in usage) > 0
    assert done.usage.output_tokens == sum(u["completion_tokens"] for u in usage) > 0
    assert done.usage.total_tokens == done.usage.input_tokens + done.usage.output_tokens


def floats(encoded: str) -> list[float]:
    raw = base64.b64decode(encoded)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def test_embeddings_batch_matches_synchronous_vectors(client, store):
    """Embedding lines share forward passes in the worker; each still gets exactly its own answer."""
    failed_before = int(store.hget(JOBS_KEY, json.dumps(["embedding", "failed"], separators=(",", ":"))) or 0)
    bodies = [
        {"input": "the sea is blue"},
        {"input": "a quick brown fox jumps over the lazy dog, then naps in the warm afternoon sun"},
        {"input": ["batch jobs run later", "two inputs in one line"]},
        {"input": "shortened vectors", "dimensions": 64},
        {"input": "encoded as base64", "encoding_format": "base64"},
        {"input": "word " * 600},  # longer than the model's 256 tokens: this line alone fails
        {"input": "after the failing line"},
    ]
    lines = [{"custom_id": f"emb-{i}", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": EMBED_MODEL, **body}} for i, body in enumerate(bodies)]
    source = upload(client, lines)
    batch = client.batches.create(input_file_id=source.id, endpoint="/v1/embeddings", completion_window="24h")
    done = wait_final(client, batch.id)
    assert done.status == "completed" and done.request_counts.completed == 6 and done.request_counts.failed == 1
    output = read_jsonl(client, done.output_file_id)
    assert [o["custom_id"] for o in output] == ["emb-0", "emb-1", "emb-2", "emb-3", "emb-4", "emb-6"]  # input order
    for outcome in output:
        body = {"model": EMBED_MODEL, **bodies[int(outcome["custom_id"].split("-")[1])]}
        got = outcome["response"]["body"]
        direct = client.embeddings.create(**body)
        assert got["usage"] == direct.usage.model_dump()
        assert len(got["data"]) == len(direct.data)
        for mine, theirs in zip(got["data"], direct.data, strict=True):
            mine_vector, their_vector = mine["embedding"], theirs.embedding
            if body.get("encoding_format") == "base64":
                mine_vector, their_vector = floats(mine_vector), floats(their_vector)
            assert len(mine_vector) == len(their_vector) == body.get("dimensions", 384)
            assert mine_vector == pytest.approx(their_vector, abs=1e-5)
    [error] = read_jsonl(client, done.error_file_id)
    assert error["custom_id"] == "emb-5" and error["response"]["status_code"] == 400
    assert error["response"]["body"]["error"]["code"] == "context_length_exceeded"
    assert "input 0" in error["response"]["body"]["error"]["message"]  # its own index, not the shared pass's
    assert done.usage.input_tokens == sum(o["response"]["body"]["usage"]["prompt_tokens"] for o in output)
    assert done.usage.output_tokens == 0
    # batch lines count in the job metrics like any job (the synchronous calls above never fail)
    assert int(store.hget(JOBS_KEY, json.dumps(["embedding", "failed"], separators=(",", ":"))) or 0) == failed_before + 1


def test_invalid_lines_fail_the_batch_with_their_line_numbers(client):
    items = [
        chat_line("ok-1", "hi", max_tokens=2),
        chat_line("ok-1", "duplicate id", max_tokens=2),                                     # 2
        {**chat_line("wrong-url", "hi"), "url": "/v1/embeddings"},                            # 3
        {"custom_id": "bad-body", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": CHAT_MODEL}},                                                      # 4
        chat_line("streaming", "hi", stream=True),                                            # 5
        '{"custom_id": "broken", ',                                                           # 6
        chat_line("no-model", "hi", model="no-such-model"),                                   # 7
    ]
    source = upload(client, items)
    batch = client.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h")
    done = wait_final(client, batch.id)
    assert done.status == "failed" and done.failed_at
    errors = {e.line: e for e in done.errors.data}
    assert sorted(errors) == [2, 3, 4, 5, 6, 7]
    assert errors[2].code == "duplicate_custom_id"
    assert errors[3].code == "mismatched_url"
    assert errors[4].param.startswith("body")
    assert errors[5].param == "body.stream"
    assert errors[6].code == "invalid_json_line"
    assert errors[7].code == "model_not_found"
    assert done.output_file_id is None and done.request_counts.total == 0


def test_create_refusals(client, service):
    with pytest.raises(NotFoundError) as missing:
        client.batches.create(input_file_id="file-" + "a" * 24, endpoint="/v1/chat/completions",
                              completion_window="24h")
    assert missing.value.body["code"] == "file_not_found" and missing.value.body["param"] == "input_file_id"
    other = client.files.create(file=("notes.txt", b"hello"), purpose="user_data")
    with pytest.raises(BadRequestError) as purpose:
        client.batches.create(input_file_id=other.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert purpose.value.body["param"] == "input_file_id"
    source = upload(client, [chat_line("a", "hi")])
    answer = httpx.post(f"{service.base_url}/v1/batches", json={
        "input_file_id": source.id, "endpoint": "/v1/moderations", "completion_window": "24h"})
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "unsupported_endpoint" and answer.json()["error"]["param"] == "endpoint"
    with pytest.raises(NotFoundError) as unknown:
        client.batches.retrieve("batch_" + "0" * 32)
    assert unknown.value.body["code"] == "batch_not_found"
    with pytest.raises(NotFoundError):
        client.batches.cancel("nonsense")


def test_cancel_a_running_batch(client, store):
    lines = [chat_line(f"c-{i}", f"Tell a long story about the number {i}.", max_tokens=64) for i in range(30)]
    source = upload(client, lines)
    batch = client.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h")
    wait_until(lambda: client.batches.retrieve(batch.id).status != "validating", DEADLINE, "the batch to start",
               interval=0.05)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    assert client.batches.cancel(batch.id).status in ("cancelling", "cancelled")  # cancelling again: as is
    done = wait_final(client, batch.id)
    assert done.status == "cancelled" and done.cancelled_at and done.cancelling_at
    counts = done.request_counts
    assert counts.total == 30 and counts.completed + counts.failed <= counts.total
    assert counts.completed < 30  # it really stopped early
    outcomes = read_jsonl(client, done.output_file_id) if done.output_file_id else []
    assert len(outcomes) == counts.completed
    assert len({o["custom_id"] for o in outcomes}) == len(outcomes)
    assert all(o["response"]["status_code"] == 200 for o in outcomes)
    dropped = int(store.hget(f"localq:batch:{batch.id}", "dropped") or 0)
    assert counts.completed + counts.failed + dropped == 30
    assert client.batches.cancel(batch.id).status == "cancelled"  # a cancelled batch is answered as is
    finished = next(b for b in client.batches.list(limit=100).data if b.status == "completed")
    with pytest.raises(BadRequestError) as final:
        client.batches.cancel(finished.id)
    assert final.value.body["code"] == "batch_not_cancellable"


def test_lines_past_the_window_expire(client, service, store):
    # The lines themselves must notice the window: hold the sweep's lock so that the periodic sweep
    # cannot expire the batch first while it still waits to be validated (then it has no lines).
    store.set(SWEEP_LOCK, "test_lines_past_the_window_expire", px=120_000)
    try:
        _lines_past_the_window_expire(client, store)
    finally:
        store.delete(SWEEP_LOCK)


def _lines_past_the_window_expire(client, store):
    # keep every slot of the worker busy so that the batch's lines run after the window was moved into the past
    busy = [threading.Thread(target=lambda: client.chat.completions.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": "Write a long essay about rivers."}],
        max_tokens=200, temperature=0)) for _ in range(DEFAULT_PARALLEL["cpu"])]
    for thread in busy:
        thread.start()
    time.sleep(0.3)
    source = upload(client, [chat_line(f"x-{i}", "hi", max_tokens=2) for i in range(2)])
    batch = client.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h")
    store.hset(f"localq:batch:{batch.id}", "expires_at", int(time.time()) - 1)
    for thread in busy:
        thread.join()
    done = wait_final(client, batch.id)
    assert done.status == "expired" and done.expired_at
    assert done.request_counts.failed == 2 and done.output_file_id is None
    errors = read_jsonl(client, done.error_file_id)
    assert sorted(e["custom_id"] for e in errors) == ["x-0", "x-1"]
    assert all(e["error"]["code"] == "batch_expired" and e["response"] is None for e in errors)


def test_list_batches_with_after(client):
    newest = client.batches.list(limit=100)
    everything = newest.data
    assert len(everything) >= 4
    assert [b.created_at for b in everything] == sorted((b.created_at for b in everything), reverse=True)
    first = client.batches.list(limit=2)
    assert len(first.data) == 2 and first.has_more
    assert first.data[0].id == everything[0].id
    page = client.batches.with_raw_response.list(limit=2, after=first.data[-1].id).parse()
    assert [b.id for b in page.data] == [b.id for b in everything[2:4]]
    ids = [b.id for b in client.batches.list(limit=2)]  # the SDK's auto-pagination walks `after`
    assert ids[:len(everything)] == [b.id for b in everything]
    assert len(ids) > len(everything) if newest.has_more else len(ids) == len(everything)
