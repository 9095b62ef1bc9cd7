"""Interactive calls are served while a large batch runs on the same worker.

Batch lines wait on the queue at the lowest priority, so an interactive call only waits for the
line that is running when it arrives. How long it waits is a figure, not a test:
`python -m ops.bench.batch_priority` measures it (target: under 2x idle + 0.5 s).
"""

from __future__ import annotations

import json
import statistics
import time

import httpx
import pytest
from openai import OpenAI

from tests import sse
from tests.service import wait_until

LINES = 500
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8,
        "temperature": 0, "seed": 1, "stream": True}


@pytest.fixture(scope="module")
def service(stack):
    """The session's shared service (conftest's `stack`)."""
    return stack


def time_to_first_token(base_url: str) -> float:
    start = time.perf_counter()
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=CHAT, timeout=60) as response:
        for event in sse.events(response.iter_lines()):
            if event.data.startswith("{") and json.loads(event.data)["choices"][0]["delta"].get("content"):
                return time.perf_counter() - start
    raise AssertionError("no token came")


def test_interactive_time_to_first_token_while_a_500_line_batch_runs(service):
    client = OpenAI(base_url=service.base_url + "/v1", api_key="unused", timeout=60, max_retries=0)
    for _ in range(2):
        time_to_first_token(service.base_url)  # warm
    idle = statistics.median(time_to_first_token(service.base_url) for _ in range(7))

    lines = "\n".join(json.dumps({
        "custom_id": f"l{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "gpt-4o-mini", "max_tokens": 4, "messages": [{"role": "user", "content": f"Hi {i}"}]},
    }) for i in range(LINES))
    batch_file = client.files.create(file=("load.jsonl", lines.encode()), purpose="batch")
    batch = client.batches.create(input_file_id=batch_file.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    try:
        wait_until(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 20, 120, "the batch to run")
        loaded = []
        for _ in range(7):
            loaded.append(time_to_first_token(service.base_url))
            time.sleep(0.05)
        under_load = statistics.median(loaded)
        progress = client.batches.retrieve(batch.id).request_counts.completed
        print(f"time to first token: idle p50 {idle * 1000:.1f} ms, during the batch p50 {under_load * 1000:.1f} ms "
              f"({under_load / idle:.2f}x); batch lines done meanwhile: {progress}/{LINES}")
        assert progress < LINES, "the batch finished before the measurement: it did not measure anything"
    finally:
        ended = cancel_and_wait(client, batch.id)
    assert ended.status == "cancelled", ended


def cancel_and_wait(client: OpenAI, batch_id: str):
    """Cancel the batch and wait for it to end, so that none of its lines is left on the shared
    service's queue for the next test (a cancelled batch ends once its queued lines were dropped)."""
    client.batches.cancel(batch_id)
    final = ("completed", "failed", "expired", "cancelled")
    return wait_until(lambda: (b := client.batches.retrieve(batch_id)).status in final and b, 120,
                      "the cancelled batch to end")
