"""`tasks.sweeper` against a real Redis: which batches the expiry sweep touches, and how.

The sweep's finalize goes through `tasks.batch_messages.send_finalize`; here its Redis is the test's
and the Celery message it would send is captured instead, so no worker is needed.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from types import SimpleNamespace

import pytest
from kombu.asynchronous.timer import Timer

from ops.redis_server import free_port
from store.batches import BatchStore, expired_key, finalize_key, lines_key, results_key
from store.filestore import FileStore
from tasks import batch_messages, batch_run, sweeper
from tasks.routing import FINALIZE_TASK
from tasks.settings import QueueSettings
from tasks.sweeper import LOCK_KEY, BatchSweep, Sweeper, sweep_client, sweep_expired

HANG_GUARD = 60  # seconds: only a hang takes this long; no speed is claimed


@pytest.fixture
def client(redis_db):
    return redis_db


@pytest.fixture
def sent(client, monkeypatch):
    """Finalize messages the sweep sends (and `send_finalize`'s SETNX on the test's Redis)."""
    messages = []
    monkeypatch.setattr(batch_run, "runtime", lambda: SimpleNamespace(redis=client))
    monkeypatch.setattr(batch_messages, "runtime", lambda: SimpleNamespace(redis=client))
    monkeypatch.setattr(batch_run.app, "send_task", lambda name, args=None, **kw: messages.append((name, args)))
    return messages


def make_batch(client, status: str, lines: int = 0, *, expires_in: int = -5) -> str:
    store = BatchStore(client)
    batch = store.create(input_file_id="file-" + "a" * 24, endpoint="/v1/chat/completions",
                         completion_window="24h", metadata=None, window_seconds=86400)
    batch_id = batch["id"]
    for i in range(lines):
        client.hset(lines_key(batch_id), f"line-{i}", i + 1)
    fields = {"status": status, "expires_at": int(time.time()) + expires_in}
    if lines:
        fields["total"] = lines
    client.hset(f"localq:batch:{batch_id}", mapping=fields)
    return batch_id


def outcome(custom_id: str, status: int = 200) -> dict:
    return {"id": "batch_req_x", "custom_id": custom_id, "error": None,
            "response": {"status_code": status, "request_id": "r", "body": {}}}


def test_in_progress_batch_past_its_window_expires_every_line_without_an_outcome(client, sent):
    batch_id = make_batch(client, "in_progress", 5)
    store = BatchStore(client)
    assert store.record_outcome(batch_id, "line-0", outcome("line-0"), failed=False)
    assert store.record_outcome(batch_id, "line-3", outcome("line-3", 500), failed=True)

    assert sweep_expired(client) == [batch_id]

    assert client.get(expired_key(batch_id)) == "1"
    results = {k: json.loads(v) for k, v in client.hgetall(results_key(batch_id)).items()}
    assert sorted(results) == [f"line-{i}" for i in range(5)]
    assert results["line-0"]["response"]["status_code"] == 200  # kept as it was
    assert results["line-3"]["response"]["status_code"] == 500
    for custom_id in ("line-1", "line-2", "line-4"):
        expired = results[custom_id]
        assert expired["custom_id"] == custom_id and expired["response"] is None
        assert expired["id"].startswith("batch_req_") and len(expired["id"]) == len("batch_req_") + 32
        assert expired["error"] == {"code": "batch_expired", "message": "This request could not be executed "
                                                                        "before the completion window expired."}
    assert store.counts(batch_id) == (5, 1, 4)
    assert sent == [(FINALIZE_TASK, [batch_id])]
    assert client.get(finalize_key(batch_id)) == "1"

    # a line that was running during the sweep and finishes now keeps no second outcome
    assert not store.record_outcome(batch_id, "line-1", outcome("line-1"), failed=False)
    assert store.counts(batch_id) == (5, 1, 4)
    # the next sweep (finalize not run yet: still in_progress) sends nothing twice, records nothing twice
    assert sweep_expired(client) == []
    assert sent == [(FINALIZE_TASK, [batch_id])]
    assert store.counts(batch_id) == (5, 1, 4)


def test_batches_within_their_window_or_final_or_cancelling_are_left_alone(client, sent):
    fresh = make_batch(client, "in_progress", 3, expires_in=60)
    final = [make_batch(client, status, 2) for status in ("completed", "failed", "expired", "cancelled")]
    busy = [make_batch(client, status, 2) for status in ("cancelling", "finalizing")]
    before = {b: client.hgetall(f"localq:batch:{b}") for b in [fresh, *final, *busy]}

    assert sweep_expired(client) == []

    assert sent == []
    for batch_id, record in before.items():
        assert client.hgetall(f"localq:batch:{batch_id}") == record
        assert not client.exists(results_key(batch_id), expired_key(batch_id))
    # `now` moves the clock: the fresh batch expires once its window has passed
    assert sweep_expired(client, now=time.time() + 61) == [fresh]


@pytest.mark.parametrize("expires_in", [-5, 3600])
def test_a_batch_whose_lines_all_finished_is_finalized_not_expired(client, sent, expires_in):
    batch_id = make_batch(client, "in_progress", 2, expires_in=expires_in)
    store = BatchStore(client)
    store.record_outcome(batch_id, "line-0", outcome("line-0"), failed=False)
    store.record_outcome(batch_id, "line-1", outcome("line-1"), failed=False)
    client.set(finalize_key(batch_id), "1")  # the last line sent finalize already

    assert sweep_expired(client) == []

    assert not client.exists(expired_key(batch_id))
    assert sent == []  # the finalize already on its way is not sent twice
    client.delete(finalize_key(batch_id))  # the line task died before it sent finalize: the sweep sends it
    assert sweep_expired(client) == [] and sent == [(FINALIZE_TASK, [batch_id])]
    assert sweep_expired(client) == [] and sent == [(FINALIZE_TASK, [batch_id])]  # once
    assert not client.exists(expired_key(batch_id))


@pytest.mark.parametrize("status", ["in_progress", "finalizing", "cancelling"])
def test_a_finalize_that_never_runs_is_sent_again_after_the_grace(client, sent, status):
    batch_id = make_batch(client, status, 3, expires_in=3600)
    store = BatchStore(client)
    store.record_outcome(batch_id, "line-0", outcome("line-0"), failed=False)
    store.record_outcome(batch_id, "line-1", outcome("line-1", 400), failed=True)
    client.hset(f"localq:batch:{batch_id}", "dropped", 1)  # line-2, of a cancelled batch
    client.set(finalize_key(batch_id), "1")  # sent, but the message was lost
    t0 = time.time()

    assert sweep_expired(client, now=t0, finalize_grace=100) == []
    assert sweep_expired(client, now=t0 + 99, finalize_grace=100) == []
    assert sent == []
    assert sweep_expired(client, now=t0 + 100, finalize_grace=100) == []
    assert sent == [(FINALIZE_TASK, [batch_id])]
    assert sweep_expired(client, now=t0 + 150, finalize_grace=100) == []  # a new grace from the re-send
    assert sent == [(FINALIZE_TASK, [batch_id])]
    assert sweep_expired(client, now=t0 + 200, finalize_grace=100) == []
    assert sent == [(FINALIZE_TASK, [batch_id])] * 2
    assert not client.exists(expired_key(batch_id)) and store.counts(batch_id) == (3, 1, 1)


def test_validating_batch_past_its_window_expires_and_a_late_start_task_leaves_it_so(client, sent):
    batch_id = make_batch(client, "validating")

    assert sweep_expired(client) == [batch_id]

    batch = BatchStore(client).get(batch_id)
    assert batch["status"] == "expired" and batch["expired_at"] >= batch["created_at"]
    assert batch["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
    batch_run.start_batch(batch_id)  # the start task arrives after all
    assert BatchStore(client).get(batch_id) == batch
    assert sweep_expired(client) == [] and sent == []


def test_one_sweep_per_interval_across_workers(client, sent):
    make_batch(client, "in_progress", 1)
    first, second = Sweeper(client, 0.5, "a@host"), Sweeper(client, 0.5, "b@host")
    assert len(first.tick()) == 1
    assert second.tick() is None and first.tick() is None  # the lock holds for the interval
    assert client.get(LOCK_KEY) == "a@host"
    time.sleep(0.6)
    assert second.tick() == []  # lock expired: the other worker sweeps (nothing left to expire)
    assert client.get(LOCK_KEY) == "b@host"


def test_a_sweep_survives_redis_being_unreachable(caplog):
    down = Sweeper(sweep_client(f"redis://127.0.0.1:{free_port()}/0"), 1.0, "w@h")
    ticked = []
    # a thread, so that a sweep that hangs (instead of giving up) fails the test rather than the run
    sweep = threading.Thread(target=lambda: ticked.append(down.tick()), daemon=True)
    sweep.start()
    sweep.join(HANG_GUARD)
    assert not sweep.is_alive(), f"a sweep with Redis unreachable did not return within {HANG_GUARD} s"
    assert ticked == [None]
    assert "sweep skipped" in caplog.text


def test_bootstep_runs_the_sweep_on_the_worker_timer(redis_server, client, sent):
    batch_id = make_batch(client, "in_progress", 2)
    settings = QueueSettings(redis_url=redis_server.url, batch_sweep_interval=0.2)
    worker = SimpleNamespace(app=SimpleNamespace(localq_settings=settings), timer=Timer(), hostname="w@h")
    step = BatchSweep(worker)
    step.start(worker)
    tref = step.tref
    assert step.sweeper.finalize_grace == settings.finalize_grace
    scheduler = iter(worker.timer)  # what the worker's event loop (kombu's Hub) fires timers with
    try:
        deadline = time.monotonic() + HANG_GUARD
        while not sent and time.monotonic() < deadline:
            delay, entry = next(scheduler)
            if entry is None:
                time.sleep(min(delay or 0.05, 0.05))
            else:
                entry()
    finally:
        step.stop(worker)
    assert sent == [(FINALIZE_TASK, [batch_id])]
    assert tref.canceled and step.tref is None


def lost_batch(client, files_dir, lines: int, status: str = "in_progress", expires_in: int = 3600):
    """A started batch of chat lines whose input file is really stored."""
    items = [{"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "gpt-4o-mini", "max_tokens": 2, "messages": [{"role": "user", "content": f"{i}"}]}}
             for i in range(lines)]
    source = FileStore(client, files_dir).create(purpose="batch", filename="in.jsonl",
                                                 source=b"".join(json.dumps(x).encode() + b"\n" for x in items))
    batch_id = make_batch(client, status, lines, expires_in=expires_in)
    client.hset(f"localq:batch:{batch_id}", "input_file_id", source["id"])
    return batch_id


def line_message(batch_id: str, task: str = "localq.batch.lines") -> str:
    """A Celery task message as kombu's Redis transport stores it."""
    body = base64.b64encode(json.dumps([[batch_id, [[1, "line-0", {}]]], {}, {}]).encode()).decode()
    return json.dumps({"body": body, "content-encoding": "utf-8", "content-type": "application/json",
                       "headers": {"task": task}, "properties": {"body_encoding": "base64", "priority": 9}})


@pytest.mark.parametrize(("status", "expires_in"), [("in_progress", 3600), ("cancelling", -5)])
def test_lines_whose_messages_were_lost_are_sent_again(client, sent, tmp_path, status, expires_in):
    # (a cancelling batch's lines are sent again too, past its window or not: they are dropped when they run)
    batch_id = lost_batch(client, tmp_path, 4, status, expires_in)
    store = BatchStore(client)
    store.record_outcome(batch_id, "line-1", outcome("line-1"), failed=False)
    client.sadd(f"localq:batch:{batch_id}:dropped", "line-3")  # dropped lines stay dropped
    t0 = time.time()

    assert sweep_expired(client, now=t0, lost_grace=2, files_dir=tmp_path) == []
    assert sweep_expired(client, now=t0 + 1, lost_grace=2, files_dir=tmp_path) == []
    assert sent == []  # not yet: a message may be between the queue and the unacknowledged hash
    assert sweep_expired(client, now=t0 + 2, lost_grace=2, files_dir=tmp_path) == []

    assert [(name, args[0], [line[:2] for line in args[1]]) for name, args in sent] == [
        ("localq.batch.lines", batch_id, [[1, "line-0"]]), ("localq.batch.lines", batch_id, [[3, "line-2"]])]
    body = sent[0][1][1][0][2]
    assert body["model"] == "gpt-4o-mini" and body["messages"] == [{"role": "user", "content": "0"}]
    assert not client.exists(expired_key(batch_id))


def test_lines_with_a_message_on_a_queue_or_unacknowledged_are_not_sent_again(client, sent, tmp_path):
    queued = lost_batch(client, tmp_path, 2)
    running = lost_batch(client, tmp_path, 2)
    starting = lost_batch(client, tmp_path, 2)
    client.lpush("cpu\x06\x169", line_message(queued))
    client.hset("unacked", "tag-1", json.dumps([json.loads(line_message(running)), "cpu", "cpu"]))
    client.lpush("cpu", line_message(starting, "localq.batch.start"))
    t0 = time.time()
    for step in range(4):
        assert sweep_expired(client, now=t0 + step, lost_grace=1, files_dir=tmp_path) == []
    assert sent == []
    client.delete("unacked")  # the running line's message is gone, and the line has no outcome
    for step in range(4, 6):
        sweep_expired(client, now=t0 + step, lost_grace=1, files_dir=tmp_path)
    assert sorted(args[1][0][1] for _, args in sent) == ["line-0", "line-1"]
    assert {args[0] for _, args in sent} == {running}


def test_no_lost_line_check_while_the_queues_are_long(client, sent, tmp_path, monkeypatch):
    lost_batch(client, tmp_path, 1)
    monkeypatch.setattr(sweeper, "SCAN_LIMIT", 3)
    client.lpush("gpu", *[line_message("batch_other") for _ in range(4)])
    t0 = time.time()
    for step in range(4):
        sweep_expired(client, now=t0 + step, lost_grace=1, files_dir=tmp_path)
    assert sent == []


def test_sweep_interval_setting():
    assert QueueSettings.from_env({}).batch_sweep_interval == 60
    assert QueueSettings.from_env({"LOCALQ_BATCH_SWEEP_INTERVAL": "2.5"}).batch_sweep_interval == 2.5
    for bad in ("0", "-1", "soon", "inf"):
        with pytest.raises(ValueError, match="LOCALQ_BATCH_SWEEP_INTERVAL"):
            QueueSettings.from_env({"LOCALQ_BATCH_SWEEP_INTERVAL": bad})
