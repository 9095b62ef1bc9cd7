"""Start the parts of localq as child processes: Celery workers and the API under gunicorn.

Used by the integration tests and the benchmarks, which need the same processes `localq up`
runs, on ports of their own, with their own environment.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from ops.common import celery_pool, served_slots, worker_argv
from ops.redis_server import free_port
from ops.supervisor import LEAVE, Program, Supervisor
from tasks.settings import QueueSettings
from workers.registry import ModelRegistry

REPO = Path(__file__).resolve().parent.parent
WORKERS, API = "workers", "api"
STOP_TIMEOUTS = {API: 15.0, WORKERS: 30.0}  # after SIGTERM, before SIGKILL


def api_argv(port: int, connections: int | None = None) -> list[str]:
    """`localq api` on loopback: the same gunicorn set-up `localq up` runs."""
    argv = [sys.executable, "-m", "ops.cli", "api", "--host", "127.0.0.1", "--port", str(port)]
    return argv + (["--connections", str(connections)] if connections else [])


def wait_until(check, timeout: float, what: str, interval: float = 0.1):
    deadline = time.time() + timeout
    last_error = None
    while time.time() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception as err:  # not up yet
            last_error = err
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what} (last error: {last_error!r})")


@dataclass
class ServiceProcesses:
    """Worker and API processes sharing one environment (which names the Redis to use), run by
    the supervisor `localq up` uses; each writes to its own log file in `log_dir`.

    Nothing is restarted: a test that kills a worker decides what happens next."""

    env: dict
    log_dir: Path
    base_url: str = ""
    processes: Supervisor = field(default_factory=lambda: Supervisor(cwd=REPO))

    @property
    def workers(self) -> dict[str, subprocess.Popen]:
        """Running workers by name (their main processes)."""
        return {child.name: child.process for child in self.processes.children
                if child.program.group == WORKERS and child.process is not None}

    @property
    def api(self) -> subprocess.Popen | None:
        found = [child.process for child in self.processes.children if child.name == API]
        return found[0] if found else None

    def start_worker(self, name: str = "cpu", queues: str = "cpu", slots: int | None = None) -> subprocess.Popen:
        """A worker with `slots` job slots (default: as `localq worker` decides, from the models served)."""
        if slots is None:
            slots = served_slots(queues.split(","), ModelRegistry.load(QueueSettings.from_env(self.env).models_dir).list())
        pool, concurrency = celery_pool(slots)
        argv = worker_argv(queues, concurrency, name=f"{name}@%h", pool=pool)
        program = Program(name, argv, self.env, LEAVE, group=WORKERS, log=self.log_dir / f"worker-{name}.log")
        return self.processes.add(program).process

    def stop_worker(self, name: str = "cpu", sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        self.processes.stop_one(name, sig, timeout)

    def start_api(self, connections: int | None = None) -> None:
        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}"
        self.processes.add(Program(API, api_argv(port, connections), self.env, LEAVE, log=self.log_dir / "api.log"))
        wait_until(lambda: httpx.get(self.base_url + "/healthz", timeout=1).status_code == 200, 60, "the API")

    def stop(self) -> None:
        """The API, then the workers (the reverse of how `running_service` starts them)."""
        for child in reversed(list(self.processes.children)):
            self.processes.stop_one(child.name, signal.SIGTERM, STOP_TIMEOUTS[child.program.stop_group])
