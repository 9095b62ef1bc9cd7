"""Start the parts of localq as child processes: Celery workers and the API under gunicorn.

Used by the integration tests and the benchmarks, which need the same processes `localq up`
runs, on ports of their own, with their own environment.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from ops.common import worker_argv
from ops.redis_server import free_port

REPO = Path(__file__).resolve().parent.parent


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
    """Worker and API processes sharing one environment (which names the Redis to use)."""

    env: dict
    log_dir: Path
    base_url: str = ""
    api: subprocess.Popen | None = None
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)

    def _spawn(self, argv: list[str], log_name: str) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / log_name, "ab") as log:
            return subprocess.Popen(argv, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    def start_worker(self, name: str = "cpu", queues: str = "cpu") -> subprocess.Popen:
        proc = self._spawn(worker_argv(queues, name=f"{name}@%h"), f"worker-{name}.log")
        self.workers[name] = proc
        return proc

    def stop_worker(self, name: str = "cpu", sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        _stop(self.workers.pop(name), sig, timeout)

    def start_api(self, connections: int | None = None) -> None:
        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}"
        self.api = self._spawn(api_argv(port, connections), "api.log")
        wait_until(lambda: httpx.get(self.base_url + "/healthz", timeout=1).status_code == 200, 60, "the API")

    def stop(self) -> None:
        for name in list(self.workers):
            self.stop_worker(name)
        if self.api is not None:
            _stop(self.api, signal.SIGTERM, 15)
            self.api = None


def _stop(proc: subprocess.Popen, sig: int, timeout: float) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
