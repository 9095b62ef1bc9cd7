"""Capacity soak: short jobs as fast as the service takes them, with Redis memory and AOF size over time.

    python -m ops.bench.soak --minutes 30 --retention 600 --window 120 --csv soak.csv

Starts its own embedded Redis (localq's AOF settings), one CPU worker with the default chat model
and the API, with `LOCALQ_JOB_TTL=--retention` and `LOCALQ_RESUME_WINDOW=--window`. `--clients`
threads each send streamed chat completions of `--tokens` tokens back to back (a closed loop: the
rate is the highest this machine sustains). Every `--every` seconds it records the jobs done, the
job rate, Redis's `used_memory`, its key count and the append-only file's size.

What must hold: once `--retention` has passed, every job that finishes is matched by one that
expires, so memory stops growing (steady state = rate x (window x log bytes + retention x record
bytes)); the AOF grows until the rewrite policy (100 %, 64 MB minimum) rewrites it to the live keys,
so its size is a bounded saw-tooth. The summary compares the last quarter of the run with the
quarter before it.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import redis

from ops.bench.footprint import aof_bytes, report, start
from ops.redis_server import RedisServer

class Load:
    """`clients` threads sending short streamed chats until stopped; counts the jobs that ended."""

    def __init__(self, base_url: str, clients: int, tokens: int):
        self.base_url, self.clients, self.tokens = base_url, clients, tokens
        self.done = 0
        self.failed = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def _run(self) -> None:
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Name a colour."}],
                "max_tokens": self.tokens, "stream": True, "x-localai-extensions": {"ignore_eos": True}}
        with httpx.Client(base_url=self.base_url, timeout=120) as http:
            while not self._stop.is_set():
                try:
                    with http.stream("POST", "/v1/chat/completions", json=body) as response:
                        response.raise_for_status()
                        ended = any(line == "data: [DONE]" for line in response.iter_lines())
                except httpx.HTTPError:
                    ended = False
                with self._lock:
                    if ended:
                        self.done += 1
                    else:
                        self.failed += 1


def sample(client: redis.Redis, server: RedisServer, load: Load, began: float) -> dict:
    return {"t_s": round(time.monotonic() - began, 1), "jobs_done": load.done, "jobs_failed": load.failed,
            "used_memory": client.info("memory")["used_memory"], "keys": client.dbsize(),
            "aof_bytes": aof_bytes(server)}


def summary(rows: list[dict], retention: float, empty: int) -> dict:
    """Last quarter of the run against the quarter before it: memory must have stopped growing."""
    end = rows[-1]["t_s"]
    last = [row for row in rows if row["t_s"] > end * 0.75]
    before = [row for row in rows if end * 0.5 < row["t_s"] <= end * 0.75]
    rate = (rows[-1]["jobs_done"] - rows[0]["jobs_done"]) / max(end - rows[0]["t_s"], 1e-9)
    mean = lambda part, field: statistics.fmean(row[field] for row in part)  # noqa: E731
    figures = {"duration_s": end, "jobs_done": rows[-1]["jobs_done"], "jobs_failed": rows[-1]["jobs_failed"],
               "jobs_per_s": round(rate, 2), "retention_s": retention, "used_memory_empty": empty,
               "aof_rewrites": sum(1 for before, after in zip(rows, rows[1:]) if after["aof_bytes"] < before["aof_bytes"]),
               "aof_max_bytes": max(row["aof_bytes"] for row in rows),
               "used_memory_max": max(row["used_memory"] for row in rows)}
    if last and before:
        figures.update({
            "used_memory_third_quarter": round(mean(before, "used_memory")),
            "used_memory_last_quarter": round(mean(last, "used_memory")),
            "keys_third_quarter": round(mean(before, "keys")), "keys_last_quarter": round(mean(last, "keys")),
            "aof_max_third_quarter": max(row["aof_bytes"] for row in before),
            "aof_max_last_quarter": max(row["aof_bytes"] for row in last),
        })
        jobs_held = rate * retention
        held = figures["used_memory_last_quarter"] - empty
        figures["bytes_per_job_held"] = round(held / jobs_held) if jobs_held else None
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--retention", type=float, default=600.0, help="LOCALQ_JOB_TTL for the run (seconds)")
    parser.add_argument("--window", type=float, default=120.0, help="LOCALQ_RESUME_WINDOW for the run (seconds)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--every", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--csv", type=Path, help="write every sample here")
    parser.add_argument("--json", type=Path, help="write the summary here")
    args = parser.parse_args(argv)
    rows: list[dict] = []
    with ExitStack() as stack:
        base_url, server = start(stack, LOCALQ_JOB_TTL=args.retention, LOCALQ_RESUME_WINDOW=args.window)
        client = redis.Redis.from_url(server.url)
        empty = client.info("memory")["used_memory"]
        load = Load(base_url, args.clients, args.tokens)
        began = time.monotonic()
        load.start()
        stack.callback(load.stop)
        writer = None
        out = stack.enter_context(args.csv.open("w", newline="")) if args.csv else None
        while time.monotonic() - began < args.minutes * 60:
            time.sleep(args.every)
            rows.append(sample(client, server, load, began))
            print(json.dumps(rows[-1]), flush=True)
            if out is not None:
                if writer is None:
                    writer = csv.DictWriter(out, fieldnames=list(rows[-1]))
                    writer.writeheader()
                writer.writerow(rows[-1])
                out.flush()
    report(summary(rows, args.retention, empty), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
