"""`localq.batch.finalize` run in-process on a real Redis: a redelivered finalize writes no second file."""

from __future__ import annotations

import json

import pytest

from tasks import batch_run
from store.batches import BatchStore
from tasks.runtime import runtime


@pytest.fixture
def rt(redis_server, tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALQ_REDIS_URL", redis_server.url)
    monkeypatch.setenv("LOCALQ_FILES_DIR", str(tmp_path / "files"))
    runtime.cache_clear()
    runtime().redis.flushall()
    yield runtime()
    runtime.cache_clear()


def finished_batch(rt) -> str:
    """A batch whose two lines have outcomes (one succeeded, one failed), ready to finalize."""
    store = BatchStore(rt.redis)
    batch_id = store.create(input_file_id="file-x", endpoint="/v1/embeddings", completion_window="24h",
                            metadata=None, window_seconds=86400)["id"]
    rt.redis.hset(batch_run.lines_key(batch_id), mapping={"a": 1, "b": 2})
    store.set_status(batch_id, "in_progress", total=2)
    store.record_outcome(batch_id, "b", batch_run._failure("b", "r2", 400, {"message": "no"}), failed=True)
    store.record_outcome(batch_id, "a", batch_run._success("a", "r1", {"object": "list", "data": [],
                                                                          "usage": {"prompt_tokens": 3}}),
                         failed=False)
    return batch_id


def batch_output_files(rt) -> list[str]:
    return sorted(f["id"] for f in batch_run._files().list(purpose="batch_output")[0])


def test_a_finalize_delivered_again_reuses_the_files_it_wrote(rt):
    batch_id = finished_batch(rt)
    batch_run.finalize_batch(batch_id)
    store = BatchStore(rt.redis)
    first = store.get(batch_id)
    assert first["status"] == "completed" and first["usage"]["input_tokens"] == 3
    assert len(batch_output_files(rt)) == 2
    # the worker died after writing the files, before the final status: the task runs again
    store.set_status(batch_id, "finalizing")
    batch_run.finalize_batch(batch_id)
    again = store.get(batch_id)
    assert again["status"] == "completed"
    assert (again["output_file_id"], again["error_file_id"]) == (first["output_file_id"], first["error_file_id"])
    assert batch_output_files(rt) == sorted([first["output_file_id"], first["error_file_id"]])
    with batch_run._files().open(first["output_file_id"]) as handle:
        assert [json.loads(line)["custom_id"] for line in handle] == ["a"]


def test_two_finalizes_racing_keep_one_file(rt):
    batch_id = finished_batch(rt)
    files = batch_run._files()

    def create_while_another_finalize_wins():
        winner = files.create(purpose="batch_output", filename="winner.jsonl", source=[b"{}\n"])["id"]
        rt.redis.hset(batch_run.batch_key(batch_id), "output_file_id", winner)
        return files.create(purpose="batch_output", filename="loser.jsonl", source=[b"{}\n"])["id"]

    kept = batch_run._file_once(batch_id, "output_file_id", create_while_another_finalize_wins)
    assert files.get(kept)["filename"] == "winner.jsonl"
    assert batch_output_files(rt) == [kept]  # the loser's file was deleted


def test_a_finished_batch_is_its_record_and_takes_no_late_outcome(rt):
    batch_id = finished_batch(rt)
    rt.redis.hset(batch_run.deliveries_key(batch_id), "a", 1)
    batch_run.finalize_batch(batch_id)
    store = BatchStore(rt.redis)
    assert store.record(batch_id)["status"] == "completed"
    kept = sorted(rt.redis.scan_iter(match=f"*{batch_id}*"))
    assert kept == [f"localq:batch:{batch_id}"], "per-line keys go once the files hold the outcomes"
    # a line delivered again after the end (a failover, a late redelivery) changes nothing
    assert not store.record_outcome(batch_id, "c", batch_run._failure("c", "r3", 400, {"message": "late"}),
                                    failed=True)
    assert not store.drop(batch_id, "c", batch_run.dropped_key(batch_id))
    assert store.counts(batch_id) == (2, 1, 1) and not rt.redis.exists(batch_run.results_key(batch_id))
