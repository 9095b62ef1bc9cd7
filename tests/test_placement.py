"""Placement on a simulated two-GPU machine, through the real API, launcher and Celery workers.

`localq worker --gpus all --cpu 1` with LOCALQ_SIMULATE_GPUS=2 (tests only: the "GPU" workers run
their models on the CPU) and the API, on an embedded Redis. The models (all small, real):

    embed-gpu0, embed-gpu0-b   MiniLM pinned to GPU 0 (`gpus: [0]`): queue gpu.0
    embed-gpu                  MiniLM on any GPU: queue gpu (affinity picks a holder)
    embed-cpu                  MiniLM on the CPU: queue cpu
    chat-gpu1                  SmolLM2 pinned to GPU 1: queue gpu.1

The GPU memory budget holds one MiniLM, not two, so a second model on a GPU evicts the first.
The API names on `GET /v1/jobs/{id}` the worker that ran each job; heartbeats show the rest.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import psutil
import pytest
import redis
import yaml
from openai import OpenAI

from ops.redis_server import RedisServer
from ops.stack import ServiceProcesses, wait_until
from tests import sse

REPO = Path(__file__).resolve().parent.parent
HOST = socket.gethostname()
GPU0, GPU1, CPU0 = f"gpu0@{HOST}", f"gpu1@{HOST}", f"cpu0@{HOST}"


def _minilm_bytes() -> int:
    """What the model cache counts for the packaged all-MiniLM-L6-v2 folder (its size on disk)."""
    from tasks.runtime import models_dir
    from workers.cache import model_size
    from workers.registry import ModelRegistry

    return model_size(ModelRegistry.load(models_dir()).resolve("text-embedding-3-small"))


MINILM_BYTES = _minilm_bytes()
BUDGET = int(MINILM_BYTES * 1.5)  # one MiniLM fits on a GPU, two do not


def minilm(name: str, **placement) -> dict:
    config = yaml.safe_load((REPO / "models" / "all-minilm-l6-v2.yaml").read_text())
    # loaded on demand only: a preload at start would put a model on each GPU before the tests look
    config.update(name=name, aliases=[], preload=False, **placement)
    return config


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("placement")
    models = tmp / "models"
    models.mkdir()
    configs = [minilm("embed-gpu0", device="gpu", gpus=[0]), minilm("embed-gpu0-b", device="gpu", gpus=[0]),
               minilm("embed-gpu", device="gpu"), minilm("embed-cpu", device="cpu")]
    chat = yaml.safe_load((REPO / "models" / "smollm2-135m-instruct.yaml").read_text())
    chat.update(name="chat-gpu1", device="gpu", gpus=[1], aliases=[])
    for config in [*configs, chat]:
        (models / f"{config['name']}.yaml").write_text(yaml.safe_dump(config))
    with RedisServer(tmp / "redis") as server:
        env = {**os.environ, "LOCALQ_REDIS_URL": server.url, "LOCALQ_SIMULATE_GPUS": "2:4GiB",
               "LOCALQ_MODELS_DIR": str(models), "LOCALQ_HEARTBEAT_INTERVAL": "0.5", "PYTHONUNBUFFERED": "1",
               # routing reads the heartbeats on every call: a view refreshed while the holder
               # was busy with the previous call would send the next one to the shared queue
               "LOCALQ_WORKERS_MAX_AGE": "0"}
        for name in ("CUDA_VISIBLE_DEVICES", "LOCALQ_MODEL_CACHE_BYTES"):
            env.pop(name, None)
        stack = ServiceProcesses(env=env, log_dir=tmp / "logs")
        log = tmp / "launcher.log"
        with open(log, "wb") as out:
            launcher = subprocess.Popen(
                [sys.executable, "-m", "ops.cli", "worker", "--gpus", "all", "--cpu", "1",
                 "--gpu-memory-budget", str(BUDGET)],
                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            stack.start_api()
            client = OpenAI(base_url=stack.base_url + "/v1", api_key="unused", timeout=120, max_retries=0)
            wait_until(lambda: {w["id"] for w in workers(stack)} == {GPU0, GPU1, CPU0}, 90,
                       f"three workers (launcher log:\n{log.read_text(errors='replace')})")
            yield stack, client, launcher, log
        finally:
            launcher.send_signal(signal.SIGTERM)
            try:
                launcher.wait(60)
            except subprocess.TimeoutExpired:
                launcher.kill()
            stack.stop()


def workers(stack) -> list[dict]:
    return httpx.get(stack.base_url + "/v1/workers", timeout=10).json()["data"]


def beat(stack, worker_id: str) -> dict:
    return next(w for w in workers(stack) if w["id"] == worker_id)


def ran_on(stack, client, model: str) -> str:
    """Embed once with `model`; the id of the worker that ran the job."""
    raw = client.embeddings.with_raw_response.create(model=model, input="where does this run?")
    job = httpx.get(f"{stack.base_url}/v1/jobs/{raw.headers['x-localq-job-id']}", timeout=10).json()
    assert job["status"] == "succeeded" and len(raw.parse().data[0].embedding) == 384
    return job["worker"]


def test_workers_report_their_devices(cluster):
    stack, *_ = cluster
    listed = {w["id"]: w for w in workers(stack)}
    assert (listed[GPU0]["device"], listed[GPU0]["gpu_index"], listed[GPU0]["cuda_visible_devices"]) == ("gpu", 0, "0")
    assert (listed[GPU1]["device"], listed[GPU1]["gpu_index"], listed[GPU1]["cuda_visible_devices"]) == ("gpu", 1, "1")
    assert (listed[CPU0]["device"], listed[CPU0]["gpu_index"], listed[CPU0]["cuda_visible_devices"]) == ("cpu", None, "")
    assert listed[GPU0]["memory_budget_bytes"] == listed[GPU1]["memory_budget_bytes"] == BUDGET
    assert "gpu.0" in listed[GPU0]["queues"] and "gpu.0" not in listed[GPU1]["queues"]
    assert all(w["simulated"] == (w["device"] == "gpu") for w in listed.values())


def test_each_job_lands_on_its_models_device(cluster):
    stack, client, *_ = cluster
    assert {ran_on(stack, client, "embed-gpu0") for _ in range(3)} == {GPU0}
    assert {ran_on(stack, client, "embed-cpu") for _ in range(3)} == {CPU0}
    chat = client.chat.completions.with_raw_response.create(
        model="chat-gpu1", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    job = httpx.get(f"{stack.base_url}/v1/jobs/{chat.headers['x-localq-job-id']}", timeout=10).json()
    assert job["worker"] == GPU1 and job["queue"] == "gpu.1"


def test_a_gpu_model_never_runs_on_the_cpu_and_sticks_to_the_gpu_holding_it(cluster):
    stack, client, *_ = cluster
    first = ran_on(stack, client, "embed-gpu")
    assert first in (GPU0, GPU1)
    # whenever the holder's heartbeat says it is idle with the model, a call goes to it rather
    # than to the shared queue (which the other GPU serves too)
    for _ in range(6):
        wait_until(lambda: (b := beat(stack, first)) and "embed-gpu" in b["loaded_models"] and not b["current_job"],
                   10, "the holder's heartbeat")
        assert ran_on(stack, client, "embed-gpu") == first
    other = GPU1 if first == GPU0 else GPU0
    assert "embed-gpu" not in beat(stack, other)["loaded_models"]
    assert "embed-gpu" not in beat(stack, CPU0)["loaded_models"]


def test_a_second_model_on_a_full_gpu_evicts_the_first(cluster):
    stack, client, *_ = cluster
    assert ran_on(stack, client, "embed-gpu0") == GPU0
    before = beat(stack, GPU0)["evictions"]
    assert ran_on(stack, client, "embed-gpu0-b") == GPU0
    wait_until(lambda: beat(stack, GPU0)["loaded_models"] == ["embed-gpu0-b"], 10, "gpu0's heartbeat after eviction")
    after = beat(stack, GPU0)
    assert after["evictions"] > before
    assert after["memory_used_bytes"] == MINILM_BYTES <= after["memory_budget_bytes"]
    assert ran_on(stack, client, "embed-gpu0") == GPU0  # and back: evicts embed-gpu0-b
    wait_until(lambda: beat(stack, GPU0)["loaded_models"] == ["embed-gpu0"], 10, "gpu0's heartbeat")


def test_localq_workers_prints_the_live_workers(cluster):
    stack, *_ = cluster
    done = subprocess.run([sys.executable, "-m", "ops.cli", "workers", "--json"], cwd=REPO, env=stack.env,
                          capture_output=True, text=True, timeout=60, check=True)
    assert {w["id"] for w in json.loads(done.stdout)} == {GPU0, GPU1, CPU0}
    table = subprocess.run([sys.executable, "-m", "ops.cli", "workers"], cwd=REPO, env={**stack.env, "COLUMNS": "250"},
                           capture_output=True, text=True, timeout=60, check=True).stdout
    for name in (GPU0, GPU1, CPU0, "embed-gpu0"):
        assert name in table


def test_a_killed_worker_is_restarted_and_its_job_redelivered_at_once(cluster):
    """SIGKILL gpu1's Celery main process mid-stream: the pool process dies with it, the launcher
    starts gpu1 again, the new gpu1 puts the unacknowledged job back on its queue, and the
    client's stream completes, long before the broker's visibility timeout (660 s)."""
    stack, client, launcher, log = cluster
    body = {"model": "chat-gpu1", "messages": [{"role": "user", "content": "Tell me a long story about the sea."}],
            "max_tokens": 160, "temperature": 0, "stream": True, "x-localai-extensions": {"ignore_eos": True}}
    chunks, job_ids, errors = [], [], []

    def read():
        try:
            with httpx.stream("POST", stack.base_url + "/v1/chat/completions", json=body, timeout=120) as response:
                job_ids.append(response.headers["x-localq-job-id"])
                chunks.extend(json.loads(event.data) for event in sse.events(response.iter_lines()) if not event.done)
        except Exception as err:  # noqa: BLE001 - reported by the assertions below
            errors.append(err)

    reader = threading.Thread(target=read)
    reader.start()
    wait_until(lambda: len(chunks) >= 5, 60, "the first tokens")
    main = next(p for p in psutil.Process(launcher.pid).children() if f"gpu1@{HOST}" in p.cmdline())
    main.send_signal(signal.SIGKILL)
    reader.join(120)
    assert not reader.is_alive() and not errors, errors
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    job = httpx.get(f"{stack.base_url}/v1/jobs/{job_ids[0]}", timeout=10).json()
    assert job["status"] == "succeeded" and job["worker"] == GPU1
    assert job["result"]["choices"][0]["message"]["content"] == text  # no token lost or sent twice
    from store.jobs import job_key

    records = redis.Redis.from_url(stack.env["LOCALQ_REDIS_URL"], decode_responses=True)
    assert records.hget(job_key(job_ids[0]), "attempts") == "2"  # delivered again, once
    restarted = next(p for p in psutil.Process(launcher.pid).children() if f"gpu1@{HOST}" in p.cmdline())
    assert restarted.pid != main.pid
