"""The `localq` command: run everything (`up`), the API (`api`), the workers (`worker`), list the
live workers (`workers`) and the `models` (`models prepare` builds the tiny demo models).

`localq worker [--gpus all|none|I,J] [--cpu N] [--pool NAME ...] [--gpu-memory-budget SIZE]
[--cpu-memory-budget SIZE]` runs the launcher (ops/launcher.py): one supervised Celery worker
process per GPU (found without CUDA: ops/gpus.py) and N on the CPU. `localq worker -Q QUEUES
[-n NAME] [-c N] [-P POOL]` instead becomes one Celery worker (what `localq up` runs).
`localq workers [--json]` shows the workers' heartbeats (store/heartbeats.py), `localq
dead-letters [--json] [--limit N]` the job messages the workers set aside (store/dead_letters.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path

import redis
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from api.settings import Settings
from ops import batch_cli
from ops.api_server import (
    DEFAULT_CONNECTIONS,
    GunicornServer,
    gunicorn_options,
    host_port,
    raise_open_files_limit,
)
from api import create_app
from api.metrics import prepare_multiprocess_dir
from ops import gpus as gpu_discovery
from ops import launcher, tiny_models, up
from ops.gpus import format_size, parse_gpu_spec, parse_size
from ops.common import (
    CELERY_APP,
    DEFAULT_REDIS_DIR,
    REPO_ROOT,
    _child_env,
    _models_table,
    _shown,
    bind_refusal,
    is_loopback,
    redact_url,
    worker_argv,
)
from ops.redis_server import RedisServerError
from store.dead_letters import read as read_dead_letters
from store.heartbeats import live_workers
from tasks.worker_settings import WorkerSettings
from workers.config import ModelConfigError
from workers.registry import ModelRegistry

CELERY_POOLS = ("prefork", "solo", "threads")


# --- `localq up` ---------------------------------------------------------------------------
DEFAULT_REDIS_PORT = 6379
DEFAULT_READY_TIMEOUT = 120.0  # the rest of `localq up`: ops/up.py


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
        "--connections", type=_positive_int, default=DEFAULT_CONNECTIONS,
        help="concurrent connections per gunicorn worker: requests, open streams, slow and idle "
             f"keep-alive clients (default {DEFAULT_CONNECTIONS})",
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

    dead = commands.add_parser("dead-letters",
                               help="list the job messages the workers set aside (store/dead_letters.py), newest first")
    dead.add_argument("--json", action="store_true", help="print them as JSON, message bodies included")
    dead.add_argument("--limit", type=_positive_int, default=20, metavar="N", help="how many to show (default 20)")
    dead.set_defaults(command=_run_dead_letters)

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
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _gpu_spec(text: str):
    try:
        return parse_gpu_spec(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _settings(args: argparse.Namespace) -> Settings:
    """Environment settings, overridden by whichever flags were given."""
    overrides = {
        "models_dir": Path(args.models_dir) if args.models_dir else None,
        "host": getattr(args, "host", None),
        "port": getattr(args, "port", None),
    }
    settings = Settings.from_env()
    if overrides["models_dir"] is not None:
        settings = replace(settings, queue=replace(settings.queue, models_dir=overrides["models_dir"]))
    return replace(settings, **{k: v for k, v in overrides.items() if v is not None})


# --- localq api -----------------------------------------------------------------------------


def _run_api(args: argparse.Namespace, settings: Settings) -> int:
    """Check the model configs first (bad configs fail here, clearly), then hand over to gunicorn,
    whose workers build the app once gevent has patched them (ops/api_server.py)."""
    ModelRegistry.load(settings.models_dir)  # what create_app would refuse, refused before any worker starts
    prepare_multiprocess_dir()  # before the app exists: prometheus_client picks its storage on first use
    raise_open_files_limit(args.connections)
    options = gunicorn_options(settings.host, settings.port, args.workers, args.connections)
    GunicornServer(partial(_create_app, settings), options).run()  # returns via SystemExit
    return 0


def _create_app(settings: Settings):
    return create_app(settings)


# --- localq worker --------------------------------------------------------------------------


def _run_worker(args: argparse.Namespace, settings: Settings) -> int:
    """`localq worker`: with -Q/--queues one Celery worker (exec), otherwise the launcher."""
    worker = WorkerSettings.from_env()  # a worker's own settings: a typo stops it here, before it starts
    if args.queues is not None:
        return _exec_worker(args)
    return _run_launcher(args, settings, worker)


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


def _run_launcher(args: argparse.Namespace, settings: Settings, worker: WorkerSettings) -> int:
    """One Celery worker process per selected GPU and --cpu N on the CPU, supervised (ops/launcher.py)."""
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
        inherited_budget=worker.model_cache_bytes,
    )
    if not specs:
        raise ValueError(f"no workers to run: --gpus {spec} selects no GPU and --cpu is 0")
    for queue, names in launcher.unserved_queues(specs, registry.list()).items():
        launcher.log.info("no worker started here consumes queue %s (model %s)", queue, ", ".join(names))
    env = _child_env(args)
    env["LOCALQ_MODELS_DIR"] = str(Path(settings.models_dir).resolve())  # the workers run from the repo root
    return launcher.Launcher(specs, loglevel=args.loglevel, stop_timeout=settings.queue.drain_timeout,
                             base_env=env).run()


# --- localq workers -------------------------------------------------------------------------


def _read_redis(settings: Settings, what: str, read):
    """`read(client)` on a short-lived client of the queue's Redis; an error names `what` and the URL."""
    url = settings.queue.redis_url
    client = redis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=3, socket_timeout=5)
    try:
        return read(client)
    except redis.RedisError as exc:
        raise RedisServerError(f"cannot read the {what} from Redis at {redact_url(url)}: {exc}") from None
    finally:
        client.close()


def _run_workers(args: argparse.Namespace, settings: Settings) -> int:
    """The live workers (store.heartbeats), as a table or, with --json, as a list."""
    beats = _read_redis(settings, "workers", live_workers)
    if args.json:
        print(json.dumps(beats, indent=2))
        return 0
    if not beats:
        Console(stderr=True).print("no live workers (none has sent a heartbeat lately)", highlight=False)
        return 0
    Console().print(workers_table(beats, time.time()))
    return 0


def _run_dead_letters(args: argparse.Namespace, settings: Settings) -> int:
    """The newest dead letters (store.dead_letters), as a table or, with --json, as a list."""
    entries = _read_redis(settings, "dead letters", lambda client: read_dead_letters(client, args.limit))
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    if not entries:
        Console(stderr=True).print("no dead letters", highlight=False)
        return 0
    table = Table("when (UTC)", "reason", "task", "queue", "job", "error", title="dead letters, newest first")
    for entry in entries:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(float(entry.get("at") or 0)))
        cells = (when, entry.get("reason", ""), entry.get("task", ""), entry.get("queue", ""),
                 entry.get("job_id", ""), entry.get("error", "")[:200])
        table.add_row(*map(escape, cells))
    Console().print(table)
    return 0


def workers_table(beats: list[dict], now: float) -> Table:
    """One row per heartbeat document (see store.heartbeats)."""
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


def _run_up(args: argparse.Namespace, settings: Settings) -> int:
    """`localq up` (ops/up.py)."""
    return up.run(args, settings)


# --- localq models --------------------------------------------------------------------------


def _run_models(args: argparse.Namespace, settings: Settings) -> int:
    """A table of the configured models, validating every file on the way."""
    registry = ModelRegistry.load(settings.models_dir)
    Console().print(_models_table(registry, settings.models_dir))
    return 0


def _run_models_prepare(args: argparse.Namespace, settings: Settings) -> int:
    """Build the tiny diffusion pipeline (idempotent: an existing one is kept unless --force)."""
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
    try:
        config = ModelRegistry.load(models_dir).resolve(tiny_models.TINY_DIFFUSION)
    except ModelConfigError:
        config = None
    if config is not None and config.model_file is not None:
        return config.model_file.resolve()
    return tiny_models.tiny_diffusion_path()


# --- helpers --------------------------------------------------------------------------------


if __name__ == "__main__":
    sys.exit(main())
