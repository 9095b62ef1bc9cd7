"""Benchmark: where a token's time goes on the queue path (worker emit -> Redis -> API -> client).

Starts an embedded Redis and `localq api` (one gevent worker), no model worker: this process
plays the worker: `--jobs` running jobs each get `--burst` tokens (chat.completion.chunk deltas,
through `tasks.publisher.BackgroundPublisher` as `tasks.run` uses it) every `--interval` seconds,
as a batching engine gives each sequence a token per step. A second process reads every job's
`GET /v1/jobs/{id}/events` stream (the relay chat streams use) and, for job 0, the log straight from
Redis (XREAD), and times each delta from its emit. Prints JSON: emit cost, sends (round trips) and
events per send, emit -> stored, emit -> XREAD, emit -> SSE client (p50/p99 ms), and CPU per event
in Redis, the API and the sender thread. `--publisher per-job` runs the publisher before issue 12
(a thread and a round trip per job) for comparison. Takes about 15 s by default:

    .venv/bin/python -m ops.bench.queue_path [--jobs 8] [--tokens 250] [--interval 0.04] [--burst 1] [--publisher per-job]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil
import redis

import tasks.publisher as publisher_module
from ops.redis_server import RedisServer
from ops.stack import ServiceProcesses
from store.events import EventLog
from store.jobs import new_job_id
from tasks.publisher import BackgroundPublisher
from tasks.runtime import connect
from tasks.settings import QueueSettings


def percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)
    return {"p50_ms": round(statistics.median(ordered) * 1000, 3),
            "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 3)}


# --- the client process: SSE streams through the API, and one direct XREAD reader -------------------


def read_stream(base_url: str, job_id: str, out: list) -> None:
    with httpx.Client(timeout=120) as client, client.stream("GET", f"{base_url}/v1/jobs/{job_id}/events") as reply:
        for line in reply.iter_lines():
            if line.startswith("data: {") and '"t":' in line:
                out.append(time.time() - json.loads(line[6:])["t"])


def read_redis(redis_url: str, job_id: str, out: list) -> None:
    log = EventLog(redis.Redis.from_url(redis_url, decode_responses=True), ttl=60)
    for event in log.follow(job_id, block_ms=500):
        if event is not None and event.type == "delta":
            out.append(time.time() - event.data["t"])


def clients(base_url: str, redis_url: str, job_ids: list[str], ready, results) -> None:
    streams = {job_id: [] for job_id in job_ids}
    direct: list[float] = []
    threads = [threading.Thread(target=read_stream, args=(base_url, job_id, streams[job_id])) for job_id in job_ids]
    threads.append(threading.Thread(target=read_redis, args=(redis_url, job_ids[0], direct)))
    for thread in threads:
        thread.start()
    ready.set()
    for thread in threads:
        thread.join()
    results.put({"sse": [x for values in streams.values() for x in values], "xread": direct,
                 "per_stream": [len(values) for values in streams.values()]})


# --- the worker side: publishers, an engine loop, the sends timed ----------------------------------------


class PerJobPublisher:
    """The publisher before issue 12, for comparison: a thread per job, one round trip per job per send."""

    def __init__(self, events: EventLog, job_id: str):
        self.events, self.job_id = events, job_id
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def emit(self, type_: str, data) -> None:
        self.queue.put((type_, data))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()

    def run(self) -> None:
        while True:
            batch = [self.queue.get()]
            while not self.queue.empty():
                batch.append(self.queue.get())
            done = batch[-1] is None
            batch = [event for event in batch if event is not None]
            if batch:
                started, cpu = time.perf_counter(), time.thread_time()
                self.events.append_many(self.job_id, batch)
                SENDS.record(batch, time.perf_counter() - started, time.thread_time() - cpu)
            if done:
                return


class Sends:
    """Each send's duration, its events, and each event's time from emit to stored."""

    def __init__(self):
        self.lock = threading.Lock()
        self.durations: list[float] = []
        self.sizes: list[int] = []
        self.stored: list[float] = []
        self.cpu = 0.0

    def record(self, events: list, seconds: float, cpu: float) -> None:
        now = time.time()
        with self.lock:
            self.durations.append(seconds)
            self.sizes.append(len(events))
            self.stored += [now - data["t"] for _, data in events]
            self.cpu += cpu


SENDS = Sends()


def timed_send(batches) -> None:
    started, cpu = time.perf_counter(), time.thread_time()
    send(batches)
    SENDS.record([event for events in batches.values() for event in events], time.perf_counter() - started,
                 time.thread_time() - cpu)


send = publisher_module.send


def chunk(job_id: str, step: int) -> dict:
    return {"id": f"chatcmpl-{job_id[4:20]}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": "smollm2-135m", "system_fingerprint": "b1",
            "choices": [{"index": 0, "delta": {"content": f" word{step}"}, "logprobs": None, "finish_reason": None}],
            "t": time.time()}


def engine(rt, job_ids: list[str], tokens: int, interval: float, burst: int, kind: str) -> dict:
    make = PerJobPublisher if kind == "per-job" else BackgroundPublisher
    publishers = [make(rt.events, job_id) for job_id in job_ids]
    emit_seconds = 0.0
    started = time.perf_counter()
    for step in range(tokens):
        step_start = time.perf_counter()
        for job_id, publisher in zip(job_ids, publishers, strict=True):
            for _ in range(burst):
                data = chunk(job_id, step)
                before = time.perf_counter()
                publisher.emit("delta", data)
                emit_seconds += time.perf_counter() - before
        if interval:
            time.sleep(max(0.0, interval - (time.perf_counter() - step_start)))
    for publisher in publishers:
        publisher.close()
    elapsed = time.perf_counter() - started
    for job_id in job_ids:  # as tasks.run ends a job: the record, then the terminal event
        pipe = rt.redis.pipeline(transaction=False)
        rt.jobs.finish(job_id, "succeeded", result={"object": "chat.completion"}, pipe=pipe)
        rt.events.append_many(job_id, [("result", {"object": "chat.completion"})], pipe=pipe)
        pipe.execute()
    events = tokens * burst * len(job_ids)
    return {"events": events, "seconds": round(elapsed, 3), "events_per_s": round(events / elapsed, 1),
            "emit_us": round(emit_seconds / events * 1e6, 2)}


def cpu_seconds(process: psutil.Process) -> float:
    total = 0.0
    for proc in [process, *process.children(recursive=True)]:
        times = proc.cpu_times()
        total += times.user + times.system
    return total


def redis_stats(client: redis.Redis) -> dict:
    cpu = client.info("cpu")
    return {"cpu": cpu["used_cpu_user"] + cpu["used_cpu_sys"], "commands": client.info("commandstats")}


def command_delta(before: dict, after: dict, name: str) -> dict:
    key = f"cmdstat_{name}"
    calls = after.get(key, {}).get("calls", 0) - before.get(key, {}).get("calls", 0)
    usec = after.get(key, {}).get("usec", 0) - before.get(key, {}).get("usec", 0)
    return {"calls": calls, "usec_per_call": round(usec / calls, 2) if calls else None}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=250, help="tokens per job")
    parser.add_argument("--interval", type=float, default=0.04, help="seconds between engine steps (0: flat out)")
    parser.add_argument("--burst", type=int, default=1, help="tokens each job gets per step")
    parser.add_argument("--publisher", choices=("shared", "per-job"), default="shared")
    parser.add_argument("--logs", type=Path)
    args = parser.parse_args(argv)
    publisher_module.send = timed_send  # the shared sender looks its `send` up at each call

    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp) / "redis") as redis_server:
        env = {**os.environ, "LOCALQ_REDIS_URL": redis_server.url}
        stack = ServiceProcesses(env=env, log_dir=args.logs or Path(tmp) / "logs")
        try:
            stack.start_api()
            rt = connect(QueueSettings(redis_url=redis_server.url))
            job_ids = [new_job_id() for _ in range(args.jobs)]
            for job_id in job_ids:
                rt.jobs.create(job_id, kind="chat", model="smollm2-135m", queue="cpu", priority="interactive",
                               deadline=time.time() + 600, attached=False)
            context = multiprocessing.get_context("spawn")
            ready, results = context.Event(), context.Queue()
            reader = context.Process(target=clients, args=(stack.base_url, redis_server.url, job_ids, ready, results))
            reader.start()
            ready.wait(60)
            time.sleep(1.0)  # the streams are open and blocked in XREAD
            api = psutil.Process(stack.api.pid)
            api_cpu, redis_before = cpu_seconds(api), redis_stats(rt.redis)
            own = time.process_time()
            emitted = engine(rt, job_ids, args.tokens, args.interval, args.burst, args.publisher)
            read = results.get(timeout=120)
            reader.join(30)
            api_cpu, redis_after = cpu_seconds(api) - api_cpu, redis_stats(rt.redis)
            worker_cpu = time.process_time() - own
        finally:
            stack.stop()
    events = emitted["events"]
    print(json.dumps({
        "jobs": args.jobs, "tokens_per_job": args.tokens, "interval_s": args.interval, "burst": args.burst,
        "publisher": args.publisher,
        **emitted,
        "sends": len(SENDS.sizes), "events_per_send": round(events / max(1, len(SENDS.sizes)), 2),
        "send_round_trip": percentiles(SENDS.durations),
        "emit_to_stored": percentiles(SENDS.stored),
        "emit_to_xread": percentiles(read["xread"]),
        "emit_to_sse_client": percentiles(read["sse"]),
        "sse_deltas_received": sum(read["per_stream"]),
        "cpu_us_per_event": {
            "sender_thread": round(SENDS.cpu / events * 1e6, 1),
            "worker_process_total": round(worker_cpu / events * 1e6, 1),
            "redis": round((redis_after["cpu"] - redis_before["cpu"]) / events * 1e6, 1),
            "api": round(api_cpu / events * 1e6, 1),
        },
        "redis_commands": {name: command_delta(redis_before["commands"], redis_after["commands"], name)
                           for name in ("eval", "xread", "hset", "expire")},
    }, indent=2))


if __name__ == "__main__":
    sys.exit(main())
