"""`localq up`: an embedded Redis (unless LOCALQ_REDIS_URL is set), one CPU worker and the API.

Supervision: the worker and the API run under the supervisor of ops/supervisor.py (the one
`localq worker` and the tests use): a worker that exits is started again after 1 s, then 2, 4, ... up to 30 s for one that keeps
failing (`Backoff`), its leftover pool processes killed first, its output relayed to stderr with
a `cpu | ` prefix. Meanwhile the API and Redis keep serving: jobs wait on the queue. The API or
the embedded Redis exiting stops everything (exit status 1): gunicorn restarts its own workers
already, so its master exiting means a fault a restart would not mend (a port taken, a bad
setting), and without Redis nothing answers.

Stopping (Ctrl-C, SIGTERM, SIGHUP): the API first (gunicorn's graceful stop), then the worker
(Celery's warm shutdown: its running job finishes, up to `QueueSettings.drain_timeout`:
LOCALQ_JOB_TIMEOUT + 30 s), then Redis.
A second signal hurries the child being stopped (SIGQUIT, then SIGKILL 10 s later).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import socket
import sys
import time
import urllib.request

from celery.utils.nodenames import host_format
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from api.settings import Settings
from ops.api_server import GUNICORN_GRACEFUL_TIMEOUT
from ops.api_server import host_port
from ops.common import DEFAULT_REDIS_DIR, REPO_ROOT, _child_env, _models_table, _shown, bind_refusal, redact_url
from ops.launcher import OWNED_ENV, WorkerSpec, child_environment, configure_logging, worker_program
from ops.redis_server import PASSWORD_FILE, RedisServer, RedisServerError, port_is_free
from ops.supervisor import FATAL, Child, ChildExited, Program, Supervisor
from store.heartbeats import worker_key
from tasks.runtime import connect
from tasks.settings import QueueSettings
from tasks.worker_settings import WorkerSettings
from workers.registry import ModelRegistry

WORKER_PING_TIMEOUT = 30.0
PRELOAD_TIMEOUT = 300.0  # the worker's `preload` models, loading after it answers pings
UP_WORKER_NAME = "cpu@%h"
WORKER, API = "cpu", "API"  # the supervised programs' names
# After asking the API to stop (SIGTERM), how long before SIGKILL; after a second Ctrl-C (SIGQUIT) too.
API_STOP_TIMEOUT = GUNICORN_GRACEFUL_TIMEOUT + 10
FORCE_STOP_TIMEOUT = 10.0
POLL_INTERVAL = 0.5


class Stack:
    """What `localq up` runs: an embedded Redis (maybe), then the supervised worker and API
    (ops/supervisor.py), stopped in reverse order."""

    def __init__(self, err: Console):
        self.err = err
        self.redis: RedisServer | None = None
        self.processes = Supervisor(cwd=REPO_ROOT, force_timeout=FORCE_STOP_TIMEOUT, announce=self._announce)
        self.stopping = False
        self.signals = 0  # stop requests (Ctrl-C, SIGTERM, SIGHUP) seen so far

    # Signals: the first one interrupts whatever `up` is doing (like Ctrl-C does); while the
    # stack is stopping, a further one only hurries the stop along.
    def on_signal(self, signum, frame) -> None:
        self.signals += 1
        self.processes.request_stop()  # counted by its stop: a signal during it hurries it
        if not self.stopping:
            raise KeyboardInterrupt

    def start_worker(self, env: dict[str, str]) -> None:
        """The worker, restarted when it exits; its environment is `env` exactly."""
        spec = WorkerSpec(name=f"cpu@{socket.gethostname()}", device="cpu", queues=("cpu",),
                          env={name: env[name] for name in OWNED_ENV if name in env})
        self.processes.add(worker_program(spec, worker_command(), child_environment(spec, env)))

    def start_api(self, argv: list[str], env: dict[str, str]) -> None:
        """The API: its output on `up`'s stderr (`up`'s stdout carries only its summary); its exit is fatal."""
        self.processes.add(Program(API, argv, env, FATAL, stop_timeout=API_STOP_TIMEOUT, relay=False))

    def worker_pid(self) -> int | None:
        process = self.processes.child(WORKER).process
        return process.pid if process is not None else None

    def check(self) -> None:
        """Restart the worker if it is due; raise ChildExited if the API or Redis is gone."""
        self.processes.supervise()
        if self.redis is not None and not self.redis.running:
            raise ChildExited("the embedded Redis exited unexpectedly")

    def stop(self, worker_timeout: float) -> None:
        """The API, then the worker (up to `worker_timeout` to finish its job), then Redis."""
        self.stopping = True
        self.processes.stop_timeout = worker_timeout
        self.processes.stop()
        if self.redis is not None:
            self.err.print("stopping Redis", highlight=False)
            self.redis.stop()

    def _announce(self, child: Child) -> None:
        if child.name == WORKER:
            self.err.print(f"stopping the worker (pid {child.process.pid}): its running job finishes first; "
                           "press Ctrl-C again to stop it now", highlight=False)
        else:
            self.err.print(f"stopping the {child.name} (pid {child.process.pid})", highlight=False)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Start Redis (unless LOCALQ_REDIS_URL is set), one CPU worker and the API; stop them on a signal."""
    out, err = Console(), Console(stderr=True)
    refusal = bind_refusal(settings.host, bool(settings.api_keys), args.force_public)
    if refusal:
        err.print(f"[bold red]{escape(refusal)}[/]", highlight=False)
        return 2
    registry = ModelRegistry.load(settings.models_dir)  # bad configs stop us before anything runs
    WorkerSettings.from_env()  # and so do malformed worker settings
    configure_logging()  # the worker's restarts, on stderr

    stack = Stack(err)
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {signum: signal.signal(signum, stack.on_signal) for signum in handled}
    stop_timeout = settings.queue.drain_timeout  # every job has met its hard time limit by then
    try:
        try:
            redis_note = _start_redis(stack, args, err)
            env = _child_env(args)
            stack.start_worker(env)
            api_url = f"http://{host_port(settings.host, settings.port)}"
            stack.start_api(api_command(args, settings), env)
            _wait_for_api(stack, _probe_url(settings.host, settings.port), args.ready_timeout)
            worker_state = _wait_for_worker(stack, UP_WORKER_NAME)
            _print_summary(out, settings, registry, redis_note, stack.worker_pid(), worker_state, api_url)
            while True:
                time.sleep(POLL_INTERVAL)
                stack.check()
        except ChildExited as exc:
            err.print(f"[bold red]localq: {escape(str(exc))}; stopping everything.[/]", highlight=False)
            stack.stop(worker_timeout=stop_timeout)
            return 1
        except KeyboardInterrupt:
            err.print("localq: stopping", highlight=False)
            stack.stop(worker_timeout=stop_timeout)
            return 0
        except BaseException:
            stack.stop(worker_timeout=FORCE_STOP_TIMEOUT)
            raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def worker_command() -> list[str]:
    """The one CPU worker `localq up` runs."""
    return [sys.executable, "-m", "ops.cli", "worker", "--queues", "cpu", "--name", UP_WORKER_NAME]


def api_command(args: argparse.Namespace, settings: Settings) -> list[str]:
    """The API `localq up` runs (settings other than these flags travel in the environment)."""
    return [
        sys.executable, "-m", "ops.cli", "api", "--host", settings.host, "--port", str(settings.port),
        "--workers", str(args.workers), "--connections", str(args.connections),
    ]


def _start_redis(stack: Stack, args: argparse.Namespace, err: Console) -> str:
    """Use LOCALQ_REDIS_URL if it is set (and answers), else start the embedded Redis; a summary line."""
    external = os.environ.get("LOCALQ_REDIS_URL", "").strip()
    if external:
        _check_external_redis(external)
        return f"{redact_url(external)} (LOCALQ_REDIS_URL)"
    data_dir = (args.data_dir or DEFAULT_REDIS_DIR).resolve()
    port = args.redis_port
    if port and not port_is_free(port):
        err.print(f"port {port} is busy; the embedded Redis picks a free port", highlight=False)
        port = 0
    stack.redis = RedisServer(data_dir, port)
    stack.redis.start()
    os.environ["LOCALQ_REDIS_URL"] = stack.redis.url  # for the children, and for the worker ping
    if port != args.redis_port:
        err.print(f"embedded Redis on port {stack.redis.port}", highlight=False)
    return f"{redact_url(stack.redis.url)} (embedded, password in {_shown(data_dir / PASSWORD_FILE)})"


def _check_external_redis(url: str) -> None:
    import redis

    from tasks.redis_url import redis_client

    try:
        redis_client(url, socket_connect_timeout=3, socket_timeout=3).ping()
    except redis.RedisError as exc:
        raise RedisServerError(
            f"cannot reach Redis at {redact_url(url)} (LOCALQ_REDIS_URL): {exc}"
        ) from None


def _probe_url(host: str, port: int) -> str:
    """Where `up` checks the API: a wildcard bind is reached over loopback."""
    bare = host.strip("[]")
    if bare in ("0.0.0.0", ""):
        bare = "127.0.0.1"
    elif bare == "::":
        bare = "::1"
    return f"http://{host_port(bare, port)}/healthz"


def _wait_for_api(stack: Stack, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        stack.check()
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise ChildExited(f"the API did not answer {url} within {timeout:g}s")
        time.sleep(0.2)


def _wait_for_worker(stack: Stack, name: str) -> str:
    """Ping the worker through the broker, then wait for its `preload` models; a word for the summary."""
    deadline = time.monotonic() + WORKER_PING_TIMEOUT
    while not ping_worker(name):
        stack.check()
        if time.monotonic() > deadline:
            return "started, not answering pings yet"
    deadline = time.monotonic() + PRELOAD_TIMEOUT
    while not worker_preloaded(name):
        stack.check()
        if time.monotonic() > deadline:
            return "ready, still loading its models"
        time.sleep(0.2)
    return "ready"


def worker_preloaded(name: str) -> bool:
    """True when the worker's heartbeat says its `preload` models are loaded."""
    try:
        raw = _heartbeat_reader().get(worker_key(host_format(name)))
        return bool(raw) and bool(json.loads(raw).get("preloaded"))
    except Exception:  # noqa: BLE001 - no heartbeat yet
        return False


@functools.cache
def _heartbeat_reader():
    """One Redis client for the polls above (LOCALQ_REDIS_URL is set once Redis runs)."""
    return connect(QueueSettings.from_env()).redis


def ping_worker(name: str, timeout: float = 1.0) -> bool:
    """True when the Celery node `name` (`%h` expanded) answers a control ping."""
    try:
        from tasks.celery_app import app  # here: its broker is LOCALQ_REDIS_URL at import, set once Redis runs

        node = host_format(name)
        return any(node in reply for reply in app.control.ping(destination=[node], timeout=timeout))
    except Exception:  # noqa: BLE001 - not ready, or no broker yet
        time.sleep(timeout)
        return False


def _print_summary(out, settings, registry, redis_note, worker_pid, worker_state, api_url) -> None:
    from celery.utils.nodenames import host_format

    auth = f"{len(settings.api_keys)} API key(s) required on /v1" if settings.api_keys else "open (no API keys)"
    cors = ", ".join(settings.cors_origins) if settings.cors_origins else "off"
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("Redis", escape(redis_note))
    grid.add_row(
        "Worker",
        escape(f"{host_format(UP_WORKER_NAME)} (queue cpu, pid {worker_pid or 'restarting'}): {worker_state}, "
               "restarted if it exits"),
    )
    grid.add_row("API", escape(f"{api_url}  (console {api_url}/, docs {api_url}/docs)"))
    grid.add_row("Access", escape(f"{auth}; CORS {cors}"))
    out.print(grid)
    out.print(_models_table(registry, settings.models_dir))
    out.print(f"localq ready on [bold]{escape(api_url)}[/]", highlight=False)
    out.print("Ctrl-C stops everything.", highlight=False)
