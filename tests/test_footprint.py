"""A finished job's footprint in Redis: its token-level log is kept for the resume window only,
then the job is its record, and its event stream is rebuilt from that record."""

from __future__ import annotations

import json
import time

import httpx
import pytest
import redis

from tests import sse
from tests.service import only_models, running_service, wait_until

pytestmark = pytest.mark.integration

WINDOW = 3  # seconds


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    folder = tmp_path_factory.mktemp("footprint")
    env = {"LOCALQ_RESUME_WINDOW": str(WINDOW), **only_models(folder / "models", "smollm2-135m-instruct")}
    with running_service(folder, env) as running:
        yield running


def job_bytes(client: redis.Redis, job_id: str) -> int:
    """Redis memory held by every key named after the job."""
    return sum(client.memory_usage(key) or 0 for key in client.scan_iter(match=f"*{job_id}*", count=1000))


def events_of(base_url: str, job_id: str, last: str | None = None) -> httpx.Response:
    headers = {"Last-Event-ID": last} if last else {}
    return httpx.get(f"{base_url}/v1/jobs/{job_id}/events", headers=headers, timeout=30)


def test_a_finished_chat_keeps_its_log_for_the_window_then_only_its_record(service):
    client = redis.Redis.from_url(service.env["LOCALQ_REDIS_URL"])
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Tell me about the sea."}],
            "max_tokens": 128, "temperature": 0, "stream": True, "x-localai-extensions": {"ignore_eos": True}}
    with httpx.stream("POST", service.base_url + "/v1/chat/completions", json=body, timeout=120) as response:
        job_id = response.headers["x-localq-job-id"]
        streamed = "".join(json.loads(event.data)["choices"][0]["delta"].get("content") or ""
                           for event in sse.events(response.iter_lines())
                           if not event.done and json.loads(event.data)["choices"])
    wait_until(lambda: httpx.get(f"{service.base_url}/v1/jobs/{job_id}", timeout=10).json()["status"] == "succeeded",
               30, "the job's record")
    # within the window: the whole log, to resume or replay
    replay = list(sse.events(events_of(service.base_url, job_id).iter_lines()))
    assert [event.event for event in replay].count("delta") >= 100 and replay[-1].event == "result"
    during = job_bytes(client, job_id)
    assert client.exists(f"localq:job:{job_id}:events")

    wait_until(lambda: not client.exists(f"localq:job:{job_id}:events"), WINDOW + 10, "the end of the window")
    after = job_bytes(client, job_id)
    kept = {key.decode(): client.memory_usage(key) for key in client.scan_iter(match=f"*{job_id}*")}
    kept["fields"] = {k.decode(): len(v) for k, v in client.hgetall(f"localq:job:{job_id}").items()}
    assert after <= 4096 < during, (during, after, kept)
    assert set(kept) == {f"localq:job:{job_id}", "fields"}, f"a finished job is its record alone: {kept}"

    # after it: the job is its record; its event stream is the final event, rebuilt from it
    job = httpx.get(f"{service.base_url}/v1/jobs/{job_id}", timeout=10).json()
    assert job["status"] == "succeeded" and job["result"]["choices"][0]["message"]["content"] == streamed
    assert job["result"]["usage"]["completion_tokens"] == 128
    (final,) = list(sse.events(events_of(service.base_url, job_id).iter_lines()))
    assert final.event == "result" and json.loads(final.data) == job["result"]
    assert events_of(service.base_url, job_id, final.id).status_code == 204  # the client has it all
    assert events_of(service.base_url, job_id, replay[3].id).status_code == 200  # an older id: the final event
    started = time.monotonic()
    (again,) = list(sse.events(events_of(service.base_url, job_id, replay[3].id).iter_lines()))
    assert again.event == "result" and time.monotonic() - started < 10


def test_a_stored_response_outlives_its_event_log(service):
    """Past the window a background response is still retrieved whole; replaying its events is
    refused by name (they are no longer kept) instead of a stream that would never end."""
    api = f"{service.base_url}/v1/responses"
    created = httpx.post(api, json={"model": "gpt-4o-mini", "input": "Say hello.", "max_output_tokens": 16,
                                    "background": True}, timeout=30).json()
    ended = wait_until(lambda: (status := httpx.get(f"{api}/{created['id']}", timeout=10).json()["status"])
                       in ("completed", "incomplete") and status, 60, "the response")
    within = httpx.get(f"{api}/{created['id']}", params={"stream": "true"}, timeout=30)
    assert within.status_code == 200 and f"response.{ended}" in within.text
    client = redis.Redis.from_url(service.env["LOCALQ_REDIS_URL"])
    job_id = within.headers["x-localq-job-id"]
    wait_until(lambda: not client.exists(f"localq:job:{job_id}:events"), WINDOW + 10, "the end of the window")
    late = httpx.get(f"{api}/{created['id']}", params={"stream": "true"}, timeout=30)
    assert late.status_code == 400 and late.json()["error"]["code"] == "events_expired"
    kept = httpx.get(f"{api}/{created['id']}", timeout=10).json()
    assert kept["status"] == ended and kept["output"][0]["content"][0]["text"]
