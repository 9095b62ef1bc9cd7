"""Usage per project (issue 14): what a job's answer used (`store.usage.usage_of`), the minute, hour
and day buckets in Redis and their sums, OpenAI's usage operations (`api.routes.usage`), the
per-project Prometheus counters with their bounded project label, and on the session's shared
service a known workload whose usage figures equal the sums of its responses' `usage` fields."""

from __future__ import annotations

import io
import json
import math
import threading
import time
import wave

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from store import usage
from store.api_keys import MEMBER, OWNER, KeyStore
from store.usage import (AUDIO_SPEECHES, AUDIO_TRANSCRIPTIONS, COMPLETIONS, EMBEDDINGS, IMAGES, TOTALS_KEY,
                         Filter, Retention, Usage, aggregate, bucket_key, read_buckets, record, usage_of)
from tests.service import CHAT, EMBEDDINGS as EMBEDDING_MODEL, project_keys, wait_until

DAY = 86400
# Yesterday at 10:30:15 UTC (a moment in the past, so buckets kept 2 days still exist)
YESTERDAY = int(time.time()) // DAY * DAY - DAY
T0 = YESTERDAY + 10 * 3600 + 30 * 60 + 15
CHAT_RESULT = {"object": "chat.completion", "choices": [],
               "usage": {"prompt_tokens": 30, "completion_tokens": 5, "total_tokens": 35,
                         "prompt_tokens_details": {"cached_tokens": 12}}}


def chat(project: str, prompt: int, completion: int, *, model: str = "smol", cached: int = 0,
         batch: bool = False) -> Usage:
    return usage_of(project=project, kind="chat", model=model, request={}, batch=batch, result={
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                  "prompt_tokens_details": {"cached_tokens": cached}}})


# --- what an answer used -------------------------------------------------------------------------


def test_usage_of_each_kind():
    assert usage_of(project="p", kind="chat", model="m", request={}, result=CHAT_RESULT) == Usage(
        "p", COMPLETIONS, "m", {"requests": 1, "input_tokens": 30, "input_cached_tokens": 12, "output_tokens": 5})
    completion = usage_of(project="p", kind="completion", model="m", request={}, batch=True,
                          result={"usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}})
    assert completion.category == COMPLETIONS and completion.batch
    assert completion.measures == {"requests": 1, "input_tokens": 3, "input_cached_tokens": 0, "output_tokens": 4}
    embedding = usage_of(project="", kind="embedding", model="e", request={"input": ["a", "b"]},
                         result={"data": [{}, {}], "usage": {"prompt_tokens": 9, "total_tokens": 9}})
    assert embedding.measures == {"requests": 1, "input_tokens": 9}
    assert embedding.labels()[0] == "default", "a server without keys records its one project as `default`"
    image = usage_of(project="p", kind="image", model="d", request={"size": "256x256", "n": 2},
                     result={"data": [{"url": "u1"}, {"url": "u2"}], "usage": {"input_tokens": 4}})
    assert (image.category, image.measures, image.size, image.source) == (
        IMAGES, {"requests": 1, "images": 2}, "256x256", "image.generation")
    edit = usage_of(project="p", kind="image_edit", model="d", request={}, result={"data": [{}], "size": "512x512"})
    assert (edit.size, edit.source) == ("512x512", "image.edit")
    assert usage_of(project="p", kind="image", model="d", request={"size": "auto"}, result={"data": []}).size == ""
    speech = usage_of(project="p", kind="speech", model="t", request={"input": "Hello there."},
                      result={"content_type": "audio/mpeg", "bytes": 100})
    assert (speech.category, speech.measures) == (AUDIO_SPEECHES, {"requests": 1, "characters": 12})
    for result, given, seconds in (({"text": "x", "usage": {"type": "duration", "seconds": 4}}, 9.0, 4),
                                   ({"text": "x", "duration": 3.2}, None, 4),
                                   ("x\n", 2.01, 3),  # text, srt, vtt: the length the worker measured
                                   ({"text": "x"}, None, 0)):
        found = usage_of(project="p", kind="transcription", model="w", request={}, result=result,
                         audio_seconds=given)
        assert (found.category, found.measures) == (AUDIO_TRANSCRIPTIONS, {"requests": 1, "seconds": seconds})
    assert usage_of(project="p", kind="translation", model="w", request={}, result={"text": "x"},
                    audio_seconds=1.5).measures["seconds"] == 2
    assert usage_of(project="p", kind="tokenize", model="m", request={}, result={"tokens": [1]}) is None
    broken = usage_of(project="p", kind="chat", model="m", request={}, result={"usage": {"prompt_tokens": "x"}})
    assert broken.measures == {"requests": 1, "input_tokens": 0, "input_cached_tokens": 0, "output_tokens": 0}


def test_retention_from_env():
    assert Retention.from_env({}) == Retention(2 * DAY, 35 * DAY, 400 * DAY)
    assert Retention.from_env({"LOCALQ_USAGE_MINUTE_TTL": "60", "LOCALQ_USAGE_DAY_TTL": " "}) == Retention(
        60, 35 * DAY, 400 * DAY)
    for bad in ("0", "-1", "soon", "inf"):
        with pytest.raises(ValueError, match="LOCALQ_USAGE_HOUR_TTL"):
            Retention.from_env({"LOCALQ_USAGE_HOUR_TTL": bad})


# --- buckets in Redis ----------------------------------------------------------------------------


def totals(groups) -> list[tuple]:
    return [(group.key, group.measures) for group in groups]


def test_one_record_lands_in_its_minute_hour_and_day_with_their_retention(redis_db):
    retention = Retention(minute=3 * DAY, hour=30 * DAY, day=300 * DAY)
    record(redis_db, [chat("proj_a", 30, 5, cached=12)], T0, retention)
    minute, hour, day = T0 - 15, T0 - 30 * 60 - 15, YESTERDAY
    assert usage.bucket_start(T0, 60) == minute and usage.bucket_start(T0, 3600) == hour
    assert usage.bucket_start(T0, DAY) == day
    for width, start, kept in ((60, minute, 3 * DAY), (3600, hour, 30 * DAY), (DAY, day, 300 * DAY)):
        key = bucket_key(width, start)
        assert abs(redis_db.ttl(key) - (start + width + kept - time.time())) <= 2, "kept after the bucket's end"
        [rows] = read_buckets(redis_db, width, [start])
        assert rows == {("proj_a", COMPLETIONS, "smol", "0", "", ""): {
            "requests": 1, "input_tokens": 30, "input_cached_tokens": 12, "output_tokens": 5}}
    assert redis_db.ttl(TOTALS_KEY) == -1, "the totals never expire"
    assert read_buckets(redis_db, 60, [minute + 60, minute - 60]) == [{}, {}]


def test_sums_across_buckets_projects_models_and_batch(redis_db):
    record(redis_db, [chat("proj_a", 10, 1), chat("proj_a", 20, 2, model="big")], T0)
    record(redis_db, [chat("proj_a", 5, 5, batch=True), chat("proj_b", 7, 3)], T0 + 60)  # the next minute
    record(redis_db, [usage_of(project="proj_a", kind="embedding", model="e", request={},
                               result={"usage": {"prompt_tokens": 4}})], T0)
    minute = usage.bucket_start(T0, 60)
    first, second = read_buckets(redis_db, 60, [minute, minute + 60])
    [hour] = read_buckets(redis_db, 3600, [usage.bucket_start(T0, 3600)])
    completions = Filter(COMPLETIONS)
    everything = {"requests": 4, "input_tokens": 42, "output_tokens": 11}
    assert totals(aggregate(hour, completions)) == [({}, everything)]
    assert totals(aggregate(first, completions)) == [({}, {"requests": 2, "input_tokens": 30, "output_tokens": 3})]
    assert totals(aggregate(hour, completions, ["project_id"])) == [
        ({"project_id": "proj_a"}, {"requests": 3, "input_tokens": 35, "output_tokens": 8}),
        ({"project_id": "proj_b"}, {"requests": 1, "input_tokens": 7, "output_tokens": 3})]
    assert [g.key for g in aggregate(hour, completions, ["model", "batch", "project_id"])] == [
        {"project_id": "proj_a", "model": "big", "batch": False},
        {"project_id": "proj_a", "model": "smol", "batch": False},
        {"project_id": "proj_a", "model": "smol", "batch": True},
        {"project_id": "proj_b", "model": "smol", "batch": False}]
    batch_only = Filter(COMPLETIONS, batch=True)
    assert totals(aggregate(second, batch_only)) == [({}, {"requests": 1, "input_tokens": 5, "output_tokens": 5})]
    assert aggregate(first, batch_only) == []
    assert totals(aggregate(hour, Filter(COMPLETIONS, projects=frozenset({"proj_b"}), models=frozenset({"smol"})))) \
        == [({}, {"requests": 1, "input_tokens": 7, "output_tokens": 3})]
    assert totals(aggregate(hour, Filter(EMBEDDINGS))) == [({}, {"requests": 1, "input_tokens": 4})]
    assert aggregate(hour, Filter(IMAGES)) == []
    # the totals behind the Prometheus counters
    found = usage.read_totals(redis_db)
    assert found[("proj_a", COMPLETIONS, "smol", "1", "requests")] == 1
    assert found[("proj_a", COMPLETIONS, "smol", "0", "input_tokens")] == 10


def test_records_from_many_writers_add_up(redis_db):
    def write():
        for _ in range(50):
            record(redis_db, [chat("proj_a", 2, 1)], T0)

    threads = [threading.Thread(target=write) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    [day] = read_buckets(redis_db, DAY, [usage.bucket_start(T0, DAY)])
    assert totals(aggregate(day, Filter(COMPLETIONS))) == [
        ({}, {"requests": 200, "input_tokens": 400, "output_tokens": 200})]


def test_unreadable_fields_are_skipped(redis_db):
    key = bucket_key(60, usage.bucket_start(T0, 60))
    redis_db.hset(key, mapping={"not json": 1, json.dumps(["a", "b"]): 2, json.dumps(["p"] * 7): "x"})
    record(redis_db, [chat("proj_a", 1, 1)], T0)
    [rows] = read_buckets(redis_db, 60, [usage.bucket_start(T0, 60)])
    assert list(rows) == [("proj_a", COMPLETIONS, "smol", "0", "", "")]


# --- the task records what each answer used -----------------------------------------------------


@pytest.fixture
def rt(redis_server, monkeypatch):
    from tasks.runtime import runtime

    monkeypatch.setenv("LOCALQ_REDIS_URL", redis_server.url)
    runtime.cache_clear()
    runtime().redis.flushall()
    yield runtime()
    runtime.cache_clear()


def _wav(seconds: float, rate: int = 8000) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(b"\0\0" * int(seconds * rate))
    return buffer.getvalue()


def test_the_task_records_each_answers_usage_in_its_project(rt, monkeypatch):
    from store.files import UPLOAD_MARK
    from tasks import run as task_module

    answers = {"chat": CHAT_RESULT, "transcription": "hello\n", "tokenize": {"tokens": [1, 2]}}
    monkeypatch.setattr(task_module, "execute", lambda job, emit, cancelled, **_: emit("result", answers[job["kind"]]))
    rt.blobs.set("upload:usage-test", _wav(2.25))
    requests = {
        "chat": {"model": "gpt-4o-mini", "messages": []},
        "transcription": {"model": "whisper-1", "response_format": "text",
                          "file": {UPLOAD_MARK: "upload:usage-test", "filename": "a.wav", "content_type": "audio/wav"}},
        "tokenize": {"model": "gpt-4o-mini", "content": "hi"},
    }
    began = time.time()
    for n, (kind, request) in enumerate(requests.items()):
        job_id = f"job_usage_{n}"
        rt.jobs.create(job_id, kind=kind, model=request["model"], queue="cpu", priority="interactive",
                       deadline=time.time() + 60, attached=True, project="proj_t")
        task_module.run_job({"id": job_id, "kind": kind, "model": request["model"], "created": int(began),
                             "deadline": time.time() + 60, "request": request, "project": "proj_t"})
        assert rt.jobs.get(job_id)["status"] == "succeeded"
    starts = sorted({usage.bucket_start(began, 60), usage.bucket_start(time.time(), 60)})
    rows: dict = {}
    for bucket in read_buckets(rt.redis, 60, starts):
        for labels, measures in bucket.items():
            rows.setdefault(labels, {}).update(measures)  # one minute, or two with nothing in common
    assert rows == {
        ("proj_t", COMPLETIONS, "smollm2-135m-instruct", "0", "", ""): {  # an alias counts as its model
            "requests": 1, "input_tokens": 30, "input_cached_tokens": 12, "output_tokens": 5},
        ("proj_t", AUDIO_TRANSCRIPTIONS, "whisper-tiny-en", "0", "", ""): {  # a text answer: the upload's length
            "requests": 1, "seconds": 3},
    }


def test_a_usage_that_cannot_be_recorded_never_fails_the_job(rt, monkeypatch):
    from tasks import run as task_module

    monkeypatch.setattr(task_module, "execute", lambda job, emit, cancelled, **_: emit("result", CHAT_RESULT))
    monkeypatch.setattr(task_module, "queue_usage", lambda *args, **kwargs: 1 / 0)
    rt.jobs.create("job_usage_x", kind="chat", model="gpt-4o-mini", queue="cpu", priority="interactive",
                   deadline=time.time() + 60, attached=True)
    task_module.run_job({"id": "job_usage_x", "kind": "chat", "model": "gpt-4o-mini", "created": int(time.time()),
                         "deadline": time.time() + 60, "request": {"model": "gpt-4o-mini", "messages": []}})
    assert rt.jobs.get("job_usage_x")["status"] == "succeeded"
    assert rt.events.all("job_usage_x")[-1].type == "result"


# --- Prometheus ----------------------------------------------------------------------------------


def test_project_series_names_at_most_the_busiest_projects():
    found: usage.Totals = {}
    for n in range(60):
        found[(f"proj_{n:02d}", COMPLETIONS, "smol", "0", "requests")] = n + 1
        found[(f"proj_{n:02d}", COMPLETIONS, "smol", "0", "input_tokens")] = 10
        found[(f"proj_{n:02d}", COMPLETIONS, "smol", "1", "requests")] = 1
    series = usage.project_series(found, limit=50)
    projects = {project for project, _ in series.requests}
    assert len(projects) == 51 and "other" in projects
    assert {f"proj_{n:02d}" for n in range(10)}.isdisjoint(projects), "the 10 with the fewest requests are folded"
    assert series.requests[("other", COMPLETIONS)] == sum(n + 2 for n in range(10))
    assert sum(series.requests.values()) == sum(n + 2 for n in range(60)), "nothing is lost by folding"
    assert series.tokens[("other", "smol", "input")] == 100
    assert series.batch_lines[("other", COMPLETIONS)] == 10
    assert "other" not in {p for p, _ in usage.project_series(found, limit=60).requests}


def scrape_families(client) -> dict:
    response = client.get("/metrics")
    assert response.status_code == 200
    found = {}
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_metrics_by_project(redis_server, redis_db):
    client = _app(redis_server).test_client()
    now = time.time()
    record(redis_db, [chat("proj_a", 30, 5), chat("proj_a", 10, 2, batch=True), chat("proj_b", 1, 1)], now)
    record(redis_db, [usage_of(project="proj_a", kind="image", model="tiny-diffusion", request={},
                               result={"data": [{}, {}]}),
                      usage_of(project="proj_b", kind="speech", model="piper-joe", request={"input": "Hi."},
                               result={}),
                      usage_of(project="proj_b", kind="transcription", model="whisper-tiny-en", request={},
                               result={"text": "x", "usage": {"type": "duration", "seconds": 3}})], now)
    found = scrape_families(client)

    def value(name, **labels):
        return found.get((name, tuple(sorted(labels.items()))))

    assert value("localq_project_tokens_total", project="proj_a", model="smol", direction="input") == 40
    assert value("localq_project_tokens_total", project="proj_a", model="smol", direction="output") == 7
    assert value("localq_project_tokens_total", project="proj_b", model="smol", direction="output") == 1
    assert value("localq_project_requests_total", project="proj_a", kind="completions") == 2
    assert value("localq_project_requests_total", project="proj_a", kind="images") == 1
    assert value("localq_project_batch_lines_total", project="proj_a", kind="completions") == 1
    assert value("localq_project_batch_lines_total", project="proj_b", kind="completions") is None
    assert value("localq_project_images_total", project="proj_a", model="tiny-diffusion") == 2
    assert value("localq_project_audio_characters_total", project="proj_b", model="piper-joe") == 3
    assert value("localq_project_audio_seconds_total", project="proj_b", model="whisper-tiny-en") == 3
    assert value("localq_jobs_total", kind="chat", outcome="succeeded") is None, "usage is not a job count"

    for n in range(60):  # many projects: the label stays bounded
        record(redis_db, [chat(f"proj_many_{n:02d}", 1, 1)], now)
    projects = {dict(labels)["project"] for name, labels in scrape_families(client)
                if name == "localq_project_requests_total"}
    assert len(projects) == usage.MAX_PROJECT_LABELS + 1 and "other" in projects
    assert {"proj_a", "proj_b"} <= projects, "the busiest projects keep their name"


# --- the usage operations, in process ------------------------------------------------------------


def _app(redis_server, **env):
    from api.app import create_app
    from api.settings import Settings

    return create_app(Settings.from_env({"LOCALQ_REDIS_URL": redis_server.url, **env}))


@pytest.fixture
def api(redis_server, redis_db):
    return _app(redis_server).test_client()


def get(client, operation: str, headers=None, **query):
    return client.get(f"/v1/organization/usage/{operation}", query_string=query, headers=headers or {})


def assert_page(body: dict) -> None:
    from tests.contract import upstream

    upstream().assert_conforms("UsageResponse", body)


def test_completions_usage_in_buckets_groups_and_pages(api, redis_db):
    now = int(time.time())
    minute = usage.bucket_start(now, 60)
    record(redis_db, [chat("proj_a", 30, 5, cached=10), chat("proj_b", 7, 3, model="smollm2-135m-instruct")],
           minute - 120)
    record(redis_db, [chat("proj_a", 5, 5, batch=True)], minute)
    start, end = minute - 180, minute + 60  # the end: the test may run into the next minute

    answer = get(api, "completions", start_time=start, end_time=end, bucket_width="1m")
    assert answer.status_code == 200, answer.text
    body = answer.json
    assert_page(body)
    assert [b["start_time"] for b in body["data"]] == [start, start + 60, start + 120, start + 180]
    assert all(b["end_time"] == b["start_time"] + 60 for b in body["data"])
    assert body["has_more"] is False and body["next_page"] is None
    empty, used, _, current = body["data"]
    assert empty["results"] == []
    assert used["results"] == [{
        "object": "organization.usage.completions.result", "input_tokens": 37, "input_cached_tokens": 10,
        "input_uncached_tokens": 27, "output_tokens": 8, "num_model_requests": 2, "project_id": None,
        "user_id": None, "api_key_id": None, "model": None, "batch": None, "service_tier": None}]
    assert current["results"][0]["input_tokens"] == 5

    grouped = get(api, "completions", start_time=start, end_time=end, bucket_width="1m",
                  group_by=["project_id", "batch"]).json
    assert_page(grouped)
    rows = [(r["project_id"], r["batch"], r["input_tokens"]) for b in grouped["data"] for r in b["results"]]
    assert rows == [("proj_a", False, 30), ("proj_b", False, 7), ("proj_a", True, 5)]

    only_b = get(api, "completions", start_time=start, bucket_width="1m", project_ids="proj_b").json
    assert [r["input_tokens"] for b in only_b["data"] for r in b["results"]] == [7]
    by_alias = get(api, "completions", start_time=start, bucket_width="1m", **{"models[]": "gpt-4o-mini"}).json
    assert [r["input_tokens"] for b in by_alias["data"] for r in b["results"]] == [7], "an alias names its model"
    batch_only = get(api, "completions", start_time=start, bucket_width="1m", batch="true").json
    assert [r["num_model_requests"] for b in batch_only["data"] for r in b["results"]] == [1]

    # one page at a time, by the cursor
    seen, page, pages = [], None, 0
    while True:
        query = {"start_time": start, "end_time": end, "bucket_width": "1m", "limit": 3,
                 **({"page": page} if page else {})}
        body = get(api, "completions", **query).json
        assert_page(body)
        seen += [b["start_time"] for b in body["data"]]
        pages += 1
        if not body["has_more"]:
            assert body["next_page"] is None
            break
        page = body["next_page"]
    assert pages == 2 and seen == [start, start + 60, start + 120, start + 180]

    hour = usage.bucket_start(now, 3600)
    hourly = get(api, "completions", start_time=minute - 120, bucket_width="1h").json
    assert hourly["data"][0]["start_time"] == usage.bucket_start(minute - 120, 3600), "aligned to the hour"
    assert sum(r["input_tokens"] for b in hourly["data"] for r in b["results"]) == 42
    daily = get(api, "completions", start_time=hour - 2 * DAY).json  # 1d by default
    assert [b["end_time"] - b["start_time"] for b in daily["data"]] == [DAY] * 3
    assert sum(r["num_model_requests"] for b in daily["data"] for r in b["results"]) == 3
    ended = get(api, "completions", start_time=start, end_time=start + 60, bucket_width="1m").json
    assert len(ended["data"]) == 1 and ended["data"][0]["results"] == []


def test_other_categories_answer_their_own_result(api, redis_db):
    now = int(time.time())
    record(redis_db, [
        usage_of(project="proj_a", kind="embedding", model="all-minilm-l6-v2", request={},
                 result={"usage": {"prompt_tokens": 9}}),
        usage_of(project="proj_a", kind="image", model="tiny-diffusion", request={"size": "256x256"},
                 result={"data": [{}, {}]}),
        usage_of(project="proj_a", kind="image_edit", model="tiny-diffusion", request={"size": "512x512"},
                 result={"data": [{}]}),
        usage_of(project="proj_a", kind="speech", model="piper-joe", request={"input": "Hello."}, result={}),
        usage_of(project="proj_a", kind="transcription", model="whisper-tiny-en", request={},
                 result={"text": "x", "usage": {"type": "duration", "seconds": 3}}),
    ], now)
    start = now - 60
    expected = {
        "embeddings": {"object": "organization.usage.embeddings.result", "input_tokens": 9, "num_model_requests": 1},
        "images": {"object": "organization.usage.images.result", "images": 3, "num_model_requests": 2,
                   "source": None, "size": None},
        "audio_speeches": {"object": "organization.usage.audio_speeches.result", "characters": 6,
                           "num_model_requests": 1},
        "audio_transcriptions": {"object": "organization.usage.audio_transcriptions.result", "seconds": 3,
                                 "num_model_requests": 1},
    }
    for operation, result in expected.items():
        body = get(api, operation, start_time=start, group_by="project_id").json
        assert_page(body)
        [found] = [r for b in body["data"] for r in b["results"]]
        assert found == {**result, "project_id": "proj_a", "user_id": None, "api_key_id": None, "model": None}
    images = get(api, "images", start_time=start, group_by=["source", "size"]).json
    assert [(r["source"], r["size"], r["images"]) for b in images["data"] for r in b["results"]] == [
        ("image.generation", "256x256", 2), ("image.edit", "512x512", 1)]
    edits = get(api, "images", start_time=start, sources="image.edit").json
    assert [r["images"] for b in edits["data"] for r in b["results"]] == [1]
    moderations = get(api, "moderations", start_time=start).json
    assert_page(moderations)
    assert moderations["data"] and all(b["results"] == [] for b in moderations["data"])


@pytest.mark.parametrize("query, param, code", [
    ({}, "start_time", "missing_required_parameter"),
    ({"start_time": "yesterday"}, "start_time", "invalid_type"),
    ({"start_time": 100, "bucket_width": "1w"}, "bucket_width", "invalid_value"),
    ({"start_time": 100, "bucket_width": "1m", "limit": 1441}, "limit", "integer_out_of_range"),
    ({"start_time": 100, "limit": 0}, "limit", "integer_out_of_range"),
    ({"start_time": 100, "end_time": 100}, "end_time", "invalid_value"),
    ({"start_time": 100, "group_by": "size"}, "group_by[0]", "invalid_value"),
    ({"start_time": 100, "api_key_ids": "key_1"}, "api_key_ids", "unsupported_parameter"),
    ({"start_time": 100, "batch": "maybe"}, "batch", "invalid_type"),
    ({"start_time": 100, "page": "page_nonsense"}, "page", "invalid_value"),
])
def test_a_bad_query_is_a_400_naming_its_parameter(api, query, param, code):
    answer = get(api, "completions", **query)
    assert answer.status_code == 400, answer.text
    error = answer.json["error"]
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")


def test_a_page_of_another_query_is_refused(api):
    now = int(time.time())
    body = get(api, "embeddings", start_time=now - 600, bucket_width="1m", limit=2).json
    assert body["has_more"]
    hourly = get(api, "embeddings", start_time=now - 600, bucket_width="1h", page=body["next_page"])
    assert hourly.status_code == 400 and hourly.json["error"]["param"] == "page"


def test_usage_needs_an_owner_key(redis_server, redis_db):
    keystore = KeyStore(redis_db)
    member = keystore.create("alpha", name="m")[0]
    owner = keystore.create("ops", role=OWNER, name="o")[0]
    client = _app(redis_server).test_client()
    refused = get(client, "completions", headers={"Authorization": f"Bearer {member}"}, start_time=0)
    assert refused.status_code == 403 and refused.json["error"]["code"] == "insufficient_permissions"
    assert get(client, "completions", start_time=0).status_code == 401
    assert get(client, "images", headers={"Authorization": f"Bearer {owner}"},
               start_time=int(time.time())).status_code == 200


# --- a known workload on the shared service ------------------------------------------------------


@pytest.fixture(scope="module")
def service(stack):
    return stack


@pytest.fixture(scope="module")
def store(service):
    with redis.Redis.from_url(service.redis.url, decode_responses=True) as client:
        yield client


@pytest.fixture(scope="module")
def keys(service, store):
    """{name: secret}"""
    with project_keys(service.base_url, store, {"one": ("usage-one", MEMBER), "two": ("usage-two", MEMBER),
                                                "owner": ("usage-ops", OWNER)}) as made:
        yield made


@pytest.fixture(scope="module")
def http(service, keys):
    clients = {name: httpx.Client(base_url=service.base_url, headers={"Authorization": f"Bearer {secret}"},
                                  timeout=180) for name, secret in keys.items()}
    yield clients
    for client in clients.values():
        client.close()


def _batch(client: httpx.Client, endpoint: str, bodies: list[dict]) -> list[dict]:
    """Run one batch to completion; its output lines' response bodies."""
    data = b"".join(json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": endpoint, "body": body}).encode()
                    + b"\n" for i, body in enumerate(bodies))
    file_id = client.post("/v1/files", files={"file": ("usage.jsonl", data)}, data={"purpose": "batch"}).json()["id"]
    batch = client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": endpoint,
                                             "completion_window": "24h"})
    assert batch.status_code == 200, batch.text
    batch_id = batch.json()["id"]
    done = wait_until(lambda: (found := client.get(f"/v1/batches/{batch_id}").json())["status"] in
                      ("completed", "failed", "cancelled", "expired") and found, 300, "the batch to finish")
    assert done["status"] == "completed" and done["request_counts"]["failed"] == 0, done
    lines = [json.loads(line) for line in client.get(f"/v1/files/{done['output_file_id']}/content").text.splitlines()]
    return [line["response"]["body"] for line in lines]


def _sum(operation: str, owner: httpx.Client, start: int, project: str, **query) -> dict:
    """Every number of every result of `operation` for `project` since `start`, added up over all pages."""
    sums: dict = {}
    page = None
    while True:
        params = {"start_time": start, "bucket_width": "1h", "project_ids": project, **query,
                  **({"page": page} if page else {})}
        answer = owner.get(f"/v1/organization/usage/{operation}", params=params)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        for bucket in body["data"]:
            for result in bucket["results"]:
                for name, value in result.items():
                    if isinstance(value, int) and not isinstance(value, bool):
                        sums[name] = sums.get(name, 0) + value
        if not body["has_more"]:
            return sums
        page = body["next_page"]


def _project_id(owner: httpx.Client, name: str) -> str:
    projects = owner.get("/v1/organization/projects").json()["data"]
    return next(project["id"] for project in projects if project["name"] == name)


def test_usage_equals_the_sum_of_the_responses_usage(http, service):
    one, two, owner = http["one"], http["two"], http["owner"]
    start = int(time.time()) - 5
    project_one, project_two = _project_id(owner, "usage-one"), _project_id(owner, "usage-two")
    chats = [one.post("/v1/chat/completions", json={
        "model": CHAT, "max_tokens": n, "temperature": 0,
        "messages": [{"role": "user", "content": f"Count to {n}."}]}) for n in (3, 5, 7)]
    assert all(answer.status_code == 200 for answer in chats), [a.text for a in chats]
    chat_usage = [answer.json()["usage"] for answer in chats]
    streamed = one.post("/v1/chat/completions", json={
        "model": CHAT, "max_tokens": 4, "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "Say hi."}]})
    events = [json.loads(line[6:]) for line in streamed.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    chat_usage.append(next(event["usage"] for event in events if event.get("usage")))
    completion = one.post("/v1/completions", json={"model": CHAT, "prompt": "Once upon", "max_tokens": 3})
    assert completion.status_code == 200, completion.text
    chat_usage.append(completion.json()["usage"])
    embeddings = [one.post("/v1/embeddings", json={"model": EMBEDDING_MODEL, "input": text}).json()["usage"]
                  for text in ("one sentence", ["two", "sentences and more words"])]
    image = one.post("/v1/images/generations", json={"model": "tiny-diffusion", "prompt": "a red square",
                                                     "size": "256x256", "n": 2})
    assert image.status_code == 200 and len(image.json()["data"]) == 2, image.text
    speech_text = "The quick brown fox."
    speech = one.post("/v1/audio/speech", json={"model": "tts-1", "voice": "alloy", "input": speech_text,
                                                "response_format": "wav"})
    assert speech.status_code == 200
    audio = ("fox.wav", speech.content, "audio/wav")
    transcribed = one.post("/v1/audio/transcriptions", files={"file": audio}, data={"model": "whisper-1"})
    assert transcribed.status_code == 200, transcribed.text
    seconds = transcribed.json()["usage"]["seconds"]
    assert seconds >= 1
    as_text = one.post("/v1/audio/transcriptions", files={"file": audio},
                       data={"model": "whisper-1", "response_format": "text"})
    assert as_text.status_code == 200 and "usage" not in as_text.text, "a text answer carries no usage"
    batch_embeddings = [body["usage"] for body in _batch(one, "/v1/embeddings", [
        {"model": EMBEDDING_MODEL, "input": f"batch sentence {i}"} for i in range(3)])]
    batch_chats = [body["usage"] for body in _batch(one, "/v1/chat/completions", [
        {"model": CHAT, "max_tokens": 3, "messages": [{"role": "user", "content": f"Name {i} colors."}]}
        for i in range(2)])]
    other = two.post("/v1/chat/completions", json={"model": CHAT, "max_tokens": 2,
                                                   "messages": [{"role": "user", "content": "Hello"}]})
    assert other.status_code == 200

    every_chat = chat_usage + batch_chats
    expected = {
        "completions": {"input_tokens": sum(u["prompt_tokens"] for u in every_chat),
                        "output_tokens": sum(u["completion_tokens"] for u in every_chat),
                        "input_cached_tokens": sum(u["prompt_tokens_details"]["cached_tokens"] for u in every_chat),
                        "num_model_requests": len(every_chat)},
        "embeddings": {"input_tokens": sum(u["prompt_tokens"] for u in embeddings + batch_embeddings),
                       "num_model_requests": len(embeddings) + len(batch_embeddings)},
        "images": {"images": 2, "num_model_requests": 1},
        "audio_speeches": {"characters": len(speech_text), "num_model_requests": 1},
        "audio_transcriptions": {"seconds": 2 * seconds, "num_model_requests": 2},
    }

    def matches() -> bool:  # recorded after each answer went out: wait for the last ones
        return all({k: _sum(op, owner, start, project_one).get(k) for k in want} == want
                   for op, want in expected.items())

    try:
        wait_until(matches, 30, "the usage to add up")
    finally:
        found = {op: _sum(op, owner, start, project_one) for op in expected}
    for operation, want in expected.items():
        assert {k: found[operation].get(k) for k in want} == want, (operation, found[operation])

    batch_only = _sum("completions", owner, start, project_one, batch="true")
    assert batch_only["input_tokens"] == sum(u["prompt_tokens"] for u in batch_chats)
    assert batch_only["num_model_requests"] == 2
    minutes = _sum("completions", owner, start - 60, project_one, bucket_width="1m", limit=5)
    assert minutes["input_tokens"] == expected["completions"]["input_tokens"], "1m buckets add up the same"
    daily = _sum("completions", owner, start, project_one, bucket_width="1d")
    assert daily["output_tokens"] == expected["completions"]["output_tokens"]

    wait_until(lambda: _sum("completions", owner, start, project_two).get("num_model_requests") == 1, 30,
               "project two's request to be recorded")
    two_only = _sum("completions", owner, start, project_two)
    assert two_only["input_tokens"] == other.json()["usage"]["prompt_tokens"], "another project's usage is its own"
    assert two_only["output_tokens"] == other.json()["usage"]["completion_tokens"]
    grouped = owner.get("/v1/organization/usage/completions", params={
        "start_time": start, "bucket_width": "1d", "group_by": ["project_id", "batch"],
        "project_ids": [project_one, project_two]}).json()
    rows = {(r["project_id"], r["batch"]): r["num_model_requests"] for b in grouped["data"] for r in b["results"]}
    assert rows == {(project_one, False): 5, (project_one, True): 2, (project_two, False): 1}

    refused = one.get("/v1/organization/usage/completions", params={"start_time": start})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "insufficient_permissions"

    scraped = httpx.get(service.base_url + "/metrics").text
    values = {(sample.name, frozenset(sample.labels.items())): sample.value
              for family in text_string_to_metric_families(scraped) for sample in family.samples}
    assert values[("localq_project_requests_total", frozenset({("project", project_one),
                                                               ("kind", "completions")}))] == 7
    assert values[("localq_project_batch_lines_total", frozenset({("project", project_one),
                                                                  ("kind", "embeddings")}))] == 3
    assert values[("localq_project_images_total", frozenset({("project", project_one),
                                                             ("model", "tiny-diffusion")}))] == 2
    assert values[("localq_project_tokens_total", frozenset({("project", project_two), ("model", CHAT),
                                                             ("direction", "output")}))] == \
        other.json()["usage"]["completion_tokens"]
    assert math.isclose(values[("localq_project_audio_seconds_total", frozenset({
        ("project", project_one), ("model", "whisper-tiny-en")}))], 2 * seconds)
