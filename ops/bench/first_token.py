"""Benchmark: where a streamed chat's first token spends its time, and what each token costs each process.

Starts localq as ops/bench/concurrency.py does (embedded Redis, the API under gunicorn, one worker
whose model has `--parallel` slots, 2 threads, preloaded) and streams the benchmark's request
(SmolLM2, greedy, end tokens banned). The time to the first token is cut at what the job leaves
in Redis: the job record's `created_at` (the API read and checked the request), the event log's
`running` status (the worker took the job) and its first text chunk (the worker computed the first
token), then the client's receipt (the relay). Event ids carry milliseconds, so the hops are
+-1 ms each. Patterns: back to back, and after `--pause` seconds idle (a person at a keyboard).

It also reads the CPU time the API, Redis and the worker used for `--cpu-rounds` streams, single
and 4 at once, per token delivered: the queue path's cost beside the decode.

    .venv/bin/python -m ops.bench.first_token [--requests 8] [--tokens 16] [--pause 1.0]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import redis

from ops.bench.concurrency import MODEL, HttpStreams, Local, write_models
from ops.bench.llm import MESSAGES, banned_eos, model_path
from ops.redis_server import RedisServer
from ops.stack import ServiceProcesses
from store.events import events_key
from store.jobs import job_key

HOPS = ("api", "queue", "worker", "relay")


def hops(sent: float, first: float, record: dict, event_ids: list[str], event_types: list[str]) -> dict:
    """The first token's time cut at the job's marks (all in seconds since the epoch): the API
    (request sent -> job record), the queue (-> the worker's `running`), the worker (-> the first
    delta), the relay (-> the client read it)."""
    stamps = [int(entry.split("-")[0]) / 1000 for entry in event_ids]
    running = stamps[event_types.index("status")]
    first_delta = stamps[event_types.index("delta")]
    created = float(record["created_at"])
    return {"api": created - sent, "queue": running - created, "worker": first_delta - running,
            "relay": first - first_delta, "total": first - sent}


def one(client: httpx.Client, url: str, body: dict, store: redis.Redis) -> dict:
    sent, first = time.time(), None
    with client.stream("POST", url, json=body) as response:
        job_id = response.headers["x-localq-job-id"]
        for line in response.iter_lines():
            if first is None and line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                first = time.time()
    record = {k.decode(): v.decode() for k, v in store.hgetall(job_key(job_id)).items()}
    entries = store.xrange(events_key(job_id), count=4)
    return hops(sent, first, record, [i.decode() for i, _ in entries], [f[b"type"].decode() for _, f in entries])


def process_cpu_ms(pid: int) -> float:
    """User and system CPU time of a process and its children now (the API's gunicorn workers)."""
    process = psutil.Process(pid)
    return sum(sum(p.cpu_times()[:2]) for p in (process, *process.children(recursive=True))) * 1000


def cpu_per_token(streams: HttpStreams, pids: dict[str, int], rounds: int, count: int) -> dict:
    before = {name: process_cpu_ms(pid) for name, pid in pids.items()}
    tokens = 0
    for _ in range(rounds):
        samples = [streams.stream()] if count == 1 else streams.concurrent(count)
        tokens += sum(sample.tokens for sample in samples)
    return {name: (process_cpu_ms(pid) - before[name]) / tokens for name, pid in pids.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=8, help="requests a pattern (medians are printed)")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--pause", type=float, default=1.0, help="idle seconds before each request of the second pattern")
    parser.add_argument("--parallel", type=int, default=16)
    parser.add_argument("--cpu-rounds", type=int, default=4)
    args = parser.parse_args(argv)
    path = model_path()
    bias = banned_eos(path)
    body = {"model": MODEL, "messages": MESSAGES,
            "max_tokens": args.tokens, "temperature": 0, "seed": 7, "logit_bias": bias, "stream": True}
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp) / "redis") as redis_server:
        models = write_models(Path(tmp) / "models", path, 2, args.parallel, serial=False)
        env = {**os.environ, "LOCALQ_REDIS_URL": redis_server.url, "LOCALQ_MODELS_DIR": str(models),
               "LOCALQ_FILES_DIR": str(Path(tmp) / "files")}
        stack = ServiceProcesses(env=env, log_dir=Path(tmp) / "logs")
        try:
            worker = stack.start_worker("cpu", "cpu")
            stack.start_api()
            store = redis.Redis.from_url(redis_server.url)
            url = stack.base_url + "/v1/chat/completions"
            with httpx.Client(timeout=60) as client:
                for _ in range(3):  # warm: the prompt in a slot's cache, every path taken once
                    one(client, url, body, store)
                patterns = (("back to back", 0.0), (f"after {args.pause:g} s idle", args.pause))
                found: dict[str, dict[str, list[float]]] = {label: {} for label, _ in patterns}
                for label, pause in patterns:
                    for _ in range(args.requests):
                        time.sleep(pause)
                        for name, value in one(client, url, body, store).items():
                            found[label].setdefault(name, []).append(value * 1000)
            # in-process llama-cpp-python after localq's requests, alone on the machine as localq was
            local = Local(path, 2, bias, args.tokens)
            for _ in range(3):
                local.stream()
            for label, pause in patterns:
                for _ in range(args.requests):
                    time.sleep(pause)
                    found[label].setdefault("in-process", []).append(local.stream().ttft * 1000)
            del local
            columns = (*HOPS, "total", "in-process")
            print(f"first token, {args.tokens}-token streams, medians of {args.requests} (ms; total: localq's):")
            print(f"{'pattern':<22}" + "".join(f"{name:>11}" for name in (*columns, "added")))
            for label, _ in patterns:
                medians = {name: statistics.median(found[label][name]) for name in columns}
                print(f"{label:<22}" + "".join(f"{medians[name]:11.1f}" for name in columns)
                      + f"{medians['total'] - medians['in-process']:+11.1f}")
            pids = {"api": stack.api.pid, "redis": redis_server.process.pid, "worker": worker.pid}
            streams = HttpStreams(stack.base_url, MODEL, bias, 128)
            try:
                print("\nCPU time per token delivered (ms), 128-token streams:")
                for count in (1, 4):
                    used = cpu_per_token(streams, pids, args.cpu_rounds, count)
                    print(f"{count} stream{'s' if count > 1 else ''} at once: "
                          + ", ".join(f"{name} {value:.2f}" for name, value in used.items()))
            finally:
                streams.close()
        finally:
            stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
