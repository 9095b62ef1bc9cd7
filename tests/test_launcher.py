"""The worker launcher (ops/launcher.py): what each worker process gets (name, queues, environment,
budget), restart backoff, supervision with stand-in processes, the `localq worker` modes, and
`localq workers`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ops import launcher
from ops.cli import main
from ops.commands import worker as worker_command
from ops.common import worker_argv
from ops.gpus import GIB, Gpu, simulated_gpus
from ops.launcher import Launcher, child_argv, child_environment, plan_workers, unserved_queues
from ops.stack import wait_until
from ops.supervisor import Backoff
from workers.config import ModelConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST = "box"


def config(name, device="cpu", gpus=(), pool=None):
    return ModelConfig(name=name, source=Path(f"{name}.yaml"), created=0, model_file=None, device=device,
                       gpus=tuple(gpus), pool=pool)


CONFIGS = [config("chat"), config("big", "gpu"), config("pinned", "gpu", [1]), config("pair", "gpu", [0, 1]),
           config("far", "gpu", [2, 3]), config("nightly", "cpu", pool="batch")]
TWO_GPUS = [Gpu(0, "NVIDIA L4", 24 * GIB), Gpu(1, "NVIDIA L4", 24 * GIB)]


def by_name(specs):
    return {spec.name: spec for spec in specs}


# --- what each worker gets -------------------------------------------------------------------


def test_one_worker_per_gpu_and_n_cpu_workers_with_their_queues():
    specs = plan_workers(TWO_GPUS, 2, pools=["batch"], configs=CONFIGS, hostname=HOST, total_memory=100 * GIB)
    assert [spec.name for spec in specs] == ["gpu0@box", "gpu1@box", "cpu0@box", "cpu1@box"]
    specs = by_name(specs)
    assert specs["gpu0@box"].queues == ("gpu", "gpu.0", "gpu.0-1", "gpu.pool.batch", "worker.gpu0@box")
    # the model pinned with `gpus: [1]` (queue gpu.1) is served by GPU 1's worker alone
    assert specs["gpu1@box"].queues == ("gpu", "gpu.1", "gpu.0-1", "gpu.pool.batch", "worker.gpu1@box")
    assert specs["cpu1@box"].queues == ("cpu", "cpu.pool.batch", "worker.cpu1@box")
    assert [spec.device for spec in specs.values()] == ["gpu", "gpu", "cpu", "cpu"]
    assert specs["gpu1@box"].label == "gpu1"
    # gpu.2-3 has no worker here (another machine may have one); the launcher says so
    assert unserved_queues(list(specs.values()), CONFIGS) == {"gpu.2-3": ["far"]}


def test_worker_environments():
    specs = by_name(plan_workers(TWO_GPUS, 1, pools=["batch", "nightly"], hostname=HOST, total_memory=10 * GIB))
    gpu1, cpu0 = specs["gpu1@box"].env, specs["cpu0@box"].env
    assert gpu1 == {
        "CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID", "LOCALQ_WORKER_DEVICE": "gpu",
        "LOCALQ_GPU_INDEX": "1", "LOCALQ_MODEL_CACHE_BYTES": str(int(24 * GIB * 0.9)),
        "LOCALQ_WORKER_POOLS": "batch,nightly",
    }
    assert cpu0 == {
        "CUDA_VISIBLE_DEVICES": "", "CUDA_DEVICE_ORDER": "PCI_BUS_ID", "LOCALQ_WORKER_DEVICE": "cpu",
        "LOCALQ_MODEL_CACHE_BYTES": str(int(10 * GIB * 0.7)), "LOCALQ_WORKER_POOLS": "batch,nightly",
    }
    simulated = plan_workers(simulated_gpus("1:2GiB"), 0, hostname=HOST)[0]
    assert simulated.env["LOCALQ_SIMULATED_GPU"] == "1" and simulated.env["CUDA_VISIBLE_DEVICES"] == "0"
    assert "LOCALQ_SIMULATED_GPU" not in gpu1


def test_child_environment_replaces_what_the_launcher_decides():
    spec = by_name(plan_workers(TWO_GPUS, 1, hostname=HOST, total_memory=GIB))["gpu0@box"]
    inherited = {"PATH": "/bin", "LOCALQ_REDIS_URL": "redis://r", "CUDA_VISIBLE_DEVICES": "3",
                 "LOCALQ_SIMULATED_GPU": "1", "LOCALQ_GPU_INDEX": "7", "LOCALQ_MODEL_CACHE_BYTES": "5"}
    env = child_environment(spec, inherited)
    assert env["PATH"] == "/bin" and env["LOCALQ_REDIS_URL"] == "redis://r" and env["PYTHONUNBUFFERED"] == "1"
    assert env["CUDA_VISIBLE_DEVICES"] == "0" and env["LOCALQ_GPU_INDEX"] == "0"
    assert "LOCALQ_SIMULATED_GPU" not in env  # a real GPU
    cpu = child_environment(by_name(plan_workers([], 1, hostname=HOST, total_memory=GIB))["cpu0@box"],
                            inherited)
    assert cpu["CUDA_VISIBLE_DEVICES"] == "" and "LOCALQ_GPU_INDEX" not in cpu


def test_memory_budgets():
    gpus = [Gpu(0, "A", 10 * GIB), Gpu(1, "B", 0)]  # B: nvidia-smi said [N/A]
    specs = by_name(plan_workers(gpus, 4, hostname=HOST, total_memory=40 * GIB))
    assert specs["gpu0@box"].memory_budget == 9 * GIB
    assert "LOCALQ_MODEL_CACHE_BYTES" not in specs["gpu1@box"].env  # unknown memory: no limit, not zero
    assert specs["cpu3@box"].memory_budget == int(40 * GIB * 0.7 / 4)
    flagged = by_name(plan_workers(gpus, 2, hostname=HOST, gpu_memory_budget=3 * GIB, cpu_memory_budget=GIB,
                                   total_memory=40 * GIB, inherited_budget=1234))
    assert flagged["gpu1@box"].env["LOCALQ_MODEL_CACHE_BYTES"] == str(3 * GIB)
    assert flagged["cpu0@box"].env["LOCALQ_MODEL_CACHE_BYTES"] == str(GIB)
    assert flagged["cpu0@box"].budget_source == "--cpu-memory-budget"
    # an LOCALQ_MODEL_CACHE_BYTES already in the environment counts where no flag says otherwise
    inherited = by_name(plan_workers(gpus, 1, hostname=HOST, cpu_memory_budget=GIB,
                                     inherited_budget=1234))
    assert inherited["gpu0@box"].memory_budget == 1234 and inherited["cpu0@box"].memory_budget == GIB


def test_cpu_budget_defaults_to_a_share_of_this_machines_ram():
    import psutil

    [spec] = plan_workers([], 1, hostname=HOST)
    assert spec.memory_budget == int(psutil.virtual_memory().total * 0.7)


def test_child_argv_is_a_one_job_prefork_celery_worker_with_a_spelled_out_name():
    spec = plan_workers(TWO_GPUS[1:], 0, configs=CONFIGS)[0]
    argv = child_argv(spec, "info")
    assert argv == worker_argv(",".join(spec.queues), 1, spec.name, "prefork", "info")
    joined = " ".join(argv)
    host = __import__("socket").gethostname()
    for part in (f"--hostname gpu1@{host}", "--pool prefork", "--concurrency 1", "--prefetch-multiplier 1",
                 "--without-gossip", "--without-mingle", f"--queues gpu,gpu.1,gpu.0-1,worker.gpu1@{host}"):
        assert part in joined
    assert "%h" not in joined


def test_backoff_doubles_to_a_cap_and_resets_after_a_minute_up():
    backoff = Backoff()
    assert [backoff.next_delay(0.5) for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert backoff.next_delay(60.0) == 1  # it had run for a minute: a fresh failure
    assert backoff.next_delay(5.0) == 2


# --- supervision, with stand-ins for the Celery workers ----------------------------------------

STANDIN = r"""
import os, signal, sys, time
stubborn = os.environ.get("STANDIN_STUBBORN") == "1"
def on_term(signum, frame):
    if stubborn:
        return
    print("warm shutdown", flush=True)
    time.sleep(0.2)  # a job finishing
    sys.exit(0)
def on_quit(signum, frame):
    print("cold shutdown", flush=True)
    sys.exit(3)
signal.signal(signal.SIGTERM, on_term)
signal.signal(signal.SIGQUIT, on_quit)
print("up", repr(os.environ["CUDA_VISIBLE_DEVICES"]), os.environ["LOCALQ_WORKER_DEVICE"], flush=True)
while True:
    time.sleep(0.05)
"""


class Lines:
    def __init__(self):
        self.lines: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, data: bytes) -> None:
        with self.lock:
            self.lines.append(data.decode())

    def count(self, text: str) -> int:
        with self.lock:
            return sum(text in line for line in self.lines)


def standin_launcher(stubborn=False, **options):
    specs = plan_workers(simulated_gpus("2"), 1, hostname=HOST, total_memory=GIB)
    output = Lines()
    base = {**os.environ, "STANDIN_STUBBORN": "1" if stubborn else "0"}
    options = {"stop_timeout": 30.0, "poll_interval": 0.02, "backoff": lambda: Backoff(0.05, 0.2, 60.0), **options}
    return Launcher(specs, command=lambda spec: [sys.executable, "-c", STANDIN], output=output, base_env=base,
                    **options), output


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def test_a_worker_that_dies_is_restarted_with_its_name_and_environment():
    runner, output = standin_launcher()
    runner.start()
    try:
        wait_until(lambda: output.count("up ") == 3, 20, "three stand-ins")
        assert output.count("gpu1 | up '1' gpu") == 1 and output.count("cpu0 | up '' cpu") == 1
        gpu1 = runner.children[1]
        old_pid = gpu1.process.pid
        os.kill(old_pid, signal.SIGKILL)

        def restarted():
            runner.supervise()
            return gpu1.process is not None and gpu1.process.pid != old_pid and output.count("gpu1 | up '1'") == 2

        wait_until(restarted, 20, "gpu1 restarted")
        assert gpu1.starts == 2 and gpu1.program.title == "gpu1@box"
        assert environ_of(gpu1.process.pid)["CUDA_VISIBLE_DEVICES"] == "1"
        assert gpu1.backoff.delay == 0.05
        assert [child.starts for child in runner.children] == [1, 2, 1]
    finally:
        runner.stop()
    assert not any(child.running for child in runner.children)
    assert output.count("warm shutdown") == 3


def test_run_stops_every_worker_warmly_on_request():
    runner, output = standin_launcher()
    threading.Thread(target=lambda: (wait_until(lambda: output.count("up ") == 3, 20, "stand-ins"),
                                     runner.request_stop()), daemon=True).start()
    assert runner.run() == 0
    assert output.count("warm shutdown") == 3
    assert all(child.process is None and not child.running for child in runner.children)


def test_stragglers_are_killed_after_the_stop_timeout():
    runner, output = standin_launcher(stubborn=True, stop_timeout=0.5)
    runner.start()
    wait_until(lambda: output.count("up ") == 3, 20, "three stand-ins")
    pids = [child.process.pid for child in runner.children]
    stopper = threading.Thread(target=runner.stop, daemon=True)
    stopper.start()
    stopper.join(60)  # a hang guard: stand-ins that ignore SIGTERM would keep a stop without a timeout forever
    assert not stopper.is_alive(), "the stop did not give up on stragglers"
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_a_second_stop_request_turns_the_warm_shutdown_cold():
    runner, output = standin_launcher(stubborn=True)
    runner.start()
    wait_until(lambda: output.count("up ") == 3, 20, "three stand-ins")
    runner.request_stop()
    threading.Timer(0.3, runner.request_stop).start()
    runner.stop()
    assert output.count("cold shutdown") == 3  # SIGQUIT, not the SIGKILL at the 30 s stop timeout


SUPERVISOR = r"""
import sys
from ops.gpus import GIB, simulated_gpus
from ops.launcher import Launcher, plan_workers
specs = plan_workers(simulated_gpus("1"), 1, hostname="box", total_memory=GIB)
Launcher(specs, command=lambda spec: [sys.executable, "-c", sys.argv[1]]).run()
"""


def test_workers_die_with_a_launcher_killed_outright(tmp_path):
    import psutil

    log = tmp_path / "supervisor.log"
    with open(log, "wb") as out:
        supervisor = subprocess.Popen([sys.executable, "-c", SUPERVISOR, STANDIN], cwd=REPO_ROOT, stderr=out,
                                      start_new_session=True)
    try:
        def standins():
            found = [c for c in psutil.Process(supervisor.pid).children() if c.cmdline()[1:3] == ["-c", STANDIN]]
            return len(found) == 2 and log.read_text().count(" | up ") == 2 and found

        # both up and quiet from now on (a stand-in writing to its dead launcher's pipe would die of that)
        workers = wait_until(standins, 30, "two stand-in workers")
        supervisor.kill()
        supervisor.wait()

        def gone(process):
            try:
                return process.status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        wait_until(lambda: all(gone(process) for process in workers), 10, "the workers to follow their launcher")
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()


# --- `localq worker`: the launcher, or one Celery worker with -Q --------------------------------


@pytest.fixture
def launched(monkeypatch):
    """Run `localq worker ...` up to the launcher, recording it instead of running it."""
    seen = []

    def run(self):
        seen.append(self)
        return 0

    monkeypatch.setattr(launcher.Launcher, "run", run)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("LOCALQ_MODEL_CACHE_BYTES", raising=False)
    return seen


def test_localq_worker_runs_the_launcher(launched, monkeypatch, models_dir, write_model):
    write_model("pinned.yaml", {"name": "pinned", "device": "gpu", "gpus": [1]})
    monkeypatch.setenv("LOCALQ_SIMULATE_GPUS", "2:4GiB")
    monkeypatch.setenv("LOCALQ_JOB_TIMEOUT", "100")
    assert main(["--models-dir", str(models_dir), "worker", "--gpus", "1", "--cpu", "2", "--pool", "batch",
                 "--gpu-memory-budget", "1GiB", "-l", "info"]) == 0
    [runner] = launched
    host = __import__("socket").gethostname()
    assert [spec.name for spec in runner.specs] == [f"gpu1@{host}", f"cpu0@{host}", f"cpu1@{host}"]
    assert runner.specs[0].queues == ("gpu", "gpu.1", "gpu.pool.batch", f"worker.gpu1@{host}")
    gpu1 = runner.children[0].program
    assert gpu1.name == "gpu1" and gpu1.title == f"gpu1@{host}" and gpu1.group == "workers"
    assert gpu1.env["CUDA_VISIBLE_DEVICES"] == "1" and gpu1.env["LOCALQ_SIMULATED_GPU"] == "1"
    assert gpu1.env["LOCALQ_MODEL_CACHE_BYTES"] == str(GIB) and gpu1.env["LOCALQ_WORKER_POOLS"] == "batch"
    assert gpu1.env["LOCALQ_MODELS_DIR"] == str(models_dir.resolve())
    assert "--loglevel INFO" in " ".join(gpu1.argv)
    assert runner.stop_timeout == 130


def test_localq_worker_passes_an_inherited_cache_budget_on(launched, monkeypatch, capsys):
    monkeypatch.setenv("LOCALQ_SIMULATE_GPUS", "1:4GiB")
    monkeypatch.setenv("LOCALQ_MODEL_CACHE_BYTES", "1234")
    assert main(["worker"]) == 0
    assert [spec.memory_budget for spec in launched[0].specs] == [1234, 1234]
    monkeypatch.setenv("LOCALQ_MODEL_CACHE_BYTES", "lots")
    assert main(["worker"]) == 2  # refused before any worker starts
    assert "LOCALQ_MODEL_CACHE_BYTES" in capsys.readouterr().err
    assert len(launched) == 1


def test_a_malformed_worker_setting_stops_localq_worker_before_any_worker_starts(launched, monkeypatch, capsys):
    monkeypatch.setattr(worker_command.os, "execv", lambda *a: pytest.fail("must not exec"))
    monkeypatch.setenv("LOCALQ_HEARTBEAT_INTERVAL", "often")
    assert main(["worker", "-Q", "cpu"]) == 2
    assert "LOCALQ_HEARTBEAT_INTERVAL" in capsys.readouterr().err
    assert main(["worker", "--gpus", "none"]) == 2
    assert launched == []


def test_localq_worker_defaults(launched, monkeypatch):
    monkeypatch.setenv("LOCALQ_SIMULATE_GPUS", "1")
    assert main(["worker"]) == 0
    assert [spec.device for spec in launched[0].specs] == ["gpu", "cpu"]  # --gpus all --cpu 1
    monkeypatch.setenv("LOCALQ_SIMULATE_GPUS", "0")
    assert main(["worker"]) == 0  # no GPUs found: the CPU worker alone
    assert [child.name for child in launched[1].children] == ["cpu0"]
    assert main(["worker", "--gpus", "none", "--cpu", "3"]) == 0
    assert len(launched[2].children) == 3


def test_single_worker_flags_and_launcher_flags_do_not_mix(launched, monkeypatch, capsys):
    monkeypatch.setattr(worker_command.os, "execv", lambda *a: pytest.fail("must not exec"))
    assert main(["worker", "-Q", "cpu", "--gpus", "all"]) == 2
    assert "--gpus start the launcher" in capsys.readouterr().err
    assert main(["worker", "-Q", "cpu", "--pool", "batch"]) == 2
    assert main(["worker", "-n", "mine@%h"]) == 2
    assert "apply to a single worker" in capsys.readouterr().err
    assert launched == []


def test_queues_given_still_execs_one_celery_worker(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(worker_command.os, "execv", lambda path, argv: calls.append(argv))
    monkeypatch.setenv("LOCALQ_MODELS_DIR", str(REPO_ROOT / "models"))
    assert main(["worker", "--queues", "cpu", "--name", "cpu@%h"]) == 0  # what `localq up` runs
    # the default chat model batches 4 sequences: four job slots, as threads sharing the model
    assert calls[-1] == worker_argv("cpu", 4, "cpu@%h", "threads")
    assert main(["worker", "--queues", "cpu", "-c", "1"]) == 0  # one job at a time: prefork
    assert calls[-1] == worker_argv("cpu", 1, None)
    assert main(["worker", "-Q", "gpu", "-P", "solo"]) == 0
    assert calls[-1] == worker_argv("gpu", 1, None, "solo")
    # `--pool solo` named Celery's pool before --pool named worker pools: still understood
    assert main(["worker", "-Q", "gpu", "--pool", "solo"]) == 0
    assert calls[-1] == worker_argv("gpu", 1, None, "solo")
    assert "-P/--celery-pool" in capsys.readouterr().err


# --- localq workers --------------------------------------------------------------------------


def test_localq_workers_lists_live_heartbeats(tmp_path, monkeypatch, capsys):
    from ops.redis_server import RedisServer
    from store import heartbeats
    import redis

    with RedisServer(tmp_path / "redis", appendonly=False) as server:
        monkeypatch.setenv("LOCALQ_REDIS_URL", server.url)
        monkeypatch.setenv("COLUMNS", "300")
        assert main(["workers", "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == []
        client = redis.Redis.from_url(server.url, decode_responses=True)
        beat = {"id": "gpu1@box", "hostname": "box", "pid": 42, "device": "gpu", "gpu_index": 1,
                "cuda_visible_devices": "1", "simulated": True, "pools": [], "queues": ["gpu", "gpu.1"],
                "memory_budget_bytes": 2 * GIB, "memory_used_bytes": GIB // 2, "loaded_models": ["chat"],
                "current_job": "job_abc", "jobs_done": 3, "started_at": 1}
        heartbeats.publish(client, beat, interval=5)
        heartbeats.publish(client, {**beat, "id": "cpu0@box", "device": "cpu", "gpu_index": None,
                                    "cuda_visible_devices": "", "simulated": False, "queues": ["cpu"],
                                    "memory_budget_bytes": 0, "loaded_models": [], "current_job": None}, interval=5)
        assert main(["workers", "--json"]) == 0
        listed = json.loads(capsys.readouterr().out)
        assert [w["id"] for w in listed] == ["cpu0@box", "gpu1@box"] and listed[1]["current_job"] == "job_abc"
        assert main(["workers"]) == 0
        out = capsys.readouterr().out
        rows = {line.split("│")[1].strip(): line for line in out.splitlines() if "@box" in line}
        assert set(rows) == {"cpu0@box", "gpu1@box"}
        for text in ("gpu (simulated)", "1 / 1", "gpu, gpu.1", "512.0 MiB / 2.0 GiB", "chat", "job_abc", "s ago"):
            assert text in rows["gpu1@box"], text
        for text in ("- / ''", "no limit"):
            assert text in rows["cpu0@box"], text
        client.close()


def test_localq_workers_reports_an_unreachable_redis(monkeypatch, capsys):
    from ops.redis_server import free_port

    monkeypatch.setenv("LOCALQ_REDIS_URL", f"redis://:secret@127.0.0.1:{free_port()}/0")
    assert main(["workers"]) == 2
    err = capsys.readouterr().err
    assert "cannot read the workers from Redis" in err and "secret" not in err
