"""`tasks.lost_acks`: a message this worker ran, found unacknowledged again on two ticks in a row,
is removed (a lines message, or a job's that ended) or put back on its queue (a job's that has not
ended); messages held, or acknowledged for good, are left alone."""

from __future__ import annotations

import pytest
import redis

from ops.redis_server import RedisServer
from store.jobs import job_key
from tasks.lost_acks import UNACKED_INDEX_KEY, UNACKED_KEY, HandedMessages


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with RedisServer(tmp_path_factory.mktemp("lost-acks"), appendonly=False) as server:
        yield redis.Redis.from_url(server.url, decode_responses=True)


def deliver(client, *tags):
    for tag in tags:
        client.hset(UNACKED_KEY, tag, "[{}, \"\", \"cpu\"]")
        client.zadd(UNACKED_INDEX_KEY, {tag: 1.0})


def test_only_a_message_no_longer_held_and_still_unacked_twice_is_removed(client):
    client.flushdb()
    deliveries = HandedMessages()
    for tag in ("ran", "running", "acked"):
        deliveries.received(tag)
    deliver(client, "ran", "running", "someone-elses")
    # "acked" was acknowledged for good; "running" is still held; "ran" ended, but its ack was taken back
    assert deliveries.check(client, held={"running"}) == []  # once could be an ack on its way
    assert deliveries.check(client, held={"running"}) == ["ran"]
    assert set(client.hkeys(UNACKED_KEY)) == {"running", "someone-elses"}
    assert set(client.zrange(UNACKED_INDEX_KEY, 0, -1)) == {"running", "someone-elses"}
    assert deliveries.check(client, held=set()) == []  # "running" just ended: a first sighting only
    client.hdel(UNACKED_KEY, "running")  # its ack arrived
    assert deliveries.check(client, held=set()) == [] and deliveries.check(client, held=set()) == []
    assert client.hkeys(UNACKED_KEY) == ["someone-elses"], "a message this worker never had is not its business"


def test_a_suspect_seen_held_again_is_not_removed(client):
    client.flushdb()
    deliveries = HandedMessages()
    deliveries.received("t")
    deliver(client, "t")
    assert deliveries.check(client, held=set()) == []
    assert deliveries.check(client, held={"t"}) == []  # handed to this worker again
    assert deliveries.check(client, held=set()) == []  # a new first sighting
    assert client.hexists(UNACKED_KEY, "t")


def test_old_deliveries_are_forgotten(client):
    client.flushdb()
    deliveries = HandedMessages(remember_for=0.0)
    deliveries.received("old")
    deliver(client, "old")
    assert deliveries.check(client, held=set()) == [] and deliveries.check(client, held=set()) == []
    assert client.hexists(UNACKED_KEY, "old")


def test_a_job_message_is_put_back_unless_its_job_ended(client):
    client.flushdb()
    deliveries = HandedMessages()
    deliveries.received("ended", "job_a")
    deliveries.received("running", "job_b")
    client.hset(job_key("job_a"), "status", "succeeded")
    client.hset(job_key("job_b"), "status", "running")  # its end was among the writes taken back
    deliver(client, "ended", "running")
    put_back = []
    assert deliveries.check(client, held=set(), restore=put_back.extend) == []
    assert sorted(deliveries.check(client, held=set(), restore=put_back.extend)) == ["ended", "running"]
    assert put_back == ["running"], "only the job that has not ended runs again"
    assert client.hkeys(UNACKED_KEY) == ["running"], "kombu's restore takes it off unacked, not this"
