"""Benchmark: resident memory of the API processes while they serve a running queue.

Starts an embedded Redis, one CPU worker and `localq api` (one gevent worker), fetches
`/openapi.json`, runs 20 chat completions through the queue and scrapes `/metrics`, then prints
each API process's RSS. Run it by hand:

    .venv/bin/python -m ops.bench.api_memory
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import httpx
import psutil
from openai import OpenAI

from ops.redis_server import RedisServer
from ops.stack import ServiceProcesses

CHATS = 20


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp) / "redis") as redis_server:
        stack = ServiceProcesses(env={**os.environ, "LOCALQ_REDIS_URL": redis_server.url}, log_dir=Path(tmp) / "logs")
        try:
            stack.start_worker()
            stack.start_api()
            httpx.get(stack.base_url + "/openapi.json", timeout=30).raise_for_status()
            client = OpenAI(base_url=stack.base_url + "/v1", api_key="unused", timeout=120)
            for _ in range(CHATS):
                client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=8)
            httpx.get(stack.base_url + "/metrics", timeout=30).raise_for_status()
            master = psutil.Process(stack.api.pid)
            rss = {"master_mb": round(master.memory_info().rss / 2**20, 1),
                   "workers_mb": [round(p.memory_info().rss / 2**20, 1) for p in master.children(recursive=True)]}
        finally:
            stack.stop()
    print(json.dumps(rss, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
