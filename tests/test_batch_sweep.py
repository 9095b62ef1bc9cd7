"""The expiry sweep end to end: batches whose lines cannot run still expire when their window ends.

One real service (embedded Redis, one CPU worker, the API) with a 3-second completion window and a
sweep every half second. The worker's main process runs the sweep (`tasks.sweeper.BatchSweep`), so
it expires batches even while its only pool process is busy, and batches whose lines sit on a queue
that no worker consumes.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import redis
import yaml
from openai import OpenAI

from store.admission import Admission
from tasks.batch_run import expired_key
from tasks.routing import queue_keys
from tests.service import running_service, wait_until

WINDOW = 3
FINAL = {"completed", "failed", "expired", "cancelled"}
MODELS = Path(__file__).resolve().parent.parent / "models"
GPU_MODEL = "smollm2-on-gpu"  # the chat model's weights, placed on the `gpu` queue, which no worker serves
EXPIRED = {"code": "batch_expired",
           "message": "This request could not be executed before the completion window expired."}


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    models = tmp / "models"
    models.mkdir()
    for name in ("smollm2-135m-instruct.yaml", "all-minilm-l6-v2.yaml"):
        shutil.copy(MODELS / name, models / name)
    config = yaml.safe_load((MODELS / "smollm2-135m-instruct.yaml").read_text())
    config.update(name=GPU_MODEL, device="gpu", aliases=[])
    (models / f"{GPU_MODEL}.yaml").write_text(yaml.safe_dump(config))
    env = {"LOCALQ_FILES_DIR": str(tmp / "files"), "LOCALQ_MODELS_DIR": str(models),
           "LOCALQ_BATCH_WINDOW": str(WINDOW), "LOCALQ_BATCH_SWEEP_INTERVAL": "0.5", "LOCALQ_RESUME_GRACE": "0"}
    # one worker, for the `cpu` queue only, with one job slot: an interactive call can hold it
    with running_service(tmp, env, slots=1) as svc:
        yield svc


@pytest.fixture(scope="module")
def client(service):
    return OpenAI(base_url=service.base_url + "/v1", api_key="unused", timeout=120, max_retries=0)


@pytest.fixture(scope="module")
def store(service):
    return redis.Redis.from_url(service.redis.url, decode_responses=True)


def chat_lines(model: str, count: int, **params) -> bytes:
    return "\n".join(json.dumps({
        "custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": f"Say {i}."}], **params},
    }) for i in range(count)).encode()


def read_jsonl(client, file_id) -> list[dict]:
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines() if x.strip()] if file_id else []


def queued(store, queue: str) -> int:
    return sum(store.llen(key) for key in queue_keys(queue))


def test_a_batch_whose_lines_no_worker_runs_expires(client, store):
    lines = 6
    source = client.files.create(file=("gpu.jsonl", chat_lines(GPU_MODEL, lines, max_tokens=4)), purpose="batch")
    batch = client.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert batch.expires_at - batch.created_at == WINDOW
    started = wait_until(lambda: (b := client.batches.retrieve(batch.id)).status != "validating" and b, WINDOW,
                       "the batch to start")
    assert started.status == "in_progress" and started.request_counts.total == lines
    # every line waits for a queue no worker consumes (the start task sends them after `in_progress`):
    # one on the queue (the room of a queue without workers), the rest waiting for their turn
    wait_until(lambda: queued(store, "gpu") == 1, 10, "the lines to be queued")
    assert Admission(store).waiting_chunks(batch.id, ["gpu"]) == lines - 1

    done = wait_until(lambda: (b := client.batches.retrieve(batch.id)).status in FINAL and b, WINDOW + 30,
                    "the batch to expire", interval=0.2)

    assert done.status == "expired", done
    assert done.expired_at and done.expired_at >= done.expires_at and done.finalizing_at
    assert done.completed_at is None and done.output_file_id is None
    assert done.request_counts.total == lines and done.request_counts.failed == lines
    assert done.request_counts.completed == 0
    errors = read_jsonl(client, done.error_file_id)
    assert [e["custom_id"] for e in errors] == [f"line-{i}" for i in range(lines)]  # each once, input order
    for error in errors:
        assert error["response"] is None and error["error"] == EXPIRED
        assert error["id"].startswith("batch_req_")
    assert len({e["id"] for e in errors}) == lines
    assert queued(store, "gpu") == 1  # no line task ran: the sweep alone expired the batch
    assert Admission(store).waiting_chunks(batch.id, ["gpu"]) == 0, "its waiting lines were discarded"
    assert not store.exists(expired_key(batch.id)), "a final batch keeps no per-line keys (its status says expired)"
    time.sleep(1.5)  # later sweeps leave a final batch alone
    assert client.batches.retrieve(batch.id) == done


def test_a_batch_behind_a_busy_worker_expires_while_the_worker_is_busy(client, store):
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    lines = 8
    params = {"max_tokens": 24, "temperature": 0, "x-localai-extensions": {"ignore_eos": True}}
    source = client.files.create(file=("busy.jsonl", chat_lines("gpt-4o-mini", lines, **params)), purpose="batch")
    batch = client.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h")
    wait_until(lambda: client.batches.retrieve(batch.id).status != "validating", WINDOW, "the batch to start")

    # an interactive call (priority 0) takes the worker's one process from the batch's lines (9)
    # and keeps it until the stream is closed: no line can run after the one running now
    release = threading.Event()
    streamed = []

    def busy():
        with client.chat.completions.create(
                model="gpt-4o-mini", stream=True, max_tokens=1500, temperature=0,
                messages=[{"role": "user", "content": "Write a very long story."}],
                extra_body={"x-localai-extensions": {"ignore_eos": True}}) as stream:
            for chunk in stream:
                streamed.append(chunk)
                if release.is_set():
                    break  # closing the stream cancels the job (LOCALQ_RESUME_GRACE=0)

    holder = threading.Thread(target=busy)
    holder.start()
    try:
        wait_until(lambda: len(streamed) > 1, 30, "the interactive call to stream")
        # the sweep records every line that has no outcome as expired, while the worker's only
        # pool process is still busy with the interactive call
        during = wait_until(lambda: (b := client.batches.retrieve(batch.id)).request_counts.completed
                          + b.request_counts.failed == lines and b, WINDOW + 10, "the sweep", interval=0.1)
        assert holder.is_alive() and not release.is_set()
        assert during.status in ("in_progress", "finalizing")
        assert during.request_counts.failed >= 1
    finally:
        release.set()
        holder.join(60)

    done = wait_until(lambda: (b := client.batches.retrieve(batch.id)).status in FINAL and b, 60, "finalize",
                    interval=0.2)
    assert done.status == "expired" and done.expired_at
    assert done.request_counts == during.request_counts
    output, errors = read_jsonl(client, done.output_file_id), read_jsonl(client, done.error_file_id)
    assert len(output) == done.request_counts.completed and len(errors) == done.request_counts.failed
    assert sorted(o["custom_id"] for o in output + errors) == sorted(f"line-{i}" for i in range(lines))
    assert all(o["response"]["status_code"] == 200 for o in output)
    assert all(e["error"] == EXPIRED and e["response"] is None for e in errors)
    # the expired lines' tasks still run once the worker is free: they find the batch final
    wait_until(lambda: queued(store, "cpu") == 0, 30, "the queue to drain")
    time.sleep(0.5)
    assert client.batches.retrieve(batch.id) == done
