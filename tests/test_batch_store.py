"""Batch records on a real Redis: exactly-once line outcomes, counts, listing, persistence across a restart."""

from __future__ import annotations

import threading

import pytest
import redis

from ops.redis_server import RedisServer
from store.batches import BatchStore


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with RedisServer(tmp_path_factory.mktemp("redis")) as running:
        yield running


@pytest.fixture
def store(server):
    return BatchStore(redis.Redis.from_url(server.url, decode_responses=True))


def new(store, **extra):
    return store.create(input_file_id="file-x", endpoint="/v1/chat/completions", completion_window="24h",
                        metadata=extra.get("metadata"), window_seconds=86400)


def test_a_new_batch_is_validating_with_openai_fields(store):
    batch = new(store, metadata={"k": "v"})
    assert batch["object"] == "batch" and batch["status"] == "validating" and batch["metadata"] == {"k": "v"}
    assert batch["expires_at"] - batch["created_at"] == 86400
    assert batch["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
    assert "in_progress_at" not in batch and "output_file_id" not in batch  # unset: left out, never null


def test_each_line_counts_once_even_when_recorded_again(store):
    batch_id = new(store)["id"]
    assert store.record_outcome(batch_id, "a", {"ok": 1}, failed=False)
    assert not store.record_outcome(batch_id, "a", {"ok": 2}, failed=False)  # a redelivered line
    assert store.record_outcome(batch_id, "b", {"err": 1}, failed=True)
    assert store.counts(batch_id)[1:] == (1, 1)
    assert store.outcomes(batch_id) == {"a": {"ok": 1}, "b": {"err": 1}}


def test_concurrent_recorders_never_double_count(store):
    batch_id = new(store)["id"]
    recorded = []

    def record_all():
        for i in range(200):
            if store.record_outcome(batch_id, f"line-{i}", {"i": i}, failed=False):
                recorded.append(i)

    threads = [threading.Thread(target=record_all) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(recorded) == list(range(200)) and store.counts(batch_id)[1] == 200


def test_status_changes_stamp_their_times(store):
    batch_id = new(store)["id"]
    store.set_status(batch_id, "in_progress", total=3)
    store.set_status(batch_id, "finalizing")
    batch = store.get(batch_id)
    assert batch["status"] == "finalizing" and batch["request_counts"]["total"] == 3
    assert batch["in_progress_at"] and batch["finalizing_at"] and "completed_at" not in batch


def test_listing_newest_first_with_after(store):
    ids = [new(store)["id"] for _ in range(5)]
    first, more = store.list(limit=2)
    assert more and len(first) == 2
    second, _ = store.list(after=first[-1]["id"], limit=2)
    assert not {b["id"] for b in first} & {b["id"] for b in second}
    assert set(ids) <= {b["id"] for b in store.list(limit=1000)[0]}


def test_batches_survive_a_redis_restart(server, store):
    batch_id = new(store)["id"]
    store.record_outcome(batch_id, "a", {"ok": True}, failed=False)
    server.restart()
    again = BatchStore(redis.Redis.from_url(server.url, decode_responses=True))
    assert again.get(batch_id)["request_counts"]["completed"] == 1 and again.outcomes(batch_id) == {"a": {"ok": True}}


def test_start_moves_only_a_batch_still_waiting_to_run(store):
    waiting = new(store)["id"]
    assert store.start(waiting, 3)
    started = store.get(waiting)
    assert started["status"] == "in_progress" and started["request_counts"]["total"] == 3 and started["in_progress_at"]
    cancelled = new(store)["id"]
    store.set_status(cancelled, "cancelling")
    assert store.start(cancelled, 2) and store.get(cancelled)["status"] == "cancelling"
    expired = new(store)["id"]
    store.set_status(expired, "expired")  # the sweep got there first
    assert not store.start(expired, 5)
    assert store.get(expired)["status"] == "expired" and store.get(expired)["request_counts"]["total"] == 0


def test_a_dropped_line_counts_once_and_never_after_an_outcome(store):
    batch_id = new(store)["id"]
    dropped = f"localq:batch:{batch_id}:dropped"
    assert store.drop(batch_id, "a", dropped)
    assert not store.drop(batch_id, "a", dropped)  # a redelivered line, or a retried call
    store.record_outcome(batch_id, "b", {"ok": 1}, failed=False)
    assert not store.drop(batch_id, "b", dropped)
    assert store.client.hget(f"localq:batch:{batch_id}", "dropped") == "1"
