"""`tasks.lost_acks`: a message handed to this worker that it holds no more, found unacknowledged on two
ticks in a row, is removed (a lines message, or a job's that ended) or put back on its queue (a job's
that has not ended and is not running elsewhere); held messages, and those acknowledged for good,
are left alone. One acknowledged is remembered still: a failover can bring its entry back."""

from __future__ import annotations

import pytest
import redis

from ops.redis_server import RedisServer
from store.jobs import job_key
from tasks.lost_acks import UNACKED_INDEX_KEY, UNACKED_KEY, HandedMessages

NODE = "cpu@here"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with RedisServer(tmp_path_factory.mktemp("lost-acks"), appendonly=False) as server:
        yield redis.Redis.from_url(server.url, decode_responses=True)


def deliver(client, *tags):
    for tag in tags:
        client.hset(UNACKED_KEY, tag, "[{}, \"\", \"cpu\"]")
        client.zadd(UNACKED_INDEX_KEY, {tag: 1.0})


def acknowledge(client, tag):
    client.hdel(UNACKED_KEY, tag)
    client.zrem(UNACKED_INDEX_KEY, tag)


def test_a_lines_message_not_held_and_unacked_on_two_ticks_is_removed(client):
    client.flushdb()
    messages = HandedMessages()
    for tag in ("lost", "fine", "ending", "running"):
        messages.received(tag)
    deliver(client, "lost", "ending", "running", "someone-elses")
    # "fine" was acknowledged; "ending" is acknowledged between the ticks; "running" is held
    assert messages.check(client, held={"running"}) == []  # once could be an acknowledgement on its way
    acknowledge(client, "ending")
    assert messages.check(client, held={"running"}) == ["lost"]
    assert set(client.hkeys(UNACKED_KEY)) == {"running", "someone-elses"}
    assert set(client.zrange(UNACKED_INDEX_KEY, 0, -1)) == {"running", "someone-elses"}
    assert messages.check(client, held=set()) == []  # "running" just ended: a first sighting only
    acknowledge(client, "running")
    assert messages.check(client, held=set()) == [] and messages.check(client, held=set()) == []
    assert client.hkeys(UNACKED_KEY) == ["someone-elses"], "a message this worker never had is not its business"


def test_a_suspect_seen_held_again_is_left_alone(client):
    client.flushdb()
    messages = HandedMessages()
    messages.received("t")
    deliver(client, "t")
    assert messages.check(client, held=set()) == []
    assert messages.check(client, held={"t"}) == []  # handed over again
    assert messages.check(client, held=set()) == []  # a new first sighting
    assert client.hexists(UNACKED_KEY, "t")


def test_a_job_message_is_put_back_only_if_its_job_must_run(client):
    client.flushdb()
    messages = HandedMessages()
    for tag, job_id, status, worker in (("ended", "job_a", "succeeded", f"{NODE}:1"),
                                        ("ours", "job_b", "running", f"{NODE}:1"),
                                        ("dropped", "job_c", "queued", ""),
                                        ("elsewhere", "job_d", "running", "gpu0@there:7")):
        messages.received(tag, job_id)
        client.hset(job_key(job_id), mapping={"status": status, "worker": worker})
    deliver(client, "ended", "ours", "dropped", "elsewhere")
    put_back = []
    assert messages.check(client, set(), put_back.extend, NODE) == []
    assert messages.check(client, set(), put_back.extend, NODE) == ["dropped", "elsewhere", "ended", "ours"]
    assert sorted(put_back) == ["dropped", "ours"], "only jobs that must run"
    assert sorted(client.hkeys(UNACKED_KEY)) == ["dropped", "elsewhere", "ours"], \
        "kombu's restore takes the put-back ones off unacked; another worker's is its own"


def test_old_deliveries_are_forgotten(client):
    client.flushdb()
    messages = HandedMessages(remember_for=0.0)
    messages.received("old")
    deliver(client, "old")
    assert messages.check(client, set()) == [] and messages.check(client, set()) == []
    assert client.hexists(UNACKED_KEY, "old")


def test_an_acknowledgement_a_failover_took_back_is_noticed(client):
    client.flushdb()
    messages = HandedMessages()
    messages.received("t")
    assert messages.check(client, set()) == []  # acknowledged: not in unacked
    deliver(client, "t")  # the new primary never saw the acknowledgement
    assert messages.check(client, set()) == [] and messages.check(client, set()) == ["t"]


def test_a_failed_cleanup_of_a_lost_broker_connection_does_not_stop_the_worker(monkeypatch):
    """kombu, closing the dead connection's channel, can raise AttributeError (its pool already gone,
    seen in a Sentinel failover); Celery would take it for an unrecoverable error and stop."""
    from celery.worker.consumer import Consumer as CeleryConsumer

    from tasks.handoff import Consumer

    def kombu_fails(self, exc):
        self.connection = None
        raise AttributeError("'NoneType' object has no attribute 'hostname'")

    monkeypatch.setattr(CeleryConsumer, "on_connection_error_after_connected", kombu_fails)
    consumer = Consumer.__new__(Consumer)
    consumer.connection = object()
    consumer.on_connection_error_after_connected(ConnectionError("lost"))  # no exception: the consumer restarts
    assert consumer.connection is None
