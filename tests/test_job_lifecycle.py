"""How `localq.run_job` ends a job, run in-process on a real Redis (issue 11's job-lifecycle bug).

Every job must end with a final status and a terminal event, whatever went wrong, or its client
waits for the whole deadline and then gets a synthetic 504. The model call itself is replaced
here (this is the task's own logic, not a model's): one backend emits a delta and a result while
Redis refuses the first publish, one returns without any result.
"""

from __future__ import annotations

import time

import pytest
import redis

from tasks import run as task_module  # `execute` as the task calls it
from store.events import EventLog
from store.metrics import JOBS_KEY
from tasks.run import run_job
from tasks.runtime import model_runtime, runtime


@pytest.fixture
def rt(redis_server, monkeypatch):
    monkeypatch.setenv("LOCALQ_REDIS_URL", redis_server.url)
    runtime.cache_clear()
    runtime().redis.flushall()
    yield runtime()
    runtime.cache_clear()


def queued_job(rt, job_id: str) -> dict:
    job = {"id": job_id, "kind": "chat", "model": "gpt-4o-mini", "created": int(time.time()),
           "deadline": time.time() + 60, "request": {"model": "gpt-4o-mini", "messages": []}}
    rt.jobs.create(job_id, kind="chat", model="gpt-4o-mini", queue="cpu", priority="interactive",
                   deadline=job["deadline"], attached=True)
    return job


def terminal_event(rt, job_id: str):
    events = rt.events.all(job_id)
    assert events and events[-1].terminal, [event.type for event in events]
    return events[-1]


def test_a_failed_publish_ends_the_job_with_an_error(rt, monkeypatch):
    def backend(job, emit, cancelled, **_):
        emit("delta", {"choices": [{"delta": {"content": "hi"}}]})
        emit("result", {"object": "chat.completion"})

    calls = {"n": 0}
    append_after = EventLog.append_after  # the publisher's

    def flaky(self, job_id, events, last, pipe=None):
        events = list(events)
        calls["n"] += 1
        if calls["n"] == 1:
            raise redis.ResponseError("refused")
        return append_after(self, job_id, events, last, pipe=pipe)

    monkeypatch.setattr(task_module, "execute", backend)
    monkeypatch.setattr(EventLog, "append_after", flaky)
    model_runtime()  # loads the registry before the first publish
    job = queued_job(rt, "job_0000000000000001")
    run_job(job)  # before the fix: raised the publish error, leaving the job "running" and silent
    event = terminal_event(rt, job["id"])
    assert event.type == "error" and event.data["error"]["code"] == "output_lost"
    assert set(event.data["error"]) == {"message", "type", "param", "code"}
    assert rt.jobs.get(job["id"])["status"] == "failed"


def test_a_job_without_a_result_is_failed_not_cancelled(rt, monkeypatch):
    monkeypatch.setattr(task_module, "execute", lambda job, emit, cancelled, **_: None)
    job = queued_job(rt, "job_0000000000000002")
    run_job(job)  # before the fix: "cancelled by the client", although no client cancelled anything
    event = terminal_event(rt, job["id"])
    assert event.type == "error" and event.data["status"] == 500 and event.data["error"]["code"] == "no_result"
    assert rt.jobs.get(job["id"])["status"] == "failed"


def test_a_cancelled_job_is_still_cancelled(rt, monkeypatch):
    def backend(job, emit, cancelled, **_):
        rt.jobs.request_cancel(job["id"])  # the client leaves while the job runs
        deadline = time.monotonic() + 10
        while not cancelled() and time.monotonic() < deadline:
            time.sleep(0.01)

    monkeypatch.setattr(task_module, "execute", backend)
    job = queued_job(rt, "job_0000000000000003")
    run_job(job)
    assert terminal_event(rt, job["id"]).type == "cancelled"
    assert rt.jobs.get(job["id"])["status"] == "cancelled"


def test_a_job_cancelled_while_queued_is_not_run_when_its_message_comes(rt, monkeypatch):
    def backend(job, emit, cancelled, **_):
        raise AssertionError("a job that had ended ran")

    monkeypatch.setattr(task_module, "execute", backend)
    job = queued_job(rt, "job_0000000000000004")
    rt.jobs.request_cancel(job["id"])
    assert rt.jobs.end_unstarted(job["id"])  # as POST /v1/jobs/{id}/cancel ends a job nobody took
    before = rt.redis.hgetall(JOBS_KEY)
    run_job(job)  # its message, delivered later
    assert [(event.type, event.data) for event in rt.events.all(job["id"])] == [
        ("cancelled", {"reason": "cancelled before it started"})]
    record = rt.jobs.get(job["id"])
    assert record["status"] == "cancelled" and "worker" not in record and record["attempts"] == "0"
    assert rt.redis.hgetall(JOBS_KEY) == before, "counted once, by whoever ended it"


def test_a_job_flagged_before_delivery_ends_cancelled_before_it_started(rt, monkeypatch):
    monkeypatch.setattr(task_module, "execute", lambda *args, **kwargs: pytest.fail("a cancelled job ran"))
    job = queued_job(rt, "job_0000000000000005")
    rt.jobs.request_cancel(job["id"])
    run_job(job)
    assert [(event.type, event.data) for event in rt.events.all(job["id"])] == [
        ("status", {"status": "running"}), ("cancelled", {"reason": "cancelled before it started"})]
    assert rt.jobs.get(job["id"])["status"] == "cancelled"
    assert rt.redis.hget(JOBS_KEY, '["chat","cancelled"]') == "1"
