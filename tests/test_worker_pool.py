"""`localq worker --gpus all --cpu 1` for real: the launcher, Celery workers, Redis, a model.

Two simulated GPUs (LOCALQ_SIMULATE_GPUS=2, for tests only: their workers run models on the CPU)
and one CPU worker, against an embedded Redis. One launcher serves the module, in order:
(a) one worker process per device, each with its own CUDA_VISIBLE_DEVICES;
(b) gpu1's Celery main process SIGKILLed: the launcher starts it again, same name and environment;
(c) SIGTERM to the launcher while a job runs: the job finishes, the launcher exits 0, and the
    jobs still waiting are still in their Redis lists, not lost.
The jobs are chats on SmolLM2 pinned to GPU 1 (`device: gpu`, `gpus: [1]`), so they travel the
pinned queue gpu.1 to the (simulated) GPU 1 worker.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import yaml

from ops.redis_server import RedisServer
from ops.stack import wait_until

REPO = Path(__file__).resolve().parent.parent
HOST = socket.gethostname()
MODEL = "pinned-chat"
SLOTS = 2  # the pinned model's `parallel`: gpu1 runs two jobs at once (a threads pool of 2)
JOBS = 4
MESSAGES = [{"role": "user", "content": "Tell me a long story about the sea."}]


@dataclass
class Pool:
    launcher: subprocess.Popen
    redis: RedisServer
    env: dict
    log: Path
    models: Path

    def workers(self) -> dict[str, psutil.Process]:
        """The launcher's Celery worker processes (their main processes), by node name."""
        found = {}
        for child in psutil.Process(self.launcher.pid).children():
            try:
                argv = child.cmdline()
            except psutil.NoSuchProcess:
                continue
            if "celery" in argv and "--hostname" in argv:
                found[argv[argv.index("--hostname") + 1]] = child
        return found

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def option(process: psutil.Process, name: str) -> str:
    argv = process.cmdline()
    return argv[argv.index(name) + 1]


def environ_of(process: psutil.Process) -> dict[str, str]:
    return process.environ()  # /proc/<pid>/environ: what the process was started with


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pool")
    models = tmp / "models"
    models.mkdir()
    chat = yaml.safe_load((REPO / "models" / "smollm2-135m-instruct.yaml").read_text())
    chat.update(name=MODEL, device="gpu", gpus=[1], aliases=[], parallel=SLOTS)
    (models / f"{MODEL}.yaml").write_text(yaml.safe_dump(chat))
    with RedisServer(tmp / "redis") as server:
        env = {**os.environ, "LOCALQ_REDIS_URL": server.url, "LOCALQ_SIMULATE_GPUS": "2:2GiB",
               "LOCALQ_MODELS_DIR": str(models), "LOCALQ_JOB_TIMEOUT": "60", "PYTHONUNBUFFERED": "1"}
        for name in ("CUDA_VISIBLE_DEVICES", "LOCALQ_MODEL_CACHE_BYTES"):
            env.pop(name, None)
        log = tmp / "launcher.log"
        with open(log, "wb") as out:
            launcher = subprocess.Popen([sys.executable, "-m", "ops.cli", "worker", "--gpus", "all", "--cpu", "1"],
                                        cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        pool = Pool(launcher, server, env, log, models)
        try:
            yield pool
        finally:
            _stop(pool)


def _stop(pool: Pool) -> None:
    if pool.launcher.poll() is not None:
        return
    descendants = psutil.Process(pool.launcher.pid).children(recursive=True)
    pool.launcher.send_signal(signal.SIGTERM)
    try:
        pool.launcher.wait(90)
    except subprocess.TimeoutExpired:
        pool.launcher.kill()
        pool.launcher.wait()
    for process in descendants:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(scope="module")
def celery_app(pool):
    from tasks.celery_app import make_app
    from tasks.settings import QueueSettings

    app = make_app(QueueSettings.from_env(pool.env))
    yield app
    app.close()


def answers_ping(app, node: str) -> bool:
    return any(node in reply for reply in app.control.ping(destination=[node], timeout=1.0))


def test_one_worker_process_per_device(pool, celery_app):
    names = [f"gpu0@{HOST}", f"gpu1@{HOST}", f"cpu0@{HOST}"]
    workers = wait_until(lambda: (found := pool.workers()) and set(found) == set(names) and found, 60,
                         f"three workers (launcher log:\n{pool.log_text()})")
    expected = {f"gpu0@{HOST}": "0", f"gpu1@{HOST}": "1", f"cpu0@{HOST}": ""}
    for name, process in workers.items():
        env = environ_of(process)
        assert env["CUDA_VISIBLE_DEVICES"] == expected[name], name
        assert env["LOCALQ_WORKER_DEVICE"] == name[:3]
        assert env.get("LOCALQ_SIMULATED_GPU") == ("1" if name.startswith("gpu") else None)
        assert int(env["LOCALQ_MODEL_CACHE_BYTES"]) > 0
        if name == f"gpu1@{HOST}":  # the only worker serving a text model: a slot per sequence it batches
            assert option(process, "--concurrency") == str(SLOTS) and option(process, "--pool") == "threads"
        else:
            assert option(process, "--concurrency") == "1" and option(process, "--pool") == "prefork"
    assert option(workers[f"gpu1@{HOST}"], "--queues").split(",") == ["gpu", "gpu.1", f"worker.gpu1@{HOST}"]
    assert option(workers[f"cpu0@{HOST}"], "--queues").split(",") == ["cpu", f"worker.cpu0@{HOST}"]
    assert len({process.pid for process in workers.values()}) == 3
    for name in names:
        wait_until(lambda: answers_ping(celery_app, name), 60, f"{name} to answer a ping")


def test_a_killed_worker_is_restarted_with_the_same_environment(pool, celery_app):
    name = f"gpu1@{HOST}"
    old = wait_until(lambda: pool.workers().get(name), 60, name)
    old_pool_processes, old_argv = old.children(recursive=True), old.cmdline()
    old.send_signal(signal.SIGKILL)
    new = wait_until(lambda: (w := pool.workers().get(name)) and w.pid != old.pid and w, 30,
                     f"{name} restarted (launcher log:\n{pool.log_text()})")
    assert environ_of(new)["CUDA_VISIBLE_DEVICES"] == "1"
    assert environ_of(new)["LOCALQ_GPU_INDEX"] == "1"
    assert new.cmdline() == old_argv
    # nothing of the killed worker lives on to run a job twice
    wait_until(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in old_pool_processes),
               10, "the killed worker's pool processes to be gone")
    wait_until(lambda: answers_ping(celery_app, name), 60, f"the restarted {name} to answer a ping")
    assert f"{name} (pid {old.pid}) was killed by SIGKILL" in pool.log_text()
    assert pool.launcher.poll() is None


def test_localq_workers_shows_each_workers_device(pool, celery_app):
    """What the launcher gave each worker comes back in its heartbeat, and `localq workers` shows it."""
    import json

    def listed():
        done = subprocess.run([sys.executable, "-m", "ops.cli", "workers", "--json"], cwd=REPO, env=pool.env,
                              capture_output=True, text=True, timeout=30, check=True)
        beats = {beat["id"]: beat for beat in json.loads(done.stdout)}
        return len(beats) == 3 and beats

    beats = wait_until(listed, 30, "three heartbeats")
    gpu1, cpu0 = beats[f"gpu1@{HOST}"], beats[f"cpu0@{HOST}"]
    assert (gpu1["device"], gpu1["gpu_index"], gpu1["cuda_visible_devices"], gpu1["simulated"]) == ("gpu", 1, "1", True)
    assert "gpu.1" in gpu1["queues"] and gpu1["memory_budget_bytes"] == int(2 * 1024**3 * 0.9)
    assert (cpu0["device"], cpu0["cuda_visible_devices"], cpu0["simulated"]) == ("cpu", "", False)
    assert beats[f"gpu0@{HOST}"]["cuda_visible_devices"] == "0"


def test_sigterm_drains_running_jobs_and_keeps_queued_ones(pool, celery_app, monkeypatch):
    from tasks import dispatch
    from tasks.routing import model_queue
    from tasks.runtime import connect
    from tasks.settings import QueueSettings

    monkeypatch.setattr(dispatch, "app", celery_app)  # send on this module's Redis
    rt = connect(QueueSettings.from_env(pool.env))
    queue = model_queue("gpu", (1,))
    assert queue == "gpu.1"
    wait_until(lambda: answers_ping(celery_app, f"gpu1@{HOST}"), 60, "gpu1 to answer a ping")
    request = {"model": MODEL, "messages": MESSAGES, "max_tokens": 200, "temperature": 0,
               "x-localai-extensions": {"ignore_eos": True}}
    jobs = [dispatch.submit(rt, kind="chat", model=MODEL, queue=queue, request=request, attached=False)["id"]
            for _ in range(JOBS)]

    def status(job_id):
        return rt.jobs.get(job_id)["status"]

    running = wait_until(lambda: len(r := [j for j in jobs if status(j) == "running"]) == SLOTS and r, 60,
                         f"a job in each slot (launcher log:\n{pool.log_text()})")
    # a worker with 2 free slots holds 2 messages, no more: the other jobs wait in Redis for any worker
    assert rt.redis.hlen("unacked") == SLOTS
    assert sum(rt.redis.llen(key) for key in dispatch.queue_keys(queue)) == JOBS - SLOTS
    workers = pool.workers()
    pool.launcher.send_signal(signal.SIGTERM)
    assert pool.launcher.wait(90) == 0, pool.log_text()

    statuses = {job_id: status(job_id) for job_id in jobs}
    assert all(statuses[job_id] == "succeeded" for job_id in running), statuses
    assert rt.jobs.get(running[0]).get("result"), "the running job finished with its result"
    waiting = [job_id for job_id, value in statuses.items() if value == "queued"]
    assert set(statuses.values()) <= {"succeeded", "queued"}, statuses
    assert waiting, f"every job ran before the stop; nothing left to check: {statuses}"
    # every job not run is still on its queue in Redis, and nothing is held unacknowledged
    assert len(waiting) == JOBS - SLOTS  # a worker holds no more messages than it has slots
    assert sum(rt.redis.llen(key) for key in dispatch.queue_keys(queue)) == len(waiting)
    assert rt.redis.hlen("unacked") == 0
    assert not any(process.is_running() for process in workers.values())
    assert "Warm shutdown" in pool.log_text()
    rt.redis.close()
