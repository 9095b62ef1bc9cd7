"""Coalesced token events (issue 12): the jobs a worker runs at once share one round trip to Redis
per send, and the API writes everything one read of a job's log returns in one write.

On a real Redis server; Redis is paused (SIGSTOP) to hold a send in flight while other jobs emit,
so that what the next send carries does not depend on timing.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager

import pytest
import redis
from redis.connection import Connection

from api.sse import DONE, KEEPALIVE, audio_bytes, completion_frames, frame, job_frames, relay
from store.events import EventLog, events_key
from tasks import publisher as publishing
from tasks.publisher import BackgroundPublisher
from tasks.runtime import connect
from tasks.settings import QueueSettings
from tests.service import wait_until


class CountingConnection(Connection):
    """A real connection that counts the requests it writes (one per round trip, pipelines included)."""

    sends = 0
    lock = threading.Lock()

    def send_packed_command(self, command, check_health=True):
        with CountingConnection.lock:
            CountingConnection.sends += 1
        return super().send_packed_command(command, check_health)


@pytest.fixture
def log(redis_server, redis_db):
    client = redis.Redis.from_url(redis_server.url, decode_responses=True, connection_class=CountingConnection)
    client.ping()  # connected before anything is counted: a connection's set-up sends requests of its own
    CountingConnection.sends = 0
    yield EventLog(client, ttl=60)
    client.close()


@contextmanager
def paused(server):
    """Redis stops answering (what is sent meanwhile waits in its socket) until the block ends."""
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.process.pid, signal.SIGCONT)


def deltas(log: EventLog, job_id: str) -> list:
    return [event.data["i"] for event in log.all(job_id) if event.type == "delta"]


def test_the_jobs_running_at_once_share_one_round_trip(redis_server, log):
    """Each running job had its own publishing thread: N jobs each given a token made N round trips."""
    publishers = [BackgroundPublisher(log, f"job{n}") for n in range(9)]
    with paused(redis_server):
        publishers[0].emit("delta", {"i": 0})
        wait_until(lambda: CountingConnection.sends, 10, "the first send", interval=0.01)
        time.sleep(0.2)  # lets the sender reach its wait for the reply (it may only send less otherwise)
        before = CountingConnection.sends
        for publisher in publishers[1:]:  # one engine step: a token for every other running job
            publisher.emit("delta", {"i": 0})
            publisher.emit("delta", {"i": 1})
        time.sleep(0.2)  # time for any other thread to send (it would wait for Redis too)
        sent_while_paused = CountingConnection.sends - before
    for publisher in publishers:
        publisher.close()
    assert sent_while_paused == 0  # everything emitted meanwhile waits for the send in flight
    assert CountingConnection.sends - before == 1  # then goes in one round trip
    assert [deltas(log, f"job{n}") for n in range(9)] == [[0]] + [[0, 1]] * 8


def test_each_job_keeps_its_order_and_closing_one_waits_for_its_own_events_only(log):
    stop = threading.Event()
    failures = []

    def busy(job_id: str):  # a job that goes on generating while another one finishes
        publisher, i = BackgroundPublisher(log, job_id), 0
        while not stop.is_set():
            publisher.emit("delta", {"i": i})
            i += 1
            time.sleep(0.0005)
        try:
            publisher.close()
        except Exception as err:
            failures.append(err)

    others = [threading.Thread(target=busy, args=(f"busy{n}",)) for n in range(4)]
    for thread in others:
        thread.start()
    wait_until(lambda: all(log.last(f"busy{n}") for n in range(4)), 10, "the busy jobs' first events", interval=0.01)

    def finishing():
        publisher = BackgroundPublisher(log, "short", skip_deltas=1)
        for i in range(300):
            publisher.emit("delta", {"i": i})
        publisher.emit("result", {"n": 300})
        publisher.close()  # must not wait for the busy jobs, which never stop emitting while it runs
        assert publisher.result == {"n": 300}

    closer = threading.Thread(target=finishing)
    closer.start()
    closer.join(60)
    stop.set()
    finished = not closer.is_alive()
    for thread in others:
        thread.join(30)
    assert finished, "closing one job waited for the others' events"
    assert not failures
    assert deltas(log, "short") == list(range(1, 300))  # the result is the task's to publish
    for n in range(4):
        sent = deltas(log, f"busy{n}")
        assert sent == list(range(len(sent))) and sent


def test_one_jobs_failure_neither_loses_nor_fails_another_jobs_events(redis_server, log):
    log.client.set(events_key("broken"), "not a stream")  # its XADD fails: WRONGTYPE
    warm, good, broken, unencodable = (BackgroundPublisher(log, job_id) for job_id in
                                       ("warm", "good", "broken", "unencodable"))
    with paused(redis_server):  # all but the first event go in one round trip
        warm.emit("delta", {"i": 0})
        wait_until(lambda: CountingConnection.sends, 10, "the first send", interval=0.01)
        for i in range(3):
            good.emit("delta", {"i": i})
            broken.emit("delta", {"i": i})
            unencodable.emit("delta", {"i": i} if i != 1 else {"i": object()})
    for publisher in (warm, good):
        publisher.close()
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        broken.close()
    with pytest.raises(TypeError):
        unencodable.close()
    assert deltas(log, "good") == [0, 1, 2] and deltas(log, "warm") == [0]
    assert deltas(log, "unencodable") == []  # that round's events were one batch: none went out
    later = BackgroundPublisher(log, "good")  # the sender carries on for later jobs
    later.emit("delta", {"i": 3})
    later.close()
    assert deltas(log, "good") == [0, 1, 2, 3]


@pytest.fixture
def interval():
    """The process's sender holds later tokens for this long (restored after)."""
    publishing.configure(1.0)
    yield 1.0
    publishing.configure(0.0)


def output(i: int) -> dict:
    return {"choices": [{"index": 0, "delta": {"content": f"t{i}"}}], "i": i}


def test_later_tokens_wait_for_the_interval_and_go_together(redis_server, log, interval):
    """One send per token woke the sender, Redis, the API and the client at every token; the
    stream interval sends what came meanwhile in one round trip, but never holds the first output."""
    publisher = BackgroundPublisher(log, "held")
    log = EventLog(redis.Redis.from_url(redis_server.url, decode_responses=True), ttl=60)  # reads not counted
    publisher.emit("delta", {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}], "i": -1})
    publisher.emit("delta", output(0))  # the first output: urgent, whatever was just sent
    wait_until(lambda: deltas(log, "held") == [-1, 0], 2, "the first output, sent at once", interval=0.005)
    before = CountingConnection.sends
    for i in range(1, 6):
        publisher.emit("delta", output(i))
    time.sleep(interval / 3)
    assert deltas(log, "held") == [-1, 0]  # held: the interval has not passed
    publisher.emit("progress", {"step": 1})  # not a delta: goes now, and takes what waited with it
    wait_until(lambda: deltas(log, "held") == [-1, 0, 1, 2, 3, 4, 5], 2, "the held tokens", interval=0.005)
    assert CountingConnection.sends - before == 1
    publisher.emit("delta", output(6))
    started = time.monotonic()
    publisher.close()  # a closing job's last events go at once
    assert time.monotonic() - started < interval
    assert deltas(log, "held")[-1] == 6


def test_a_held_token_goes_with_the_next_event_after_the_interval(log, interval):
    publisher = BackgroundPublisher(log, "steady")
    publisher.emit("delta", output(0))
    wait_until(lambda: deltas(log, "steady") == [0], 2, "the first output", interval=0.005)
    publisher.emit("delta", output(1))
    time.sleep(interval * 1.2)  # past the interval: the next event (an engine step's) takes it along
    assert deltas(log, "steady") == [0]
    publisher.emit("delta", output(2))
    wait_until(lambda: deltas(log, "steady") == [0, 1, 2], 2, "the tokens after the interval", interval=0.005)
    publisher.emit("delta", output(3))  # a producer slower than that: it waits two intervals at most
    wait_until(lambda: deltas(log, "steady") == [0, 1, 2, 3], interval * 3, "the lone token", interval=0.01)
    publisher.close()


def test_a_send_reads_its_jobs_cancel_flag(log):
    """A streaming job's cancel check asked Redis on its own every 50 ms; the flag now comes back
    with the job's events, so a job that streams needs no round trip of its own to ask."""
    publisher = BackgroundPublisher(log, "watched", cancel_key="watched:cancel", cancel_every=0.0)
    assert publisher.cancel_seen(10) is None  # nothing read yet: the job must ask itself
    publisher.emit("delta", output(0))
    publisher.close()
    assert publisher.cancel_seen(10) is False
    log.client.set("watched:cancel", "1")
    publisher.emit("delta", output(1))
    publisher.close()
    assert publisher.cancel_seen(10) is True
    time.sleep(0.05)
    assert publisher.cancel_seen(0.01) is None  # too old to be trusted


# --- the API side: one write per read of the log ---------------------------------------------


@pytest.fixture
def rt(redis_server, redis_db):
    runtime = connect(QueueSettings(redis_url=redis_server.url))
    yield runtime
    runtime.redis.close()


def new_job(rt, job_id: str, events: list[tuple[str, object]]) -> list[str]:
    rt.jobs.create(job_id, kind="chat", model="m", queue="cpu", priority="interactive",
                   deadline=time.time() + 60, attached=True)
    return rt.events.append_many(job_id, events)


def relayed(rt, job_id: str, render, **options) -> list:
    return list(relay(rt, job_id, render, keepalive=1.0, deadline=None, grace=0, **options))


def test_everything_one_read_returns_is_written_in_one_chunk_with_the_same_frames(rt):
    """The relay wrote one chunk (one socket write) per event."""
    deltas_ = [{"choices": [{"delta": {"content": f"t{i}"}}]} for i in range(5)]
    ids = new_job(rt, "job_chat", [("status", {"status": "running"})] + [("delta", d) for d in deltas_]
                  + [("result", {"object": "chat.completion"})])
    chunks = relayed(rt, "job_chat", completion_frames)
    per_event = "".join(frame(event.raw, event_id=event.id) for event in rt.events.all("job_chat")[1:-1])
    assert chunks == [KEEPALIVE, per_event + frame("[DONE]", event_id=ids[-1])]

    resumed = relayed(rt, "job_chat", job_frames, after=ids[2])  # Last-Event-ID resume: the rest, framed by type
    rest = rt.events.all("job_chat")[3:]
    assert resumed == [KEEPALIVE, "".join(frame(e.raw, event_id=e.id, event=e.type) for e in rest)]


def test_an_error_and_the_done_after_it_are_one_chunk(rt):
    error = {"error": {"message": "boom", "type": "server_error", "param": None, "code": None}, "status": 500}
    ids = new_job(rt, "job_err", [("delta", {"i": 0}), ("error", error), ("delta", {"i": "never read"})])
    chunks = relayed(rt, "job_err", completion_frames)
    assert chunks == [KEEPALIVE, frame('{"i":0}', event_id=ids[0]) + frame({"error": error["error"]}, event_id=ids[1])
                      + DONE]


def test_audio_pieces_read_together_are_one_chunk_of_bytes(rt):
    import base64

    pieces = [base64.b64encode(bytes([n]) * 3).decode() for n in range(3)]
    new_job(rt, "job_audio", [("delta", {"type": "speech.audio.delta", "audio": p}) for p in pieces]
            + [("result", {})])
    chunks = relayed(rt, "job_audio", audio_bytes, keepalive_frame=None)
    assert chunks == [b"\x00" * 3 + b"\x01" * 3 + b"\x02" * 3]
