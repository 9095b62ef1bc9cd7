"""The job event channel and job records on a real Redis server."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import redis

from ops.redis_server import RedisServer
from store.events import EventLog, events_key, parse_event_id, ride_over, valid_event_id
from store.jobs import JobStore, public_view
from tasks.publisher import BackgroundPublisher
from tasks.runtime import connect
from tasks.settings import QueueSettings
from tests.service import wait_until


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with RedisServer(tmp_path_factory.mktemp("redis")) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return redis.Redis.from_url(server.url, decode_responses=True)


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


def test_event_ids_are_two_unsigned_64_bit_integers():
    assert parse_event_id("1700000000000-3") == (1700000000000, 3)
    assert parse_event_id("18446744073709551615-18446744073709551615") == (2**64 - 1, 2**64 - 1)
    for bad in ("99999999999999999999999-0", "18446744073709551616-0", "0-18446744073709551616", "1-2-3",
                "1", "1-", "-1-0", "+1-0", "1-0\n", "\u0661-0", "1.0-0", ""):
        assert parse_event_id(bad) is None and not valid_event_id(bad), bad
    assert parse_event_id("2-0") > parse_event_id("1-99")  # ordered as Redis orders entries


def test_the_last_event_of_a_log(log):
    assert log.last("j6") is None
    log.append("j6", "delta", {"i": 0})
    last_id = log.append("j6", "result", {"done": True})
    last = log.last("j6")
    assert last.id == last_id and last.terminal and last.data == {"done": True}


def test_events_queued_on_a_pipeline_are_added_when_it_runs(client, log):
    pipe = client.pipeline(transaction=False)
    assert log.append_many("j10", [("status", {"status": "running"})], pipe=pipe) == []
    assert log.all("j10") == []
    pipe.execute()
    assert [e.type for e in log.all("j10")] == ["status"] and 0 < client.ttl(events_key("j10")) <= 60


def test_a_batch_sent_again_after_a_lost_reply_is_added_once(server):
    """A worker's client retries a command whose reply a stalled Redis never sent (socket timeout):
    the first try is executed all the same once Redis goes on, and the retry must add nothing."""
    log = EventLog(connect(QueueSettings(redis_url=server.url), ride_over=True).redis, ttl=60)
    log.append("j7", "delta", {"i": 0})
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        writer = threading.Thread(target=log.append_many, args=("j7", [("delta", {"i": 1}), ("delta", {"i": 2})]))
        writer.start()
        time.sleep(6)  # past the client's 5 s socket timeout: the batch is sent again
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
    writer.join(30)
    assert [e.data["i"] for e in log.all("j7")] == [0, 1, 2]


def test_a_reader_rides_over_a_redis_restart(server):
    log = EventLog(redis.Redis.from_url(server.url, decode_responses=True), ttl=60)
    log.append("j8", "delta", {"i": 0})
    seen = []

    def reader():
        for event in log.follow("j8", block_ms=50, ride_over=30):
            seen.append(event)

    thread = threading.Thread(target=reader)
    thread.start()
    wait_until(lambda: seen, 5, "the reader to read the first event", interval=0.05)
    server.stop()
    time.sleep(1)
    server.start()
    log.append("j8", "result", {})
    thread.join(30)
    assert not thread.is_alive()
    assert [e.type for e in seen if e] == ["delta", "result"]


def test_a_reader_gives_up_once_its_ride_over_is_spent(tmp_path):
    with RedisServer(tmp_path / "redis") as gone:
        log = EventLog(redis.Redis.from_url(gone.url, decode_responses=True), ttl=60)
    ticks = []
    with pytest.raises(redis.ConnectionError):
        for event in log.follow("j9", block_ms=50, ride_over=0.5):
            ticks.append(event)
    assert ticks and set(ticks) == {None}  # quiet ticks while it tried again
    with pytest.raises(redis.ConnectionError):
        ride_over(lambda: log.last("j9"), 0.3)
