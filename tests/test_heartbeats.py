"""Worker heartbeats on a real Redis: publish, expiry by TTL, removal, and the cached view."""

from __future__ import annotations

import time

import pytest

from store import heartbeats
from tests.service import wait_until
@pytest.fixture
def client(redis_db):
    return redis_db


def test_published_workers_are_live_until_their_heartbeat_expires(client, monkeypatch):
    heartbeats.publish(client, {"id": "b@h", "device": "gpu"}, interval=0.1)
    heartbeats.publish(client, {"id": "a@h", "device": "cpu"}, interval=10)
    live = heartbeats.live_workers(client)
    assert [w["id"] for w in live] == ["a@h", "b@h"]
    assert all(abs(w["last_heartbeat"] - time.time()) < 5 for w in live)
    time.sleep(3.2)  # b's TTL is three intervals, at least 3 s
    assert [w["id"] for w in heartbeats.live_workers(client)] == ["a@h"]
    heartbeats.remove(client, "a@h")
    assert heartbeats.live_workers(client) == []
    assert client.zcard(heartbeats.INDEX) == 1  # b's index entry stays until FORGET_AFTER


def test_the_heartbeat_thread_beats_when_poked_and_removes_itself_on_stop(client):
    state = {"job": None}
    beat = heartbeats.Heartbeat(client, lambda: {"id": "w@h", "current_job": state["job"]}, interval=30)
    beat.start()
    wait_until(lambda: heartbeats.live_workers(client), 5, "the first heartbeat", interval=0.02)
    assert heartbeats.live_workers(client)[0]["current_job"] is None
    state["job"] = "job-1"
    beat.poke()  # well before the 30 s interval
    wait_until(lambda: heartbeats.live_workers(client)[0]["current_job"] == "job-1", 5, "the poked heartbeat",
               interval=0.02)
    assert heartbeats.live_workers(client)[0]["current_job"] == "job-1"
    beat.stop()
    assert heartbeats.live_workers(client) == []
    assert not beat.is_alive()


def test_the_cached_view_reads_redis_at_most_once_per_max_age(client):
    view = heartbeats.CachedWorkers(max_age=60)
    assert view.get(client) == []
    heartbeats.publish(client, {"id": "w@h"}, interval=10)
    assert view.get(client) == []  # still the cached answer
    assert [w["id"] for w in heartbeats.CachedWorkers(max_age=0).get(client)] == ["w@h"]


def test_a_stale_view_answers_at_once_and_refreshes_in_the_background(client):
    """The first request after a pause must not wait for Redis: it gets the list it had, and the
    list is read again beside it; only a list older than `stale_limit` is read on its time."""
    view = heartbeats.CachedWorkers(max_age=0.05, stale_limit=60)
    assert view.get(client) == []  # nothing cached yet: read now
    heartbeats.publish(client, {"id": "w@h"}, interval=10)
    time.sleep(0.1)
    assert view.get(client) == []  # stale: the old answer, a refresh started
    wait_until(lambda: view.get(client) != [], timeout=5, what="the background refresh", interval=0.01)
    assert [w["id"] for w in view.get(client)] == ["w@h"]
    heartbeats.remove(client, "w@h")
    too_old = heartbeats.CachedWorkers(max_age=0.05, stale_limit=0.1)
    assert [w["id"] for w in too_old.get(client)] == []
    heartbeats.publish(client, {"id": "w@h"}, interval=10)
    time.sleep(0.2)
    assert [w["id"] for w in too_old.get(client)] == ["w@h"]  # past the limit: read on its own time


def test_a_poked_heartbeat_waits_its_settle_time_and_makes_one_beat_of_close_pokes(client):
    """A job's start pokes the heartbeat; the beat must not land on the time of its first token,
    and jobs starting together make one beat, not one each."""
    beats = []

    def describe():
        beats.append(time.monotonic())
        return {"id": "w@h"}

    beat = heartbeats.Heartbeat(client, describe, interval=30, settle=0.3)
    beat.start()
    wait_until(lambda: beats, 5, "the first heartbeat", interval=0.01)
    poked = time.monotonic()
    for _ in range(4):
        beat.poke()
        time.sleep(0.02)
    wait_until(lambda: len(beats) == 2, 5, "the poked heartbeat", interval=0.01)
    time.sleep(0.5)
    beat.stop()
    assert beats[1] - poked >= 0.3
    assert len([t for t in beats if t > poked]) <= 2  # the poked beat, and stop()'s own describe
