"""A worker with several job slots killed while it runs a sequence in each: nothing is lost or doubled.

`localq worker --gpus none --cpu 1` (the launcher) runs one CPU worker with 4 slots (SmolLM2 with
`parallel: 4`: Celery's threads pool, the four jobs decoding together in one batching engine).
Four clients stream a chat each through the API; once every stream has text, the worker's
process is SIGKILLed. The launcher starts it again under the same name, its successor puts the
four unacknowledged messages back at once, and every job runs again from its start. Each client
gets its answer exactly once: the stream it already had is not repeated (the deltas published
before the kill are skipped), and what it reads in all equals what the same request gives alone.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import psutil
import pytest
import redis
from openai import OpenAI

from ops.redis_server import RedisServer
from ops.stack import ServiceProcesses, wait_until
from store.events import EventLog
from tests.service import CHAT, only_models

REPO = Path(__file__).resolve().parent.parent
WORKER = f"cpu0@{socket.gethostname()}"
MODEL = CHAT
SLOTS = 4
REQUEST = {"model": MODEL, "max_tokens": 160, "temperature": 0,
           "extra_body": {"x-localai-extensions": {"ignore_eos": True}}}


def ask(index: int) -> list:
    return [{"role": "user", "content": f"Story {index}: tell me a long story about a lighthouse."}]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slots")
    with RedisServer(tmp / "redis") as server:
        env = {**os.environ, "LOCALQ_REDIS_URL": server.url, **only_models(tmp / "models", MODEL, parallel=SLOTS),
               "LOCALQ_JOB_TIMEOUT": "120", "PYTHONUNBUFFERED": "1"}
        env.pop("LOCALQ_MODEL_CACHE_BYTES", None)
        log = tmp / "launcher.log"
        with open(log, "wb") as out:
            launcher = subprocess.Popen([sys.executable, "-m", "ops.cli", "worker", "--gpus", "none", "--cpu", "1"],
                                        cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        api = ServiceProcesses(env, tmp)
        try:
            api.start_api()
            yield launcher, api.base_url, server, log
        finally:
            api.stop()
            launcher.send_signal(signal.SIGTERM)
            try:
                launcher.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(launcher.pid, signal.SIGKILL)
                launcher.wait()


def worker_process(launcher: subprocess.Popen) -> psutil.Process | None:
    for child in psutil.Process(launcher.pid).children():
        try:
            argv = child.cmdline()
        except psutil.NoSuchProcess:
            continue
        if "celery" in argv and "--hostname" in argv:
            return child
    return None


def test_killed_worker_with_four_sequences_has_each_redelivered_once(service):
    launcher, base_url, server, log = service
    worker = wait_until(lambda: worker_process(launcher), 60, "the worker")
    argv = worker.cmdline()
    assert argv[argv.index("--pool") + 1] == "threads" and argv[argv.index("--concurrency") + 1] == str(SLOTS)
    client = OpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0, timeout=300)
    # the answers alone, one at a time (the first also loads the model)
    alone = [client.chat.completions.create(messages=ask(i), **REQUEST).choices[0].message.content
             for i in range(SLOTS)]

    store = redis.Redis.from_url(server.url, decode_responses=True)
    received: list[list[str]] = [[] for _ in range(SLOTS)]
    job_ids: list[str | None] = [None] * SLOTS
    failures: list[BaseException] = []

    def stream(index: int) -> None:
        try:
            for chunk in client.chat.completions.create(messages=ask(index), stream=True, **REQUEST):
                job_ids[index] = chunk.id.removeprefix("chatcmpl-")
                if chunk.choices and chunk.choices[0].delta.content:
                    received[index].append(chunk.choices[0].delta.content)
        except BaseException as err:  # noqa: BLE001 - reported below
            failures.append(err)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(SLOTS)]
    for thread in threads:
        thread.start()
    # every slot busy and every client reading text: then the worker dies with four sequences in flight
    wait_until(lambda: all(len(parts) >= 3 for parts in received), 120, "text on all four streams")
    before = [len(parts) for parts in received]
    worker.send_signal(signal.SIGKILL)
    for thread in threads:
        thread.join(300)
        assert not thread.is_alive(), "a stream never ended"
    assert not failures, failures

    assert all(len(parts) > count for parts, count in zip(received, before, strict=True))  # they went on
    assert ["".join(parts) for parts in received] == alone  # nothing sent twice, nothing missing
    for job_id in job_ids:
        record = store.hgetall(f"localq:job:{job_id}")
        assert record["status"] == "succeeded" and record["attempts"] == "2", record
        assert [event.type for event in EventLog(store, 60).all(job_id)].count("result") == 1
    restarted = wait_until(lambda: (w := worker_process(launcher)) and w.pid != worker.pid and w, 30, "the new worker")
    assert restarted.is_running()
    text = log.read_text(errors="replace")
    assert f"(pid {worker.pid}) was killed by SIGKILL" in text
    assert "put back 4 message(s)" in text
    assert httpx.get(base_url + "/healthz", timeout=5).status_code == 200


def test_a_job_too_deep_to_walk_fails_alone_on_a_worker_with_slots(service):
    """A threads worker hands no message to another process (nothing is pickled), so a request
    nested too deep reaches the job itself: it fails with a 400, and the worker serves on."""
    from tasks.celery_app import make_app
    from tasks.runtime import connect
    from tasks.settings import QueueSettings
    from tests.test_dead_letters import final_record, poisoned_chat, send_job

    launcher, base_url, server, _ = service
    worker = wait_until(lambda: worker_process(launcher), 60, "the worker")
    settings = QueueSettings.from_env({"LOCALQ_REDIS_URL": server.url})
    app, rt = make_app(settings), connect(settings)
    try:
        request = poisoned_chat(700)
        request["messages"][0]["content"] = {"deep": request.pop("response_format")}  # walked on arrival
        job_id = send_job(rt, app, request)
        record = final_record(rt, job_id)
        assert record["status"] == "failed"
        error = rt.events.all(job_id)[-1].data
        assert error["status"] == 400 and error["error"]["code"] == "request_too_deep"
        client = OpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0, timeout=120)
        assert client.chat.completions.create(messages=ask(0), **{**REQUEST, "max_tokens": 2}).choices
        assert worker_process(launcher).pid == worker.pid  # the same worker served it
    finally:
        app.close()
