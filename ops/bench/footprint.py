"""Redis bytes per finished job, inside and after the resume window.

    python -m ops.bench.footprint --jobs 101 --window 10

Starts its own Redis, one CPU worker (the default chat model only) and the API; runs `--jobs`
streamed chat completions of 128 tokens, one after another; then measures, for every job, the
memory of the keys named after it (MEMORY USAGE) while the window is open and once it has passed,
with Redis's `used_memory` and the append-only file's size at each point (and after an AOF
rewrite, which keeps only live keys). Each job's bytes "just finished" are read as it ends,
while its log is still kept: what every job held for 24 h before the resume window existed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import redis

from ops.redis_server import AOF_FILE, RedisServer
from ops.stack import REPO, ServiceProcesses, wait_until

CHAT = "smollm2-135m-instruct"


def start(stack: ExitStack, **settings: float) -> tuple[str, RedisServer]:
    """Its own embedded Redis, one CPU worker serving the default chat model only, and the API, with
    `settings` (`LOCALQ_RESUME_WINDOW=10`, ...) in their environment; (the API's URL, the Redis)."""
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="localq-bench-")))
    models = folder / "models"
    models.mkdir()
    (models / f"{CHAT}.yaml").write_text((REPO / "models" / f"{CHAT}.yaml").read_text())
    server = stack.enter_context(RedisServer(folder / "redis"))
    env = {**os.environ, "LOCALQ_REDIS_URL": server.url, "LOCALQ_MODELS_DIR": str(models), "PYTHONUNBUFFERED": "1",
           **{name: str(value) for name, value in settings.items()}}
    service = ServiceProcesses(env=env, log_dir=folder / "logs")
    stack.callback(service.stop)
    service.start_worker("cpu", "cpu")
    service.start_api()
    return service.base_url, server


def chat(base_url: str) -> str:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Tell me about the sea."}],
            "max_tokens": 128, "stream": True, "x-localai-extensions": {"ignore_eos": True}}
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, timeout=300) as response:
        response.raise_for_status()
        for _ in response.iter_lines():
            pass
        return response.headers["x-localq-job-id"]


def job_bytes(client: redis.Redis, job_id: str) -> int:
    return sum(client.memory_usage(key) or 0 for key in client.scan_iter(match=f"*{job_id}*", count=1000))


def aof_bytes(server: RedisServer) -> int:
    """The size of the server's append-only file (every part of it, for a Redis that splits it)."""
    return sum(path.stat().st_size for path in server.data_dir.rglob(f"{AOF_FILE}*") if path.is_file())


def report(figures: dict, path: Path | None) -> None:
    """Print the figures, and write them to `path` if given."""
    print(json.dumps(figures, indent=2))
    if path:
        path.write_text(json.dumps(figures, indent=2))


def snapshot(client: redis.Redis, server: RedisServer, job_ids: list[str]) -> dict:
    per_job = [job_bytes(client, job_id) for job_id in job_ids]
    return {"per_job_median": statistics.median(per_job), "per_job_max": max(per_job),
            "used_memory": client.info("memory")["used_memory"], "aof_bytes": aof_bytes(server)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=101)
    parser.add_argument("--window", type=float, default=10.0, help="LOCALQ_RESUME_WINDOW for the run (seconds)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    with ExitStack() as stack:
        base_url, server = start(stack, LOCALQ_RESUME_WINDOW=args.window)
        client = redis.Redis.from_url(server.url)
        chat(base_url)  # the model's first load is not a job of the run
        wait_until(lambda: not client.keys("localq:job:*:events"), args.window + 30, "the warm-up's window")
        empty = client.info("memory")["used_memory"]
        job_ids, finished = [], []
        for _ in range(args.jobs):
            job_ids.append(chat(base_url))
            finished.append(job_bytes(client, job_ids[-1]))  # at once: its log is still kept
        inside = {**snapshot(client, server, job_ids), "per_job_just_finished_median": statistics.median(finished),
                  "per_job_just_finished_max": max(finished)}
        wait_until(lambda: not any(client.exists(f"localq:job:{job_id}:events") for job_id in job_ids),
                   args.window + 60, "the end of the resume window", interval=0.5)
        time.sleep(1)
        after = snapshot(client, server, job_ids)
        client.bgrewriteaof()
        wait_until(lambda: client.info("persistence")["aof_rewrite_in_progress"] == 0
                   and client.info("persistence")["aof_rewrite_scheduled"] == 0, 60, "the AOF rewrite")
        time.sleep(0.5)
        rewritten = snapshot(client, server, job_ids)
    figures = {"jobs": args.jobs, "window_s": args.window, "used_memory_empty": empty, "inside_window": inside,
               "after_window": after, "after_aof_rewrite": rewritten,
               "used_memory_per_job_after": (after["used_memory"] - empty) / args.jobs}
    report(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
