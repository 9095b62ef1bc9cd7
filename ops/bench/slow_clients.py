"""Benchmark: do the cheap routes keep answering while slow clients and long streams are open?

Starts an embedded Redis, one CPU worker and `localq api` (one gevent worker), then opens:

- `--streams` SSE streams of a real job: one streamed chat completion with a large `max_tokens`
  (it runs on the worker, token by token; `--job image`: a 200-step image generation, one
  progress event a step) and, on the same job, `GET /v1/jobs/{id}/events` streams for the rest,
  all read as they come; with `--queued`, no worker is started and every stream is a chat
  completion of its own, waiting in the queue (keep-alive comments only);
- `--stalled` connections that send the headers of a chat completion with `Content-Length: 1000`,
  then 9 bytes of body, then nothing (the API is started with LOCALQ_BODY_READ_TIMEOUT=600, so
  none of them is let go while we measure);

and times `--requests` sequential calls each of `GET /healthz` and `GET /v1/models` on a
keep-alive connection, before the load (baseline) and under it; prints p50/p99/max in ms as JSON.
Run it by hand (it takes about a minute):

    .venv/bin/python -m ops.bench.slow_clients [--stalled 500] [--streams 100] [--requests 300] [--queued]
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from ops.redis_server import RedisServer
from ops.stack import ServiceProcesses, wait_until

STALLED_HEAD = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000\r\n\r\n" + b'{"model":')
JOBS = {
    "chat": ("/v1/chat/completions", {"model": "gpt-4o-mini", "stream": True, "max_tokens": 4096,
                                      "messages": [{"role": "user", "content": "Write a long story about a lighthouse."}]}),
    "image": ("/v1/images/generations", {"prompt": "a slow landscape", "size": "512x512", "stream": True,
                                         "x-localai-extensions": {"steps": 200}}),
}


def connect(base_url: str) -> socket.socket:
    parts = urlsplit(base_url)
    return socket.create_connection((parts.hostname, parts.port), timeout=30)


def raw_request(method: str, path: str, body: bytes = b"") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\n"
    if body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


class StreamReader(threading.Thread):
    """Reads every open stream as its bytes come (one thread, one selector), counting them."""

    def __init__(self):
        super().__init__(daemon=True)
        self.selector = selectors.DefaultSelector()
        self.received = 0
        self.ended = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def add(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        with self.lock:
            self.selector.register(sock, selectors.EVENT_READ)

    def run(self) -> None:
        while not self.stop.is_set():
            with self.lock:
                events = self.selector.select(0.05) if self.selector.get_map() else []
            if not events:
                time.sleep(0.01)
            for key, _ in events:
                try:
                    data = key.fileobj.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if data:
                    self.received += len(data)
                else:
                    with self.lock:
                        self.selector.unregister(key.fileobj)
                    self.ended += 1


def open_job_stream(base_url: str, reader: StreamReader, job: str) -> tuple[socket.socket, str]:
    """A streamed job (chat completion or image), once its headers are in; with its job id."""
    path, body = JOBS[job]
    sock = connect(base_url)
    sock.sendall(raw_request("POST", path, json.dumps(body).encode()))
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(4096)
    job_id = next(line.split(b":", 1)[1].strip().decode() for line in head.split(b"\r\n")
                  if line.lower().startswith(b"x-localq-job-id:"))
    reader.add(sock)
    return sock, job_id


def open_streams(base_url: str, count: int, reader: StreamReader, job: str,
                 queued: bool) -> tuple[list[socket.socket], str]:
    first, job_id = open_job_stream(base_url, reader, job)
    socks = [first]
    for _ in range(count - 1):
        if queued:
            socks.append(open_job_stream(base_url, reader, job)[0])
            continue
        sock = connect(base_url)
        sock.sendall(raw_request("GET", f"/v1/jobs/{job_id}/events"))
        socks.append(sock)
        reader.add(sock)
    return socks, job_id


def open_stalled(base_url: str, count: int) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        sock = connect(base_url)
        sock.sendall(STALLED_HEAD)
        socks.append(sock)
    return socks


def measure(base_url: str, requests: int) -> dict:
    timings: dict[str, list[float]] = {"/healthz": [], "/v1/models": []}
    with httpx.Client(base_url=base_url, timeout=60) as client:
        for path in timings:
            client.get(path).raise_for_status()  # connect and warm up
        for _ in range(requests):
            for path, samples in timings.items():
                start = time.perf_counter()
                client.get(path).raise_for_status()
                samples.append((time.perf_counter() - start) * 1000)
    return {path: summary(samples) for path, samples in timings.items()}


def summary(samples: list[float]) -> dict:
    ordered = sorted(samples)
    return {"n": len(ordered), "p50_ms": round(statistics.median(ordered), 2),
            "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 2),
            "max_ms": round(ordered[-1], 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stalled", type=int, default=500)
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--job", choices=sorted(JOBS), default="chat", help="the kind of job streamed")
    parser.add_argument("--queued", action="store_true", help="no worker: every stream waits in the queue")
    parser.add_argument("--logs", type=Path, help="keep the API and worker logs in this folder")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp) / "redis") as redis_server:
        env = {**os.environ, "LOCALQ_REDIS_URL": redis_server.url, "LOCALQ_BODY_READ_TIMEOUT": "600"}
        stack = ServiceProcesses(env=env, log_dir=args.logs or Path(tmp) / "logs")
        reader = StreamReader()
        held: list[socket.socket] = []
        try:
            if not args.queued:
                stack.start_worker()
            stack.start_api()
            results: dict = {"stalled": args.stalled, "streams": args.streams, "job": args.job, "queued": args.queued,
                             "baseline": measure(stack.base_url, args.requests)}
            reader.start()
            streams, job_id = open_streams(stack.base_url, args.streams, reader, args.job, args.queued)
            held += streams
            if not args.queued:
                wait_until(lambda: httpx.get(f"{stack.base_url}/v1/jobs/{job_id}", timeout=30).json()["status"]
                           == "running", 120, "the chat job to run")
            held += open_stalled(stack.base_url, args.stalled)
            before = reader.received
            results["under_load"] = measure(stack.base_url, args.requests)
            results["stream_bytes_while_measuring"] = reader.received - before
            results["streams_ended_while_measuring"] = reader.ended
            after = httpx.get(f"{stack.base_url}/v1/jobs/{job_id}", timeout=30).json()
            results["job_status_after"] = after.get("status") or after
            print(json.dumps(results, indent=2))
        finally:
            reader.stop.set()
            for sock in held:
                sock.close()
            stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
