"""A batch survives a worker process dying under it: every line is accounted for exactly once."""

from __future__ import annotations

import json
import os
import signal

import pytest
import redis
from openai import OpenAI

from tests.service import CHAT, only_models, running_service, wait_until

LINES = 80


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    # one slot: a prefork worker, whose pool process the test kills
    env = {"LOCALQ_FILES_DIR": str(tmp / "files"), **only_models(tmp / "models", CHAT)}
    with running_service(tmp, env, slots=1) as svc:
        yield svc


def pool_children(parent: int) -> list[int]:
    return [int(pid) for pid in open(f"/proc/{parent}/task/{parent}/children").read().split()]


def test_sigkill_of_the_worker_mid_batch_loses_and_repeats_nothing(service):
    client = OpenAI(base_url=service.base_url + "/v1", api_key="unused", timeout=60, max_retries=0)
    lines = "\n".join(json.dumps({
        "custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "gpt-4o-mini", "max_tokens": 6, "temperature": 0, "seed": i,
                 "messages": [{"role": "user", "content": f"Count to {i}."}]},
    }) for i in range(LINES))
    batch_file = client.files.create(file=("faults.jsonl", lines.encode()), purpose="batch")
    batch = client.batches.create(input_file_id=batch_file.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    store = redis.Redis.from_url(service.redis.url, decode_responses=True)

    def done_lines() -> int:
        return int(store.hget(f"localq:batch:{batch.id}", "completed") or 0)

    parent = service.workers["cpu"].pid
    kills = 0
    for threshold in (10, 40):  # kill the pool process twice, at different points
        wait_until(lambda: done_lines() >= threshold, 120, f"{threshold} lines done")
        for child in pool_children(parent):
            os.kill(child, signal.SIGKILL)
            kills += 1
    assert kills >= 2

    final = wait_until(lambda: (b := client.batches.retrieve(batch.id)).status in (
        "completed", "failed", "expired", "cancelled") and b, 300, "the batch to finish", interval=0.5)
    assert final.status == "completed", final
    assert final.request_counts.total == LINES
    assert final.request_counts.completed + final.request_counts.failed == LINES
    output = [json.loads(x) for x in client.files.content(final.output_file_id).text.splitlines() if x]
    errors = []
    if final.error_file_id:
        errors = [json.loads(x) for x in client.files.content(final.error_file_id).text.splitlines() if x]
    ids = [x["custom_id"] for x in output + errors]
    assert sorted(ids) == sorted(f"line-{i}" for i in range(LINES)), "a line was lost or written twice"
    assert len(output) == final.request_counts.completed
    assert all(x["response"]["status_code"] == 200 for x in output)
