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
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from api.settings import Settings
from ops.commands import batch, keys
from ops.common import CELERY_POOLS, DEFAULT_CONNECTIONS, DEFAULT_REDIS_DIR, _shown
from ops.gpus import parse_gpu_spec, parse_size
from ops.redis_server import RedisServerError, embedded_url
from workers.config import ModelConfigError

DEFAULT_REDIS_PORT = 6379
DEFAULT_READY_TIMEOUT = 120.0  # the rest of `localq up`: ops/up.py


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `localq` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    err = Console(stderr=True)
    _find_embedded_redis(args)
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

    batch.add_parser(commands)  # `localq batch ...`: the Batch API through the openai SDK
    keys.add_parser(commands)  # `localq keys ...`: projects' API keys
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


def _find_embedded_redis(args: argparse.Namespace) -> None:
    """Without LOCALQ_REDIS_URL, a command other than `up` uses the Redis `localq up` started with
    its default data folder (its password is in the URL there), if one was."""
    if os.environ.get("LOCALQ_REDIS_URL", "").strip() or args.command is _run_up:
        return
    found = embedded_url(DEFAULT_REDIS_DIR)
    if found:
        os.environ["LOCALQ_REDIS_URL"] = found


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


# --- dispatch -------------------------------------------------------------------------------
# Each subcommand's module is imported here, late, only when that subcommand runs: `import ops.cli`
# and `localq --help` then load no gunicorn, API app, Celery or model library.


def _run_up(args: argparse.Namespace, settings: Settings) -> int:
    from ops import up  # late: see above

    return up.run(args, settings)


def _run_api(args: argparse.Namespace, settings: Settings) -> int:
    from ops.commands import api  # late: see above

    return api.run(args, settings)


def _run_worker(args: argparse.Namespace, settings: Settings) -> int:
    from ops.commands import worker  # late: see above

    return worker.run(args, settings)


def _run_workers(args: argparse.Namespace, settings: Settings) -> int:
    from ops.commands import workers  # late: see above

    return workers.run(args, settings)


def _run_dead_letters(args: argparse.Namespace, settings: Settings) -> int:
    from ops.commands import dead_letters  # late: see above

    return dead_letters.run(args, settings)


def _run_models(args: argparse.Namespace, settings: Settings) -> int:
    from ops.commands import models  # late: see above

    return models.run(args, settings)


def _run_models_prepare(args: argparse.Namespace, settings: Settings) -> int:
    from ops.commands import models  # late: see above

    return models.prepare(args, settings)


if __name__ == "__main__":
    sys.exit(main())
