"""Job slots and batching engines of the workers (issue 12), as `GET /v1/workers`, `localq workers`
and `/metrics` show them: heartbeats written into a real Redis, read back through the real API
and CLI, the answer checked against the served document; a heartbeat from an older worker (no
slots, no engines) shows as one slot."""

from __future__ import annotations

import json

import httpx
import pytest
from openai import OpenAI

from api.settings import Settings
from ops.cli import main
from store import heartbeats
from store.worker_slots import with_slots
from tests.contract import Contract, upstream
from tests.service import wait_until
from tests.test_metrics import Scrape

ENGINE = {"parallel": 4, "running": 3, "waiting": 2, "steps": 120, "prompt_tokens": 400, "cached_tokens": 100,
          "generated_tokens": 900, "tokens_per_second": 37.5}
BATCHING = {  # a worker running three chat jobs at once on one engine, with a second engine idle
    "id": "gpu0@box", "hostname": "box", "pid": 7, "device": "gpu", "gpu_index": 0, "cuda_visible_devices": "0",
    "simulated": True, "pools": [], "queues": ["gpu"], "memory_budget_bytes": 0, "memory_used_bytes": 0,
    "loaded_models": ["chat", "small"], "evictions": 0, "current_job": "job_a", "current_job_model": "chat",
    "slots": 4, "slots_busy": 3,
    "running_jobs": [{"id": "job_a", "model": "chat"}, {"id": "job_b", "model": "chat"},
                     {"id": "job_c", "model": "chat"}],
    "engines": {"chat": ENGINE, "small": {**ENGINE, "parallel": 2, "running": 0, "waiting": 0, "steps": 5,
                                          "prompt_tokens": 0, "cached_tokens": 0, "generated_tokens": 7,
                                          "tokens_per_second": 0.0}},
    "jobs_done": 12, "started_at": 1,
}
OLDER = {  # a heartbeat from before slots: one job at a time, no engines
    "id": "cpu0@box", "hostname": "box", "pid": 8, "device": "cpu", "gpu_index": None, "cuda_visible_devices": None,
    "simulated": False, "pools": [], "queues": ["cpu"], "memory_budget_bytes": 0, "memory_used_bytes": 0,
    "loaded_models": ["embed"], "evictions": 0, "current_job": "job_old", "current_job_model": "embed",
    "jobs_done": 1, "started_at": 1,
}


@pytest.fixture
def store(redis_db):
    heartbeats.publish(redis_db, BATCHING, interval=30)
    heartbeats.publish(redis_db, OLDER, interval=30)
    return redis_db


@pytest.fixture
def api(redis_server, store):
    from api.app import create_app

    return create_app(Settings.from_env({"LOCALQ_REDIS_URL": redis_server.url})).test_client()


def test_the_worker_list_shows_slots_running_jobs_and_engines(api):
    response = api.get("/v1/workers")
    assert response.status_code == 200
    listed = response.get_json()
    workers = {worker["id"]: worker for worker in listed["data"]}
    batching, older = workers["gpu0@box"], workers["cpu0@box"]
    assert (batching["slots"], batching["slots_busy"]) == (4, 3)
    assert [job["id"] for job in batching["running_jobs"]] == ["job_a", "job_b", "job_c"]
    assert batching["current_job"] == "job_a" and batching["current_job_model"] == "chat"
    assert batching["engines"]["chat"] == ENGINE and batching["engines"]["small"]["generated_tokens"] == 7
    assert (older["slots"], older["slots_busy"], older["engines"]) == (1, 1, {})
    assert older["running_jobs"] == [{"id": "job_old", "model": "embed"}] and older["current_job"] == "job_old"
    served = Contract(api.get("/openapi.json").get_json(), "the served document")  # no undocumented property
    for contract in (served, upstream()):
        contract.assert_conforms("LocalqWorkerList", listed, "the worker list")


def test_an_idle_older_worker_has_one_free_slot_and_odd_fields_never_reach_the_answer(api, store):
    heartbeats.publish(store, {**OLDER, "current_job": None, "current_job_model": None}, interval=30)
    heartbeats.publish(store, {**BATCHING, "slots": "many", "slots_busy": -1, "running_jobs": [{"model": "x"}, 3],
                               "engines": {"chat": {**ENGINE, "running": None, "tokens_per_second": "fast"},
                                           "bad": [1]}}, interval=30)
    listed = api.get("/v1/workers").get_json()
    workers = {worker["id"]: worker for worker in listed["data"]}
    older, odd = workers["cpu0@box"], workers["gpu0@box"]
    assert (older["slots"], older["slots_busy"], older["running_jobs"], older["engines"]) == (1, 0, [], {})
    assert (odd["slots"], odd["slots_busy"], odd["running_jobs"]) == (1, 0, [])
    assert set(odd["engines"]) == {"chat"}
    assert odd["engines"]["chat"]["running"] == 0 and odd["engines"]["chat"]["tokens_per_second"] == 0.0
    Contract(api.get("/openapi.json").get_json(), "the served document").assert_conforms(
        "LocalqWorkerList", listed, "the worker list")


def test_with_slots_leaves_the_heartbeat_it_is_given_alone():
    beat = {"id": "w", "current_job": "j"}
    shown = with_slots(beat)
    assert beat == {"id": "w", "current_job": "j"}
    assert shown == {**beat, "slots": 1, "slots_busy": 1, "running_jobs": [{"id": "j", "model": None}],
                     "engines": {}}


def test_localq_workers_shows_slots_and_a_table_of_engines(redis_server, store, monkeypatch, capsys):
    monkeypatch.setenv("LOCALQ_REDIS_URL", redis_server.url)
    monkeypatch.setenv("COLUMNS", "300")
    assert main(["workers", "--json"]) == 0
    listed = {worker["id"]: worker for worker in json.loads(capsys.readouterr().out)}
    assert listed["cpu0@box"]["slots"] == 1 and listed["gpu0@box"]["engines"]["chat"] == ENGINE

    assert main(["workers"]) == 0
    out = capsys.readouterr().out
    workers, engines = out.split("batching engines")
    rows = {line.split("│")[1].strip(): line for line in workers.splitlines() if "@box" in line}
    assert "3 / 4" in rows["gpu0@box"] and "job_a" in rows["gpu0@box"]
    assert "1 / 1" in rows["cpu0@box"] and "job_old" in rows["cpu0@box"]
    assert "job_b" in workers and "job_c" in workers  # one running job a line
    cells = [[cell.strip() for cell in line.split("│")[1:-1]] for line in engines.splitlines() if "@box" in line]
    assert cells == [["gpu0@box", "chat", "3 / 4", "2", "37.5", "900", "100 / 400 (25%)"],
                     ["gpu0@box", "small", "0 / 2", "0", "0.0", "7", "0 / 0"]]


def test_localq_workers_prints_no_engine_table_without_engines(redis_server, redis_db, monkeypatch, capsys):
    heartbeats.publish(redis_db, OLDER, interval=30)
    monkeypatch.setenv("LOCALQ_REDIS_URL", redis_server.url)
    monkeypatch.setenv("COLUMNS", "300")
    assert main(["workers"]) == 0
    out = capsys.readouterr().out
    assert "cpu0@box" in out and "1 / 1" in out and "batching engines" not in out


def test_metrics_show_slots_per_worker_and_engines_per_worker_and_model(api):
    scraped = Scrape(api.get("/metrics").get_data(as_text=True))
    value = scraped.value
    assert value("localq_worker_slots", worker="gpu0@box") == 4
    assert value("localq_worker_slots_busy", worker="gpu0@box") == 3
    assert value("localq_worker_slots", worker="cpu0@box") == 1
    assert value("localq_worker_slots_busy", worker="cpu0@box") == 1
    chat = {"worker": "gpu0@box", "model": "chat"}
    assert value("localq_engine_running_sequences", **chat) == 3
    assert value("localq_engine_waiting_sequences", **chat) == 2
    assert value("localq_engine_tokens_per_second", **chat) == 37.5
    assert value("localq_engine_generated_tokens_total", **chat) == 900
    assert value("localq_engine_prompt_tokens_total", **chat) == 400
    assert value("localq_engine_cached_tokens_total", **chat) == 100
    assert value("localq_engine_steps_total", **chat) == 120
    assert value("localq_engine_generated_tokens_total", worker="gpu0@box", model="small") == 7
    assert scraped.labels("localq_engine_running_sequences", "worker") == {"gpu0@box"}  # the older one has none
    types = {name: scraped.types[name] for name in (
        "localq_worker_slots", "localq_worker_slots_busy", "localq_engine_running_sequences",
        "localq_engine_waiting_sequences", "localq_engine_tokens_per_second", "localq_engine_generated_tokens",
        "localq_engine_prompt_tokens", "localq_engine_cached_tokens", "localq_engine_steps")}
    assert types == {**dict.fromkeys(types, "gauge"), "localq_engine_generated_tokens": "counter",
                     "localq_engine_prompt_tokens": "counter", "localq_engine_cached_tokens": "counter",
                     "localq_engine_steps": "counter"}


# ----- a real worker ---------------------------------------------------------------------------------


def test_a_real_worker_reports_its_slots_and_its_engine(stack):
    """On the session's shared service: after a chat job, the worker's engine for the chat model
    has generated tokens, in `/v1/workers` and in `/metrics` alike."""
    base = stack.base_url
    chat = OpenAI(base_url=base + "/v1", api_key="unused", timeout=180, max_retries=0)
    reply = chat.chat.completions.create(model="gpt-4o-mini", max_tokens=4, temperature=0, seed=1,
                                         messages=[{"role": "user", "content": "Say hi."}])
    assert reply.usage.completion_tokens > 0

    def engine():
        workers = httpx.get(base + "/v1/workers", timeout=10).json()["data"]
        engines = [(w, w["engines"]["smollm2-135m-instruct"]) for w in workers
                   if "smollm2-135m-instruct" in w["engines"]]
        return engines and engines[0][1]["generated_tokens"] >= reply.usage.completion_tokens and engines[0]

    worker, stats = wait_until(engine, 30, "a heartbeat with the chat model's engine")
    assert worker["slots"] >= stats["parallel"] >= 1 and 0 <= worker["slots_busy"] <= worker["slots"]
    assert stats["prompt_tokens"] >= reply.usage.prompt_tokens and stats["steps"] > 0
    scraped = Scrape(httpx.get(base + "/metrics", timeout=10).text)
    labels = {"worker": worker["id"], "model": "smollm2-135m-instruct"}
    assert scraped.value("localq_engine_generated_tokens_total", **labels) >= stats["generated_tokens"]
    assert scraped.value("localq_worker_slots", worker=worker["id"]) == worker["slots"]
