"""`Last-Event-ID` on `GET /v1/jobs/{id}/events`: validated in full, and never a stream that waits forever.

Redis stream ids are two unsigned 64-bit integers (`ms-seq`); anything else, or an id past the end
of the job's log (no event we sent has it), is a 400. A client that saw a finished job's last event
gets 204 No Content: nothing more will come, and 204 is how SSE tells a client to stop reconnecting.
"""

from __future__ import annotations

import json
import time
from typing import NamedTuple

import httpx
import pytest
import redis

from tests import sse

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4,
        "temperature": 0}
# A generous bound for an answer that must come at once: a stream still open after it (keep-alives
# and nothing else) is the bug these tests catch, and must fail them rather than hang them.
ANSWER_WITHIN = 20.0


@pytest.fixture(scope="module")
def service(stack):
    """The session's shared service (conftest's `stack`)."""
    return stack


@pytest.fixture(scope="module")
def finished_job(service):
    """A real chat job, run to its end, and the ids of its log."""
    response = httpx.post(service.base_url + "/v1/chat/completions", json=CHAT, timeout=180)
    assert response.status_code == 200, response.text
    job_id = response.headers["x-localq-job-id"]
    store = redis.Redis.from_url(service.redis.url, decode_responses=True)
    ids = [entry_id for entry_id, _ in store.xrange(f"localq:job:{job_id}:events")]
    store.close()
    return job_id, ids


class Answer(NamedTuple):
    status_code: int
    text: str


def events(service, job_id: str, last_event_id: str) -> Answer:
    """The whole answer to `GET /v1/jobs/{id}/events`, failing if it is still streaming after ANSWER_WITHIN."""
    deadline = time.monotonic() + ANSWER_WITHIN
    with httpx.stream("GET", f"{service.base_url}/v1/jobs/{job_id}/events",
                      headers={"Last-Event-ID": last_event_id}, timeout=ANSWER_WITHIN) as response:
        body = b""
        for chunk in response.iter_bytes():
            body += chunk
            assert time.monotonic() < deadline, f"still streaming after {ANSWER_WITHIN} s: {body[-200:]!r}"
        return Answer(response.status_code, body.decode())


def assert_invalid(response: Answer) -> None:
    assert response.status_code == 400, response.text
    error = json.loads(response.text)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_value"
    assert error["param"] == "Last-Event-ID"


@pytest.mark.parametrize("value", [
    "99999999999999999999999-0",  # the reproduction: past 64 bits
    "18446744073709551616-0",  # 2**64
    "0-18446744073709551616",
    "1-2-3", "-1-0", "1-", "abc", "1.5-0", "+1-0",
])
def test_malformed_or_out_of_range_ids_are_rejected(service, finished_job, value):
    assert_invalid(events(service, finished_job[0], value))


def test_an_id_past_the_end_of_the_log_is_rejected_at_once(service, finished_job):
    job_id, ids = finished_job
    last_ms, _ = map(int, ids[-1].split("-"))
    for value in (f"{last_ms + 10**9}-0", "18446744073709551615-18446744073709551615"):
        assert_invalid(events(service, job_id, value))


def test_the_last_event_of_a_finished_job_ends_the_stream_at_once(service, finished_job):
    job_id, ids = finished_job
    response = events(service, job_id, ids[-1])
    assert response.status_code == 204 and response.text == ""


def test_resuming_from_an_earlier_event_still_streams_the_rest(service, finished_job):
    job_id, ids = finished_job
    response = events(service, job_id, ids[-2])
    assert response.status_code == 200
    blocks = sse.blocks(response.text)
    assert len(blocks) == 1 and blocks[0].startswith(f"id: {ids[-1]}\nevent: result\n")
