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
from store.jobs import (CANCELLED_BEFORE_START, RECENT_LIMIT, Delivery, JobStore, Page, UnknownCursor,
                        final_event, public_view, recent_key)
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


def test_a_finished_jobs_log_is_kept_only_for_the_resume_window(client):
    """Deltas keep the log for the job TTL; the terminal event cuts it to the resume window."""
    log = EventLog(client, ttl=600, resume_window=30)
    log.append("j-window", "delta", {"i": 1})
    assert 590 < client.ttl(events_key("j-window")) <= 600
    log.append_many("j-window", [("delta", {"i": 2}), ("result", {"ok": True})])
    assert 0 < client.ttl(events_key("j-window")) <= 30
    assert 0 < client.ttl(events_key("j-window") + ":last-batch") <= 30
    assert EventLog(client, ttl=600).append("j-no-window", "result", {}) and client.ttl(events_key("j-no-window")) > 590


@pytest.mark.parametrize("status, record, expected", [
    ("succeeded", {"result": '{"object":"chat.completion","id":"x"}'}, ("result", {"object": "chat.completion", "id": "x"})),
    ("failed", {"error": '{"message":"boom","type":"server_error","param":null,"code":"x"}'},
     ("error", {"error": {"message": "boom", "type": "server_error", "param": None, "code": "x"}})),
    ("expired", {}, ("error", {"error": {"message": "The job ended as expired.", "type": "server_error",
                                         "param": None, "code": "expired"}})),
    ("cancelled", {}, ("cancelled", {"reason": "cancelled"})),
])
def test_a_finished_jobs_record_stands_in_for_its_log(status, record, expected):
    event = final_event({"status": status, "finished_at": "1700000000.123456", **record})
    assert (event.type, event.data) == expected and event.terminal
    assert event.id == "1700000000123-0" and valid_event_id(event.id)
    assert final_event({"status": "running"}) is None and final_event(None) is None


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
    assert Delivery.of(pipe.execute()[0]) == Delivery(count=1, cancel_flag=True, ended=None)
    assert store.get("job_x")["worker"] == "w:1" and store.get("job_x")["status"] == "running"
    store.finish("job_x", "succeeded", result={"ok": True})
    view = public_view(store.get("job_x"))
    assert view["status"] == "succeeded" and view["result"] == {"ok": True} and view["type"] == "chat.completion"
    assert view["created_at"] <= view["started_at"] <= view["finished_at"]
    assert "result" not in public_view(store.get("job_x"), result=False)
    assert store.attach("job_x") == 1 and store.attach("job_x") == 2 and store.detach("job_x") == 1
    assert store.readers("job_x") == 1 and store.detach("job_x") == 0
    assert not store.client.exists("localq:job:job_x:readers"), "no key kept for a job nobody reads"
    assert store.get("job_missing") is None


def _queued(store: JobStore, job_id: str, project: str = "", kind: str = "chat", model: str = "m") -> None:
    store.create(job_id, kind=kind, model=model, queue="cpu", priority="interactive", deadline=time.time() + 60,
                 attached=True, project=project)


def test_a_delivery_of_a_job_that_already_ended_changes_nothing(client, log):
    client.flushall()
    store = JobStore(client, ttl=60)
    _queued(store, "job_done")
    pipe = client.pipeline()
    store.begin_delivery("job_done", "w:1", pipe, status_event=True)
    assert Delivery.of(pipe.execute()[0]) == Delivery(count=1, cancel_flag=False, ended=None)
    assert [(e.type, e.data) for e in log.all("job_done")] == [("status", {"status": "running"})]
    store.finish("job_done", "succeeded", result={"ok": True})
    pipe = client.pipeline()
    store.begin_delivery("job_done", "w:2", pipe, status_event=True)  # its message again (a lost ack)
    assert Delivery.of(pipe.execute()[0]) == Delivery(count=0, cancel_flag=False, ended="succeeded")
    record = store.get("job_done")
    assert record["status"] == "succeeded" and record["worker"] == "w:1" and record["attempts"] == "1"
    assert len(log.all("job_done")) == 1, "no event after the job's end"


def test_a_job_ends_unstarted_once_whoever_ends_it(client, log):
    client.flushall()
    store = JobStore(client, ttl=60)
    _queued(store, "job_q")
    store.request_cancel("job_q")
    assert store.end_unstarted("job_q") is True  # the API's cancel: nobody had taken it
    assert store.end_unstarted("job_q") is False
    record = store.get("job_q")
    assert record["status"] == "cancelled" and record["finished_at"] and "started_at" not in record
    assert [(e.type, e.data) for e in log.all("job_q")] == [("cancelled", CANCELLED_BEFORE_START)]
    pipe = client.pipeline()
    store.begin_delivery("job_q", "w:1", pipe, status_event=True)  # its message, taken later
    assert Delivery.of(pipe.execute()[0]).ended == "cancelled"
    assert store.end_unstarted("job_q", delivered=True) is False
    assert len(log.all("job_q")) == 1 and store.get("job_q")["status"] == "cancelled"

    _queued(store, "job_r")  # a worker takes it first: the API's cancel leaves it to that worker
    store.request_cancel("job_r")
    pipe = client.pipeline()
    store.begin_delivery("job_r", "w:1", pipe)
    assert Delivery.of(pipe.execute()[0]) == Delivery(count=1, cancel_flag=True, ended=None)
    assert store.end_unstarted("job_r") is False
    assert store.end_unstarted("job_r", delivered=True) is True
    assert [(e.type, e.data) for e in log.all("job_r")] == [("cancelled", CANCELLED_BEFORE_START)]
    assert store.end_unstarted("missing") is False and store.get("missing") is None


def test_recent_jobs_newest_first_per_project_paged_and_bounded(client):
    client.flushall()
    store = JobStore(client, ttl=60)
    for i in range(12):
        _queued(store, f"job_{i:02d}", project="alpha" if i % 3 else "beta", kind="chat" if i % 2 else "embedding",
                model=f"m{i % 2}")
    everyone = [f"job_{i:02d}" for i in reversed(range(12))]
    alpha = [job_id for job_id in everyone if int(job_id[4:]) % 3]
    page = store.recent(None, limit=20)
    assert [r["id"] for r in page.records] == everyone and not page.has_more
    assert "result" not in page.records[0] and page.records[0]["project"] == "alpha"
    assert [r["id"] for r in store.recent("alpha", limit=20).records] == alpha
    first = store.recent("alpha", limit=3)
    assert [r["id"] for r in first.records] == alpha[:3] and first.has_more
    rest = store.recent("alpha", limit=20, after=alpha[2])
    assert [r["id"] for r in rest.records] == alpha[3:] and not rest.has_more
    with pytest.raises(UnknownCursor):
        store.recent("beta", limit=5, after=alpha[0])  # another project's job is no cursor there
    chats = store.recent(None, limit=20, type_="chat.completion")
    assert [r["id"] for r in chats.records] == [j for j in everyone if int(j[4:]) % 2]
    assert [r["id"] for r in store.recent(None, limit=20, model="m0", status="queued").records] == \
        [j for j in everyone if int(j[4:]) % 2 == 0]
    assert store.recent(None, limit=20, status="failed") == Page([], False)

    # the scan bound: an empty page that says where to go on, and goes on
    bounded = store.recent(None, limit=5, status="queued", model="m0", scan=1)
    assert bounded.records == [] and bounded.has_more and bounded.resume_after == "job_11"
    bounded = store.recent(None, limit=5, status="queued", model="m0", scan=1, after=bounded.resume_after)
    assert [r["id"] for r in bounded.records] == ["job_10"] and bounded.has_more and bounded.resume_after is None
    assert [r["id"] for r in store.recent(None, limit=5, model="m0", scan=4).records] == ["job_10", "job_08"]
    assert not store.recent(None, limit=6, model="m0", scan=12).has_more, "nothing is left below"

    # an expired record is skipped and its entry dropped
    client.delete("localq:job:job_10")
    assert [r["id"] for r in store.recent(None, limit=3).records] == ["job_11", "job_09", "job_08"]
    assert client.zscore(recent_key(), "job_10") is None and client.zscore(recent_key("alpha"), "job_10")

    # each index keeps its newest RECENT_LIMIT ids and expires with the jobs
    assert 0 < client.ttl(recent_key()) <= 60 and 0 < client.ttl(recent_key("beta")) <= 60
    pipe = client.pipeline(transaction=False)
    for i in range(RECENT_LIMIT + 5):
        pipe.zadd(recent_key("gamma"), {f"old_{i}": i})
    pipe.execute()
    _queued(store, "job_new", project="gamma")
    assert client.zcard(recent_key("gamma")) == RECENT_LIMIT
    assert client.zrevrange(recent_key("gamma"), 0, 0) == ["job_new"]


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
