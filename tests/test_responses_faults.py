"""Background responses across faults (issue 15): cancelled mid-way, their worker's pool process
SIGKILLed (the job is redelivered and the response completes, its event stream without a gap or
a duplicate), and the API process restarted (stored responses stay, a running one finishes)."""

from __future__ import annotations

import json
import os
import signal

import httpx
import pytest
import redis
from openai import OpenAI

from ops.stack import API
from tests.service import CHAT, only_models, running_service, wait_until

@pytest.fixture(scope="module")
def service(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("responses")
    with running_service(tmp, only_models(tmp / "models", CHAT), slots=1) as svc:
        yield svc


def client(service) -> OpenAI:
    return OpenAI(base_url=service.base_url + "/v1", api_key="unused", timeout=180, max_retries=0)


@pytest.fixture(scope="module")
def store(service):
    with redis.Redis.from_url(service.redis.url, decode_responses=True) as connection:
        yield connection


def job_of(store, response_id: str) -> dict:
    job_id = store.hget(f"localq:response:{response_id}", "job_id")
    return store.hgetall(f"localq:job:{job_id}") | {"id": job_id}


def events_so_far(store, job_id: str) -> int:
    return store.xlen(f"localq:job:{job_id}:events")


def replay(service, response_id: str) -> list[dict]:
    with httpx.stream("GET", f"{service.base_url}/v1/responses/{response_id}", params={"stream": "true"},
                      timeout=300) as answer:
        return [json.loads(line[6:]) for line in answer.iter_lines() if line.startswith("data: ")]


def test_a_background_response_cancelled_mid_way(service, store):
    made = client(service).responses.create(model=CHAT, input="Write a long story about the sea.",
                                            max_output_tokens=1500, temperature=0, background=True,
                                            extra_body={"ignore_eos": True})
    job = wait_until(lambda: (found := job_of(store, made.id)).get("status") == "running" and found, 60, "it to run")
    wait_until(lambda: events_so_far(store, job["id"]) > 10, 60, "some tokens")
    cancelled = client(service).responses.cancel(made.id)
    assert cancelled.status == "cancelled"
    assert client(service).responses.retrieve(made.id).status == "cancelled"
    wait_until(lambda: job_of(store, made.id)["status"] == "cancelled", 30, "the job to stop")
    assert len(cancelled.output) <= 1, "what it had made so far, if anything"


def test_a_background_response_survives_its_worker_being_killed(service, store):
    made = client(service).responses.create(model=CHAT, input="Write about ships.", max_output_tokens=200,
                                            temperature=0, background=True, extra_body={"ignore_eos": True})
    job = wait_until(lambda: (found := job_of(store, made.id)).get("status") == "running" and found.get("worker")
                     and found, 60, "it to run")
    wait_until(lambda: events_so_far(store, job["id"]) > 8, 60, "some tokens")
    os.kill(int(job["worker"].rsplit(":", 1)[1]), signal.SIGKILL)  # the pool process running it
    done = wait_until(lambda: (found := client(service).responses.retrieve(made.id)).status not in
                      ("queued", "in_progress") and found, 240, "the response to finish after redelivery")
    assert done.status == "incomplete" and done.usage.output_tokens == 200
    assert int(job_of(store, made.id)["attempts"]) == 2
    events = replay(service, made.id)
    assert [event["sequence_number"] for event in events] == list(range(len(events))), "no gap, no duplicate"
    text = "".join(event["delta"] for event in events if event["type"] == "response.output_text.delta")
    assert text == done.output_text != ""
    assert events[-1]["type"] == "response.incomplete"


def test_responses_outlive_the_api_process(service, store):
    finished = client(service).responses.create(model=CHAT, input="Hi", max_output_tokens=16, temperature=0)
    running = client(service).responses.create(model=CHAT, input="Write about rivers.", max_output_tokens=120,
                                               temperature=0, background=True, extra_body={"ignore_eos": True})
    service.processes.stop_one(API, signal.SIGTERM, 30)
    service.start_api()
    again = client(service)
    assert again.responses.retrieve(finished.id).model_dump() == finished.model_dump()
    done = wait_until(lambda: (found := again.responses.retrieve(running.id)).status not in ("queued", "in_progress")
                      and found, 240, "the background response to finish")
    assert done.status == "incomplete" and done.usage.output_tokens == 120
