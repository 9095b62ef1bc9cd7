"""Large results (a picture's base64, a long transcript) live in the file store; Redis keeps a
reference in the job's record and its `result` event, and every reader gets the result back whole."""

from __future__ import annotations

import json
import os
import time

import pytest
import redis

from ops.redis_server import RedisServer
from store.events import EventLog, events_key
from store.jobs import JobStore, final_event, job_key, public_view
from store.spill import Spill, purge_older


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with RedisServer(tmp_path_factory.mktemp("spill"), appendonly=False) as server:
        yield redis.Redis.from_url(server.url, decode_responses=True)


def big_result() -> dict:
    return {"created": 1, "data": [{"b64_json": os.urandom(150_000).hex()}], "usage": {"total_tokens": 0}}


def test_a_large_result_is_a_file_and_a_reference(client, tmp_path):
    spill = Spill(tmp_path, threshold=64 * 1024)
    jobs, events = JobStore(client, 60, spill), EventLog(client, 60, 10, spill)
    jobs.create("job_big", kind="image", model="m", queue="cpu", priority="interactive", deadline=time.time() + 60,
                attached=True)
    result = big_result()
    pipe = client.pipeline(transaction=False)
    jobs.finish("job_big", "succeeded", result=result, pipe=pipe)
    events.append_many("job_big", [("result", result)], pipe=pipe)
    pipe.execute()

    assert client.hget(job_key("job_big"), "result") == '{"$file":"job_big.json"}'
    assert client.memory_usage(job_key("job_big")) < 4096 and client.memory_usage(events_key("job_big")) < 4096
    assert [path.name for path in tmp_path.iterdir()] == ["job_big.json"], "one file for the record and the event"
    record = jobs.get("job_big")
    assert json.loads(record["result"]) == result
    assert public_view(record)["result"] == result
    assert final_event(record).data == result
    assert events.all("job_big")[-1].data == result and events.last("job_big").data == result
    assert events.read("job_big")[-1].data == result


def test_a_small_result_stays_in_redis(client, tmp_path):
    spill = Spill(tmp_path)
    jobs = JobStore(client, 60, spill)
    jobs.finish("job_small", "succeeded", result={"ok": True})
    assert client.hget(job_key("job_small"), "result") == '{"ok":true}' and not list(tmp_path.iterdir())


def test_a_result_whose_file_is_gone_reads_as_null(client, tmp_path):
    spill = Spill(tmp_path, threshold=10)
    jobs = JobStore(client, 60, spill)
    jobs.finish("job_gone", "succeeded", result={"text": "x" * 100})
    past = time.time() - 7200
    os.utime(tmp_path / "job_gone.json", (past, past))
    assert purge_older(tmp_path, 3600) == 1
    assert jobs.get("job_gone")["result"] == "null"
    assert spill.back('{"$file":"../etc/passwd"}') == '{"$file":"../etc/passwd"}', "only a plain name is a reference"
