"""The `localq` command: run everything (`up`), the API (`api`), the workers (`worker`), list the
live workers (`workers`) and the `models` (`models prepare` builds the tiny demo models).

`localq worker [--gpus all|none|I,J] [--cpu N] [--pool NAME ...] [--gpu-memory-budget SIZE]
[--cpu-memory-budget SIZE]` runs the launcher (ops/launcher.py): one supervised Celery worker
process per GPU (found without CUDA: ops/gpus.py) and N on the CPU. `localq worker -Q QUEUES
[-n NAME] [-c N] [-P POOL]` instead becomes one Celery worker (what `localq up` runs).
`localq workers [--json]` shows the workers' heartbeats (tasks/heartbeats.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from urllib.parse import urlsplit, urlunsplit
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from gunicorn.app.base import BaseApplication
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from api.settings import Settings
from ops import batch_cli
from ops.redis_server import RedisServer, RedisServerError, child_preexec, port_is_free
from workers.config import ModelConfigError
from workers.registry import ModelRegistry

REPO_ROOT = Path(__file__).resolve().parent.parent
CELERY_APP = "tasks.celery_app:app"
CELERY_POOLS = ("prefork", "solo", "threads")

# --- gunicorn, tuned for many concurrent long-lived SSE streams -----------------------------
# gthread: each in-flight request (an SSE stream lasts as long as its job) holds one thread, so
# a worker needs many threads; idle keep-alive connections wait in the poller, not on a thread.
DEFAULT_THREADS = 64
# With gthread, `timeout` is the worker's heartbeat, sent by its main loop about every second
# whatever the request threads are doing; it never cuts a request short. A generous value keeps
# SSE streams safe even if that loop is briefly starved, while a worker that truly hangs is
# still replaced (0 would disable that).
GUNICORN_TIMEOUT = 300
# Seconds an idle keep-alive connection stays open: SDK clients reuse connections between
# calls (submit, then poll or stream), which saves a TCP handshake per call.
GUNICORN_KEEPALIVE = 15
# On stop, in-flight requests (open streams) get this long before the worker exits; clients
# can resume a job's stream from another API process.
GUNICORN_GRACEFUL_TIMEOUT = 10

# --- `localq up` ---------------------------------------------------------------------------
DEFAULT_REDIS_DIR = REPO_ROOT / "var" / "redis"
DEFAULT_REDIS_PORT = 6379
DEFAULT_READY_TIMEOUT = 120.0
WORKER_PING_TIMEOUT = 30.0
UP_WORKER_NAME = "cpu@%h"
# After asking a child to stop (SIGTERM), how long before SIGQUIT, then SIGKILL.
API_STOP_TIMEOUT = GUNICORN_GRACEFUL_TIMEOUT + 10
FORCE_STOP_TIMEOUT = 10.0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `localq` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    err = Console(stderr=True)
    try:
        settings = _settings(args)
        return args.command(args, settings)
    except (ModelConfigError, ValueError, RedisServerError) as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="localq", description=__doc__)
    parser.add_argument("--models-dir", help="model config folder (default: LOCALQ_MODELS_DIR)")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = argparse.ArgumentParser(add_help=False)
    serve.add_argument("--host", help="bind address (default: LOCALQ_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="bind port (default: LOCALQ_PORT or 8080)")
    serve.add_argument("--workers", type=_positive_int, default=1, help="gunicorn worker processes")
    serve.add_argument(
        "--threads", type=_positive_int, default=DEFAULT_THREADS,
        help=f"threads per gunicorn worker, i.e. concurrent requests and streams (default {DEFAULT_THREADS})",
    )

    up = commands.add_parser(
        "up", parents=[serve],
        help="start Redis (unless LOCALQ_REDIS_URL is set), one CPU worker and the API",
    )
    up.add_argument(
        "--force-public", action="store_true",
        help="allow binding a non-loopback address without API keys",
    )
    up.add_argument(
        "--data-dir", type=Path, default=None,
        help=f"data folder of the embedded Redis (default: {_shown(DEFAULT_REDIS_DIR)})",
    )
    up.add_argument(
        "--redis-port", type=int, default=DEFAULT_REDIS_PORT,
        help=f"port of the embedded Redis; a free one is picked if it is busy (default {DEFAULT_REDIS_PORT})",
    )
    up.add_argument(
        "--ready-timeout", type=float, default=DEFAULT_READY_TIMEOUT,
        help=f"seconds to wait for the API to answer (default {DEFAULT_READY_TIMEOUT:g})",
    )
    up.set_defaults(command=_run_up)

    api = commands.add_parser("api", parents=[serve], help="serve the HTTP API with gunicorn")
    api.set_defaults(command=_run_api)

    worker = commands.add_parser(
        "worker",
        help="run the workers: one per GPU plus --cpu N on the CPU, supervised (or, with -Q, one Celery worker)",
        description="Without -Q/--queues: a launcher that runs one Celery worker process per selected GPU "
                    "and --cpu N CPU worker processes, restarts any that dies, and stops them all (warm "
                    "shutdown) on SIGTERM or Ctrl-C; see ops/launcher.py. With -Q/--queues: this process "
                    "becomes a single Celery worker consuming those queues (what `localq up` runs).",
    )
    launch = worker.add_argument_group("launcher (without -Q)")
    launch.add_argument(
        "--gpus", type=_gpu_spec, default=None, metavar="all|none|I,J",
        help="GPUs to run a worker on, by NVML/nvidia-smi index (default all: every GPU found, if any)",
    )
    launch.add_argument("--cpu", type=_non_negative_int, default=None, metavar="N",
                        help="CPU worker processes (default 1)")
    launch.add_argument(
        "--pool", dest="pools", action="append", type=_pool_name, default=None, metavar="NAME",
        help="serve the models of this pool (`pool: NAME` in their configs) too; repeatable",
    )
    launch.add_argument("--gpu-memory-budget", type=_size, default=None, metavar="SIZE",
                        help="model memory budget of each GPU worker, e.g. 20GiB (default 90%% of the GPU's memory)")
    launch.add_argument("--cpu-memory-budget", type=_size, default=None, metavar="SIZE",
                        help="model memory budget of each CPU worker (default 70%% of RAM / CPU workers)")
    single = worker.add_argument_group("single Celery worker (with -Q)")
    single.add_argument("-Q", "--queues", default=None,
                        help="comma-separated queues: run one Celery worker in this process, no launcher")
    single.add_argument(
        "-c", "--concurrency", type=_positive_int, default=None,
        help="jobs run at once, one pool process each (default 1)",
    )
    single.add_argument("-n", "--name", help="node name (default: FIRST_QUEUE@%%h)")
    single.add_argument(
        "-P", "--celery-pool", default=None, choices=CELERY_POOLS,
        help="Celery pool (default prefork)",
    )
    worker.add_argument(
        "-l", "--loglevel", default="warning",
        choices=("debug", "info", "warning", "error", "critical"),
        help="log level (default warning: Celery logs every job it receives at info, on the job's critical path)",
    )
    worker.set_defaults(command=_run_worker)

    workers = commands.add_parser("workers", help="list the live workers, from their heartbeats in Redis")
    workers.add_argument("--json", action="store_true", help="print the heartbeats as JSON")
    workers.set_defaults(command=_run_workers)

    models = commands.add_parser("models", help="list the configured models; `models prepare` builds the tiny ones")
    models.set_defaults(command=_run_models)
    model_actions = models.add_subparsers(metavar="ACTION")
    prepare = model_actions.add_parser(
        "prepare", help="build the tiny Stable Diffusion pipeline the tiny-diffusion config uses (no download)",
    )
    prepare.add_argument(
        "--dir", type=Path, default=None,
        help="folder to build it in, as DIR/tiny-diffusion (default: where the tiny-diffusion config points, "
             "else var/models)",
    )
    prepare.add_argument("--force", action="store_true", help="rebuild it even when it is already there")
    prepare.set_defaults(command=_run_models_prepare)

    batch_cli.add_parser(commands)  # `localq batch ...`: the Batch API through the openai SDK
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _pool_name(text: str) -> str:
    """A pool name, spelt as model configs must spell theirs (workers/config.py)."""
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", text):
        raise argparse.ArgumentTypeError(f"{text!r}: a pool name is 1-64 letters, digits, '_' or '-'")
    return text


def _size(text: str) -> int:
    from ops.gpus import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _gpu_spec(text: str):
    from ops.gpus import parse_gpu_spec

    try:
        return parse_gpu_spec(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _settings(args: argparse.Namespace) -> Settings:
    """Environment settings, overridden by whichever flags were given."""
    overrides = {
        "models_dir": Path(args.models_dir) if args.models_dir else None,
        "host": getattr(args, "host", None),
        "port": getattr(args, "port", None),
    }
    settings = Settings.from_env()
    return replace(settings, **{k: v for k, v in overrides.items() if v is not None})


# --- localq api -----------------------------------------------------------------------------


def gunicorn_options(host: str, port: int, workers: int, threads: int) -> dict:
    """Gunicorn settings for `localq api`; see the constants above for why each value."""
    return {
        "bind": host_port(host, port),
        "worker_class": "gthread",
        "workers": workers,
        "threads": threads,
        "timeout": GUNICORN_TIMEOUT,
        "keepalive": GUNICORN_KEEPALIVE,
        "graceful_timeout": GUNICORN_GRACEFUL_TIMEOUT,
    }


def _run_api(args: argparse.Namespace, settings: Settings) -> int:
    """Load the app first (bad configs fail here, clearly), then hand it to gunicorn."""
    from api.metrics import prepare_multiprocess_dir

    prepare_multiprocess_dir()  # before create_app: prometheus_client picks its storage on first use
    from api import create_app

    options = gunicorn_options(settings.host, settings.port, args.workers, args.threads)
    GunicornServer(create_app(settings), options).run()  # returns via SystemExit
    return 0


# --- localq worker --------------------------------------------------------------------------


def worker_argv(
    queues: str = "cpu",
    concurrency: int = 1,
    name: str | None = None,
    pool: str = "prefork",
    loglevel: str = "warning",
) -> list[str]:
    """The `python -m celery ... worker` command line `localq worker` runs."""
    queue_list = [q.strip() for q in queues.split(",") if q.strip()]
    if not queue_list:
        raise ValueError("--queues names no queue")
    return [
        sys.executable, "-m", "celery", "-A", CELERY_APP, "worker",
        "--pool", pool,
        "--concurrency", str(concurrency),
        "--queues", ",".join(queue_list),
        # One job at a time per pool process; a long job does not hold others back.
        "--prefetch-multiplier", "1",
        "--hostname", name or f"{queue_list[0]}@%h",
        # No worker-to-worker chatter at start-up and while running; workers share nothing.
        "--without-gossip", "--without-mingle",
        "--loglevel", loglevel.upper(),
    ]


def _run_worker(args: argparse.Namespace, settings: Settings) -> int:
    """`localq worker`: with -Q/--queues one Celery worker (exec), otherwise the launcher."""
    if args.queues is not None:
        return _exec_worker(args)
    return _run_launcher(args, settings)


def _exec_worker(args: argparse.Namespace) -> int:
    """Become the Celery worker (exec), so its signal handling applies unchanged.

    Celery's own command line runs in this very process (same pid): SIGTERM is a warm shutdown
    (the running job finishes), SIGQUIT a cold one, Ctrl-C warm then cold on a second press.
    Settings travel through the environment, which exec keeps.
    """
    launcher_only = [flag for flag, value in (
        ("--gpus", args.gpus), ("--cpu", args.cpu), ("--gpu-memory-budget", args.gpu_memory_budget),
        ("--cpu-memory-budget", args.cpu_memory_budget)) if value is not None]
    celery_pool = args.celery_pool
    if args.pools:
        if len(args.pools) == 1 and args.pools[0] in CELERY_POOLS and celery_pool is None:
            # `--pool prefork|solo|threads` named Celery's pool before --pool named worker pools
            celery_pool = args.pools[0]
            Console(stderr=True).print(
                f"note: --pool {args.pools[0]} taken as Celery's pool; it is spelt -P/--celery-pool now",
                highlight=False)
        else:
            launcher_only.append("--pool")
    if launcher_only:
        raise ValueError(
            f"{', '.join(launcher_only)} start the launcher, and -Q/--queues runs one worker without it: "
            "leave out -Q (or, for one worker, name its queues with -Q, e.g. cpu.pool.NAME)"
        )
    argv = worker_argv(args.queues, args.concurrency or 1, args.name, celery_pool or "prefork", args.loglevel)
    if importlib.util.find_spec(CELERY_APP.partition(":")[0]) is None:
        raise ValueError(f"the Celery app module {CELERY_APP.partition(':')[0]} is not installed")
    if args.models_dir:
        os.environ["LOCALQ_MODELS_DIR"] = str(Path(args.models_dir).resolve())
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)
    return 0  # not reached; kept for tests that replace os.execv


def _run_launcher(args: argparse.Namespace, settings: Settings) -> int:
    """One Celery worker process per selected GPU and --cpu N on the CPU, supervised (ops/launcher.py)."""
    from ops import gpus as gpu_discovery
    from ops import launcher

    single_only = [flag for flag, given in (
        ("-c/--concurrency", args.concurrency not in (None, 1)), ("-n/--name", args.name is not None),
        ("-P/--celery-pool", args.celery_pool not in (None, "prefork"))) if given]
    if single_only:
        raise ValueError(
            f"{', '.join(single_only)} apply to a single worker (with -Q/--queues); the launcher runs "
            "prefork workers, one job at a time each, named gpu<i>@host and cpu<k>@host"
        )
    launcher.configure_logging()
    registry = ModelRegistry.load(settings.models_dir)  # bad configs stop us before anything runs
    spec = args.gpus if args.gpus is not None else "all"
    found, source = ([], "none") if spec == "none" else gpu_discovery.find_gpus()
    visible = gpu_discovery.visible_indexes() if found and source != "simulated" else None
    selected = gpu_discovery.select_gpus(spec, found, visible)
    if spec != "none":
        launcher.log.info("GPUs found (%s): %s", source, ", ".join(
            f"{gpu.index} {gpu.name} {gpu_discovery.format_size(gpu.memory_bytes)}" for gpu in found) or "none")
    cpu_workers = 1 if args.cpu is None else args.cpu
    specs = launcher.plan_workers(
        selected, cpu_workers, pools=args.pools or (), configs=registry.list(),
        gpu_memory_budget=args.gpu_memory_budget, cpu_memory_budget=args.cpu_memory_budget,
    )
    if not specs:
        raise ValueError(f"no workers to run: --gpus {spec} selects no GPU and --cpu is 0")
    for queue, names in launcher.unserved_queues(specs, registry.list()).items():
        launcher.log.info("no worker started here consumes queue %s (model %s)", queue, ", ".join(names))
    env = _child_env(args)
    env["LOCALQ_MODELS_DIR"] = str(Path(settings.models_dir).resolve())  # the workers run from the repo root
    stop_timeout = settings.queue.job_timeout + 30  # every job has met its hard time limit by then
    return launcher.Launcher(specs, loglevel=args.loglevel, stop_timeout=stop_timeout, base_env=env).run()


# --- localq workers -------------------------------------------------------------------------


def _run_workers(args: argparse.Namespace, settings: Settings) -> int:
    """The live workers (tasks.heartbeats), as a table or, with --json, as a list."""
    import json

    import redis

    from tasks.heartbeats import live_workers

    url = settings.queue.redis_url
    client = redis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=3, socket_timeout=5)
    try:
        beats = live_workers(client)
    except redis.RedisError as exc:
        raise RedisServerError(f"cannot read the workers from Redis at {redact_url(url)}: {exc}") from None
    finally:
        client.close()
    if args.json:
        print(json.dumps(beats, indent=2))
        return 0
    if not beats:
        Console(stderr=True).print("no live workers (none has sent a heartbeat lately)", highlight=False)
        return 0
    Console().print(workers_table(beats, time.time()))
    return 0


def workers_table(beats: list[dict], now: float) -> Table:
    """One row per heartbeat document (see tasks.heartbeats)."""
    from ops.gpus import format_size

    table = Table("id", "host", "device", "GPU / CUDA_VISIBLE_DEVICES", "queues", "memory used / budget",
                  "loaded models", "current job", "heartbeat", title="live workers")
    for beat in beats:
        device = str(beat.get("device") or "-") + (" (simulated)" if beat.get("simulated") else "")
        gpu = beat.get("gpu_index")
        cuda = beat.get("cuda_visible_devices")
        budget = beat.get("memory_budget_bytes")
        used = format_size(beat.get("memory_used_bytes") or 0)
        memory = f"{used} / {format_size(budget) if budget else 'no limit'}"
        age = now - float(beat.get("last_heartbeat") or now)
        cells = (
            str(beat.get("id", "?")), str(beat.get("hostname") or "-"), device,
            f"{'-' if gpu is None else gpu} / {'unset' if cuda is None else repr(cuda) if cuda == '' else cuda}",
            ", ".join(beat.get("queues") or ()) or "-", memory,
            ", ".join(beat.get("loaded_models") or ()) or "-", str(beat.get("current_job") or "-"),
            f"{max(age, 0):.0f} s ago",
        )
        table.add_row(*map(escape, cells))
    return table


# --- localq up ------------------------------------------------------------------------------


def bind_refusal(host: str, has_api_keys: bool, force_public: bool) -> str | None:
    """Why `localq up` will not bind `host`, or None when it may."""
    if is_loopback(host) or has_api_keys or force_public:
        return None
    return (
        f"refusing to bind {host}: it is not a loopback address and no API keys are configured "
        "(LOCALQ_API_KEYS or LOCALQ_API_KEYS_FILE); configure keys, or pass --force-public to "
        "expose the API without authentication."
    )


class ChildExited(Exception):
    """A process `localq up` started ended on its own."""


@dataclass
class Child:
    label: str
    process: subprocess.Popen

    def check(self) -> None:
        if self.process.poll() is not None:
            raise ChildExited(f"the {self.label} exited unexpectedly (status {self.process.returncode})")


class Stack:
    """What `localq up` runs: an embedded Redis (maybe), the worker and the API, stopped in reverse."""

    def __init__(self, err: Console):
        self.err = err
        self.redis: RedisServer | None = None
        self.children: list[Child] = []
        self.stopping = False
        self.signals = 0  # stop requests (Ctrl-C, SIGTERM, SIGHUP) seen so far

    # Signals: the first one interrupts whatever `up` is doing (like Ctrl-C does); while the
    # stack is stopping, a further one only hurries the stop along.
    def on_signal(self, signum, frame) -> None:
        self.signals += 1
        if not self.stopping:
            raise KeyboardInterrupt

    def spawn(self, label: str, argv: list[str], env: dict[str, str]) -> Child:
        process = subprocess.Popen(
            argv,
            env=env,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=_stderr_fd(),  # `up`'s own stdout carries only its summary
            # Own process group: the terminal's Ctrl-C reaches `up` alone, which then stops
            # the children in order (API, worker, Redis) instead of all at once.
            process_group=0,
            preexec_fn=child_preexec(),
        )
        child = Child(label, process)
        self.children.append(child)
        return child

    def check(self) -> None:
        for child in self.children:
            child.check()
        if self.redis is not None and not self.redis.running:
            raise ChildExited("the embedded Redis exited unexpectedly")

    def stop(self, worker_timeout: float) -> None:
        self.stopping = True
        for child in reversed(self.children):
            timeout = worker_timeout if child.label == "worker" else API_STOP_TIMEOUT
            self._stop_child(child, timeout)
        if self.redis is not None:
            self.err.print("stopping Redis", highlight=False)
            self.redis.stop()

    def _stop_child(self, child: Child, timeout: float) -> None:
        process = child.process
        if process.poll() is not None:
            return
        self.err.print(f"stopping the {child.label} (pid {process.pid})", highlight=False)
        _signal(process, signal.SIGTERM)  # gunicorn: graceful stop; Celery: warm shutdown
        signals_before = self.signals
        started = time.monotonic()
        hinted = forced = False
        while process.poll() is None:
            waited = time.monotonic() - started
            if not forced and (self.signals > signals_before or waited > timeout):
                # gunicorn: quick shutdown; Celery: cold shutdown (running jobs are
                # re-queued, as their acks are late).
                _signal(process, signal.SIGQUIT)
                forced, started = True, time.monotonic()
            elif forced and waited > FORCE_STOP_TIMEOUT:
                _kill_group(process)
            elif not hinted and waited > 3 and not forced:
                hinted = True
                self.err.print(
                    f"waiting for the {child.label} to finish what it is doing; "
                    "press Ctrl-C again to stop it now",
                    highlight=False,
                )
            time.sleep(0.1)
        # Whatever the leader left behind in its group (pool processes) goes with it.
        _kill_group(process)


def _run_up(args: argparse.Namespace, settings: Settings) -> int:
    """Start Redis (unless LOCALQ_REDIS_URL is set), one CPU worker and the API; stop them on a signal."""
    out, err = Console(), Console(stderr=True)
    refusal = bind_refusal(settings.host, bool(settings.api_keys), args.force_public)
    if refusal:
        err.print(f"[bold red]{escape(refusal)}[/]", highlight=False)
        return 2
    registry = ModelRegistry.load(settings.models_dir)  # bad configs stop us before anything runs

    stack = Stack(err)
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {signum: signal.signal(signum, stack.on_signal) for signum in handled}
    try:
        try:
            redis_note = _start_redis(stack, args, err)
            env = _child_env(args)
            worker = stack.spawn("worker", worker_command(), env)
            api_url = f"http://{host_port(settings.host, settings.port)}"
            stack.spawn("API", api_command(args, settings), env)
            _wait_for_api(stack, _probe_url(settings.host, settings.port), args.ready_timeout)
            worker_state = _wait_for_worker(stack, UP_WORKER_NAME)
            _print_summary(out, settings, registry, redis_note, worker, worker_state, api_url)
            while True:
                time.sleep(0.5)
                stack.check()
        except ChildExited as exc:
            err.print(f"[bold red]localq: {escape(str(exc))}; stopping everything.[/]", highlight=False)
            stack.stop(worker_timeout=settings.queue.job_timeout + 30)
            return 1
        except KeyboardInterrupt:
            err.print("localq: stopping", highlight=False)
            stack.stop(worker_timeout=settings.queue.job_timeout + 30)
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
        "--workers", str(args.workers), "--threads", str(args.threads),
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
    return f"{stack.redis.url} (embedded, data in {_shown(data_dir)})"


def _check_external_redis(url: str) -> None:
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3).ping()
    except redis.RedisError as exc:
        raise RedisServerError(
            f"cannot reach Redis at {redact_url(url)} (LOCALQ_REDIS_URL): {exc}"
        ) from None


def redact_url(url: str) -> str:
    """The URL with any password replaced by `***`, for printing."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _child_env(args: argparse.Namespace) -> dict[str, str]:
    """The children's settings: this environment, plus the Redis URL and a --models-dir given here."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    if args.models_dir:
        env["LOCALQ_MODELS_DIR"] = str(Path(args.models_dir).resolve())
    return env


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
    """Ping the worker through the broker; a word for the summary."""
    deadline = time.monotonic() + WORKER_PING_TIMEOUT
    while time.monotonic() < deadline:
        stack.check()
        if ping_worker(name):
            return "ready"
    return "started, not answering pings yet"


def ping_worker(name: str, timeout: float = 1.0) -> bool:
    """True when the Celery node `name` (`%h` expanded) answers a control ping."""
    try:
        from celery.utils.nodenames import host_format

        from tasks.celery_app import app

        node = host_format(name)
        return any(node in reply for reply in app.control.ping(destination=[node], timeout=timeout))
    except Exception:  # noqa: BLE001 - not ready, or no broker yet
        time.sleep(timeout)
        return False


def _print_summary(out, settings, registry, redis_note, worker, worker_state, api_url) -> None:
    from celery.utils.nodenames import host_format

    auth = f"{len(settings.api_keys)} API key(s) required on /v1" if settings.api_keys else "open (no API keys)"
    cors = ", ".join(settings.cors_origins) if settings.cors_origins else "off"
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("Redis", escape(redis_note))
    grid.add_row(
        "Worker",
        escape(f"{host_format(UP_WORKER_NAME)} (queue cpu, pid {worker.process.pid}): {worker_state}"),
    )
    grid.add_row("API", escape(f"{api_url}  (docs {api_url}/docs)"))
    grid.add_row("Access", escape(f"{auth}; CORS {cors}"))
    out.print(grid)
    out.print(_models_table(registry, settings.models_dir))
    out.print(f"localq ready on [bold]{escape(api_url)}[/]", highlight=False)
    out.print("Ctrl-C stops everything.", highlight=False)


def _stderr_fd() -> int | None:
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # replaced stderr (pytest capture, IDEs)
        return None


def _signal(process: subprocess.Popen, signum: int) -> None:
    try:
        process.send_signal(signum)
    except ProcessLookupError:
        pass


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the child's process group (it leads one: started with process_group=0)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


# --- localq models --------------------------------------------------------------------------


def _run_models(args: argparse.Namespace, settings: Settings) -> int:
    """A table of the configured models, validating every file on the way."""
    registry = ModelRegistry.load(settings.models_dir)
    Console().print(_models_table(registry, settings.models_dir))
    return 0


def _run_models_prepare(args: argparse.Namespace, settings: Settings) -> int:
    """Build the tiny diffusion pipeline (idempotent: an existing one is kept unless --force)."""
    from ops import tiny_models

    target = tiny_models.tiny_diffusion_path(args.dir) if args.dir else _tiny_diffusion_target(settings.models_dir)
    if args.force or not tiny_models.is_prepared(target):
        Console(stderr=True).print(f"building {tiny_models.TINY_DIFFUSION} in {escape(_shown(target))}", highlight=False)
    if tiny_models.prepare_tiny_diffusion(target, force=args.force):
        Console().print(f"built {tiny_models.TINY_DIFFUSION} in {escape(_shown(target))}", highlight=False)
    else:
        Console().print(
            f"{tiny_models.TINY_DIFFUSION} is already in {escape(_shown(target))} (--force rebuilds it)",
            highlight=False,
        )
    return 0


def _tiny_diffusion_target(models_dir: Path) -> Path:
    """Where the models dir's tiny-diffusion config points, else var/models/tiny-diffusion."""
    from ops import tiny_models

    try:
        config = ModelRegistry.load(models_dir).resolve(tiny_models.TINY_DIFFUSION)
    except ModelConfigError:
        config = None
    if config is not None and config.model_file is not None:
        return config.model_file.resolve()
    return tiny_models.tiny_diffusion_path()


def _models_table(registry: ModelRegistry, models_dir: Path) -> Table:
    table = Table("name", "aliases", "backend", "device", title=f"models in {models_dir}")
    for config in registry.list():
        cells = (config.name, ", ".join(config.aliases), config.backend or "-", config.device)
        table.add_row(*map(escape, cells))
    return table


# --- helpers --------------------------------------------------------------------------------


class GunicornServer(BaseApplication):
    """Gunicorn's documented custom-application hook: serve an app object we built."""

    def __init__(self, app, options: dict):
        self._app = app
        self._options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)
        # Gunicorn 25.1+ opens a control socket at one shared per-user path by default;
        # localq does not use it, and two instances would fight over it.
        if "control_socket_disable" in self.cfg.settings:
            self.cfg.set("control_socket_disable", True)

    def load(self):
        return self._app


def host_port(host: str, port: int) -> str:
    """`host:port`, bracketing IPv6 addresses as both gunicorn and URLs require."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback IPs; hostnames are not resolved."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


if __name__ == "__main__":
    sys.exit(main())
