"""Slow clients against the real `localq api` (gunicorn): a stalled request body is answered 408
within LOCALQ_BODY_READ_TIMEOUT, and many stalled connections and open streams do not keep the
cheap routes from answering. Latency figures are in `ops/bench/slow_clients.py`, not here.
"""

from __future__ import annotations

import json
import os
import select
import socket

import httpx
import pytest

from api.settings import Settings
from ops.stack import ServiceProcesses
from tests.raw_http import assert_openai_error, connect, read_reply, request_head
from tests.service import running_service

STALLED = 200
# More than redis-py's default pool of 100 connections: each open stream holds one (blocked in
# XREAD) nearly all the time, so the API's Redis pool must not be what limits its streams.
STREAMS = 120


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """An API that waits 1 s for the next piece of a request body."""
    with running_service(tmp_path_factory.mktemp("quick"), {"LOCALQ_BODY_READ_TIMEOUT": "1"}, workers=()) as svc:
        yield svc.base_url


@pytest.fixture(scope="module")
def patient(tmp_path_factory):
    """An API that waits long for request bodies, so stalled clients stay for the whole test; no
    worker, so every job waits in the queue and its stream stays open."""
    with running_service(tmp_path_factory.mktemp("patient"), {"LOCALQ_BODY_READ_TIMEOUT": "600"},
                         workers=()) as svc:
        yield svc.base_url


def stalled_head(length: int = 1000) -> bytes:
    return request_head("POST", "/v1/chat/completions",
                        {"Content-Type": "application/json", "Content-Length": str(length)})


def test_a_stalled_body_is_answered_408_and_the_connection_closed(quick):
    with connect(quick, timeout=30) as sock:
        sock.sendall(stalled_head() + b'{"model":')
        assert_openai_error(read_reply(sock), 408, "request_timeout")
        assert sock.recv(1) == b""  # closed: the rest of the body would not be the next request


def test_a_stalled_chunked_body_is_answered_408(quick):
    head = request_head("POST", "/v1/embeddings", {"Content-Type": "application/json",
                                                   "Transfer-Encoding": "chunked"})
    with connect(quick, timeout=30) as sock:
        sock.sendall(head + b"9\r\n{\"model\":\r\n")
        assert_openai_error(read_reply(sock), 408, "request_timeout")


def test_a_body_that_keeps_coming_is_read(quick):
    # The bound is on waiting for the next piece, not on the whole body.
    body = json.dumps({"model": "m", "input": "x", "pad": 1}).encode()
    head = request_head("POST", "/v1/embeddings", {"Content-Type": "application/json",
                                                   "Content-Length": str(len(body))})
    with connect(quick, timeout=30) as sock:
        sock.sendall(head)
        for i in range(len(body)):
            if i % 8 == 0:
                select.select([], [], [], 0.3)  # 0.3 s between pieces, ~2 s in all: over the 1 s bound
            sock.sendall(body[i:i + 1])
        error = assert_openai_error(read_reply(sock), 400)
        assert error["param"] == "pad", error


def open_stream(client: httpx.Client) -> httpx.Response:
    request = client.build_request("POST", "/v1/chat/completions", json={
        "model": "gpt-4o-mini", "stream": True, "max_tokens": 8,
        "messages": [{"role": "user", "content": "hi"}],
    })
    response = client.send(request, stream=True)
    assert response.status_code == 200, response.read()
    assert next(response.iter_lines()).startswith(":")  # the keep-alive that opens every stream
    return response


def test_cheap_routes_answer_while_many_clients_stall_and_streams_are_open(patient):
    stalled: list[socket.socket] = []
    streams: list[httpx.Response] = []
    with httpx.Client(base_url=patient, timeout=60, limits=httpx.Limits(max_connections=STREAMS + 5)) as client:
        try:
            for _ in range(STALLED):
                sock = connect(patient)
                sock.sendall(stalled_head() + b'{"model":')
                stalled.append(sock)
            streams = [open_stream(client) for _ in range(STREAMS)]
            job_id = streams[-1].headers["x-localq-job-id"]
            for _ in range(20):
                assert client.get("/healthz").json()["status"] == "ok"
                assert client.get("/v1/models").json()["object"] == "list"
                job = client.get(f"/v1/jobs/{job_id}")  # reads Redis, while every stream holds a connection
                assert job.status_code == 200 and job.json()["status"] == "queued", job.text
            # The stalled clients are still waiting (nothing was answered to them): they really were open.
            readable, _, _ = select.select(stalled, [], [], 0)
            assert not readable
        finally:
            for response in streams:
                response.close()
            for sock in stalled:
                sock.close()


def test_the_body_read_timeout_is_a_checked_setting():
    assert Settings.from_env({}).body_read_timeout == 10.0
    assert Settings.from_env({"LOCALQ_BODY_READ_TIMEOUT": "2.5"}).body_read_timeout == 2.5
    for bad in ("soon", "0", "-1", "inf"):
        with pytest.raises(ValueError, match="LOCALQ_BODY_READ_TIMEOUT"):
            Settings.from_env({"LOCALQ_BODY_READ_TIMEOUT": bad})


def test_stopping_closes_idle_keep_alive_connections_at_once(redis_server, tmp_path):
    # gunicorn's gevent worker waits for every connection to end before it exits, idle keep-alive
    # ones included (up to the keep-alive time); ours closes those, so a stop is not held for the
    # whole graceful timeout by clients that are merely connected.
    stack = ServiceProcesses(env={**os.environ, "LOCALQ_REDIS_URL": redis_server.url}, log_dir=tmp_path)
    try:
        stack.start_api()
        with httpx.Client(base_url=stack.base_url, timeout=30) as idle:
            assert idle.get("/healthz").status_code == 200  # the connection stays open, idle
            stack.stop()
    finally:
        stack.stop()
    log = (tmp_path / "api.log").read_text()
    assert "Worker exiting" in log and "graceful timeout" not in log, log


def test_the_apis_redis_pools_do_not_cap_its_connections(app):
    # Each open stream holds a Redis connection while it waits in XREAD, and a gevent worker serves
    # up to DEFAULT_CONNECTIONS requests at once: a smaller pool (redis-py's default is 100) turns
    # the 101st stream or job lookup into a 503 "Too many connections".
    from api.queue import queue_runtime
    from ops.api_server import DEFAULT_CONNECTIONS

    with app.app_context():
        runtime = queue_runtime()
        assert runtime.redis.connection_pool.max_connections >= DEFAULT_CONNECTIONS
        assert runtime.blobs.connection_pool.max_connections >= DEFAULT_CONNECTIONS
