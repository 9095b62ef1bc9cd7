"""Benchmark: an interactive call's time to first token while a large batch runs on the same worker.

Batch lines wait at the lowest queue priority, so an interactive call should only wait for the one
line running when it arrives. Starts an embedded Redis, one CPU worker and the API, measures the
p50 time to first token of a streamed chat completion idle, then during a `--lines` batch; prints
JSON with the figures and whether the target (under 2x idle + 0.5 s) is met. The functional
check (interactive calls are served while the batch still runs) is tests/test_batch_priority.py.

    .venv/bin/python -m ops.bench.batch_priority [--lines 500] [--samples 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from ops.redis_server import RedisServer
from ops.stack import ServiceProcesses, wait_until

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8,
        "temperature": 0, "seed": 1, "stream": True}


def time_to_first_token(base_url: str) -> float:
    start = time.perf_counter()
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=CHAT, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                return time.perf_counter() - start
    raise RuntimeError("no token came")


def batch_file(lines: int) -> bytes:
    return "\n".join(json.dumps({
        "custom_id": f"l{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "gpt-4o-mini", "max_tokens": 4, "messages": [{"role": "user", "content": f"Hi {i}"}]},
    }) for i in range(lines)).encode()


def measure(base_url: str, lines: int, samples: int) -> dict:
    api = httpx.Client(base_url=base_url + "/v1", timeout=60)
    for _ in range(2):
        time_to_first_token(base_url)  # warm
    idle = statistics.median(time_to_first_token(base_url) for _ in range(samples))
    source = api.post("/files", files={"file": ("load.jsonl", batch_file(lines))}, data={"purpose": "batch"}).json()
    batch = api.post("/batches", json={"input_file_id": source["id"], "endpoint": "/v1/chat/completions",
                                       "completion_window": "24h"}).json()

    def completed() -> int:
        return api.get(f"/batches/{batch['id']}").json()["request_counts"]["completed"]

    wait_until(lambda: completed() >= 20, 120, "the batch to run")
    loaded = []
    for _ in range(samples):
        loaded.append(time_to_first_token(base_url))
        time.sleep(0.05)
    under_load = statistics.median(loaded)
    done = completed()
    return {"idle_p50_ms": round(idle * 1000, 1), "during_batch_p50_ms": round(under_load * 1000, 1),
            "ratio": round(under_load / idle, 2), "batch_lines_done": f"{done}/{lines}",
            "measured_during_batch": done < lines, "target_met": under_load < 2 * idle + 0.5}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=500)
    parser.add_argument("--samples", type=int, default=7)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp) / "redis") as redis_server:
        env = {**os.environ, "LOCALQ_REDIS_URL": redis_server.url, "LOCALQ_FILES_DIR": str(Path(tmp) / "files")}
        stack = ServiceProcesses(env=env, log_dir=Path(tmp) / "logs")
        try:
            stack.start_worker()
            stack.start_api()
            print(json.dumps(measure(stack.base_url, args.lines, args.samples), indent=2))
        finally:
            stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
