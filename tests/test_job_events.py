"""The job event channel and job records on a real Redis server."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from ops.redis_server import RedisServer
from tasks.events import EventLog, events_key, valid_event_id
from tasks.jobs import JobStore, public_view
from tasks.publisher import BackgroundPublisher


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield redis.Redis.from_url(server.url, decode_responses=True)


@pytest.fixture
def log(client):
    return EventLog(client, ttl=60)


def test_events_written_before_anyone_listens_are_all_read(log):
    for i in range(5):
        log.append("j1", "delta", {"i": i})
    log.append("j1", "result", {"done": True})
    events = list(log.follow("j1", block_ms=100))
    assert [e.type for e in events] == ["delta"] * 5 + ["result"]
    assert [e.data["i"] for e in events[:5]] == list(range(5))


def test_resuming_after_an_id_gives_no_gap_and_no_duplicate(log):
    ids = [log.append("j2", "delta", {"i": i}) for i in range(10)]
    log.append("j2", "result", {})
    resumed = [e for e in log.follow("j2", after=ids[3], block_ms=100) if e]
    assert [e.data.get("i") for e in resumed[:-1]] == list(range(4, 10))
    assert all(valid_event_id(e.id) for e in resumed)


def test_a_reader_blocks_until_events_arrive_and_ticks_while_quiet(log):
    seen = []

    def reader():
        for event in log.follow("j3", block_ms=50):
            seen.append(event)

    thread = threading.Thread(target=reader)
    thread.start()
    time.sleep(0.3)
    log.append("j3", "delta", {"x": 1})
    log.append("j3", "error", {"status": 500})
    thread.join(5)
    assert not thread.is_alive()
    assert None in seen  # keep-alive ticks while nothing happened
    assert [e.type for e in seen if e] == ["delta", "error"]


def test_event_logs_expire(client):
    short = EventLog(client, ttl=5)
    short.append("j4", "delta", {})
    assert 0 < client.ttl(events_key("j4")) <= 5


def test_background_publisher_keeps_order_skips_replayed_deltas_and_holds_the_result(log):
    publisher = BackgroundPublisher(log, "j5", skip_deltas=2)
    for i in range(200):
        publisher.emit("delta", {"i": i})
    publisher.emit("result", {"n": 200})
    publisher.close()
    events = log.all("j5")
    assert [e.data["i"] for e in events if e.type == "delta"] == list(range(2, 200))
    assert publisher.result == {"n": 200} and all(e.type == "delta" for e in events)  # result is the task's to send


def test_job_store_lifecycle(client):
    store = JobStore(client, ttl=60)
    store.create("job_x", kind="chat", model="m", queue="cpu", priority="interactive", deadline=time.time() + 5,
                 attached=True)
    assert not store.cancel_requested("job_x")
    store.request_cancel("job_x")
    assert store.cancel_requested("job_x")
    pipe = client.pipeline()
    store.begin_delivery("job_x", "w:1", pipe)
    deliveries, cancel_flag = pipe.execute()[:2]
    assert deliveries == 1 and cancel_flag == 1 and store.get("job_x")["worker"] == "w:1"
    store.finish("job_x", "succeeded", result={"ok": True})
    view = public_view(store.get("job_x"))
    assert view["status"] == "succeeded" and view["result"] == {"ok": True} and view["type"] == "chat.completion"
    assert view["created_at"] <= view["started_at"] <= view["finished_at"]
    assert store.attach("job_x") == 1 and store.detach("job_x") == 0
    assert store.get("job_missing") is None
