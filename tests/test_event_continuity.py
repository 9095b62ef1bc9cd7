"""A job's log numbers its entries; a Redis failover that took entries back is marked, and a reader
that missed them ends with an in-stream error instead of going on without them.

What a failover leaves is made here on one real Redis: the log's newest entries removed (XDEL), as
the promoted replica never had them, while the writer still knows the position it wrote last.
"""

from __future__ import annotations

import json

import pytest
import redis

from api.sse import followed_reads
from ops.redis_server import RedisServer
from store.events import Continuity, EventLog, events_key, parse_event_id
from tasks.runtime import connect
from tasks.settings import QueueSettings


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with RedisServer(tmp_path_factory.mktemp("continuity"), appendonly=False) as running:
        yield running


@pytest.fixture()
def log(server):
    client = redis.Redis.from_url(server.url, decode_responses=True)
    client.flushdb()
    return EventLog(client, ttl=60)


def delta(text: str) -> tuple[str, dict]:
    return "delta", {"choices": [{"index": 0, "delta": {"content": text}}]}


def test_entries_carry_their_position_and_the_writer_learns_the_last(log):
    ids, last = log.append_after("j", [delta("a"), delta("b")], None)
    assert last == 2 and len(ids) == 2
    log.client.xadd(events_key("j"), {"type": "status", "data": "{}"})  # a writer that numbers nothing
    _, last = log.append_after("j", [delta("c")], last)
    assert last == 4, "positions count every entry of the log"
    assert [event.n for event in log.all("j")] == [1, 2, None, 4]
    assert log.append_many("j", [delta("d")]) and log.all("j")[-1].n == 5


def test_a_log_that_lost_entries_is_marked_by_its_writer(log):
    _, last = log.append_after("j", [delta("a"), delta("b"), delta("c")], None)
    newest = log.all("j")[-1]
    log.client.xdel(events_key("j"), newest.id)  # the failover took "c" back
    _, last = log.append_after("j", [delta("d")], last)
    events = log.all("j")
    assert [event.type for event in events] == ["delta", "delta", "lost", "delta"]
    assert events[2].data == {"after": 2, "through": 3} and events[2].n == 3 and last == 4


def test_continuity_of_readers_who_saw_the_lost_entries_or_not(log):
    _, last = log.append_after("j", [delta("a"), delta("b"), delta("c")], None)
    before = log.all("j")
    log.client.xdel(events_key("j"), before[-1].id)
    log.append_after("j", [delta("d"), ("result", {"ok": True})], last)
    after = log.all("j")

    caught_up = Continuity()
    assert caught_up.check(before) == (before, False)  # it read "c" before the failover
    passed, gap = caught_up.check([event for event in after if parse_event_id(event.id) > parse_event_id(before[-1].id)])
    assert not gap and [event.type for event in passed] == ["delta", "result"], "the stream goes on"

    behind = Continuity()
    assert behind.check(before[:2]) == (before[:2], False)
    passed, gap = behind.check(after[2:])
    assert gap and passed == [], "it never got 'c': it must not go on as if it had"

    replay = Continuity()
    passed, gap = replay.check(after)
    assert gap and [event.data["choices"][0]["delta"]["content"] for event in passed] == ["a", "b"]

    resumed = Continuity()  # after a Last-Event-ID: it cannot know what the client had
    assert resumed.check(after[2:])[1]


def test_a_skipped_position_is_a_gap_too(log):
    log.append_after("j", [delta("a"), delta("b"), delta("c")], None)
    events = log.all("j")
    assert Continuity().check([events[0], events[2]])[1]


def test_the_relay_ends_with_an_events_lost_error(server, log):
    rt = connect(QueueSettings(redis_url=server.url))
    _, last = log.append_after("job_x", [delta("a"), delta("b")], None)
    log.client.xdel(events_key("job_x"), log.all("job_x")[-1].id)
    log.append_after("job_x", [delta("c"), ("result", {})], last)
    reads = [events for events in followed_reads(rt, "job_x", after="0-0", keepalive=0.1, deadline=None)
             if events is not None]
    relayed = [event for events in reads for event in events]
    assert [event.type for event in relayed] == ["delta", "error"]
    error = json.loads(relayed[-1].raw)["error"]
    assert error["code"] == "events_lost" and error["type"] == "server_error"
    assert "GET /v1/jobs/job_x" in error["message"]
