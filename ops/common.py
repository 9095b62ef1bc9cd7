"""What the `localq` commands share (`ops.cli`, `ops.commands.*`, `ops.up`, `ops.launcher`,
`ops.stack`): paths, defaults the parser shows, the Celery worker command line, how settings and
models are shown, short reads from Redis. Kept apart from `ops.cli` so that the modules `ops.cli`
runs never import it back; light, so that `import ops.cli` stays cheap.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path
import redis
from rich.markup import escape
from rich.table import Table

from ops.redis_server import RedisServerError
from tasks.redis_url import redacted, redis_client
from tasks.routing import queue_for
from workers.registry import ModelRegistry
from workers.slots import worker_slots

REPO_ROOT = Path(__file__).resolve().parent.parent
CELERY_APP = "tasks.celery_app:app"
CELERY_POOLS = ("prefork", "solo", "threads")
DEFAULT_REDIS_DIR = REPO_ROOT / "var" / "redis"
# Connections one gunicorn worker process serves at once (streams, slow clients, keep-alive ones);
# more wait in the listen backlog until one closes (ops/api_server.py).
DEFAULT_CONNECTIONS = 1000


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


def served_slots(queues, configs) -> int:
    """Job slots of a worker consuming `queues` (`workers.slots`): from the models routed there."""
    wanted = set(queues)
    return worker_slots(config for config in configs if queue_for(config) in wanted)


def celery_pool(slots: int) -> tuple[str, int]:
    """Celery's pool and concurrency for a worker with `slots` job slots: one prefork process for
    one slot (a job that crashes its process takes no other job with it); for more, a thread per
    slot in one process, so that the jobs share the loaded models and the batching engine."""
    return ("threads", slots) if slots > 1 else ("prefork", 1)


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def bind_refusal(host: str, has_api_keys: bool, force_public: bool) -> str | None:
    """Why `localq up` will not bind `host`, or None when it may."""
    if is_loopback(host) or has_api_keys or force_public:
        return None
    return (
        f"refusing to bind {host}: it is not a loopback address and no API keys are configured "
        "(LOCALQ_API_KEYS or LOCALQ_API_KEYS_FILE); configure keys, or pass --force-public to "
        "expose the API without authentication."
    )


def redact_url(url: str) -> str:
    """The URL with any password replaced by `***`, for printing."""
    return redacted(url)


def _child_env(args: argparse.Namespace) -> dict[str, str]:
    """The children's settings: this environment, plus the Redis URL and a --models-dir given here."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    if args.models_dir:
        env["LOCALQ_MODELS_DIR"] = str(Path(args.models_dir).resolve())
    return env


def _models_table(registry: ModelRegistry, models_dir: Path) -> Table:
    table = Table("name", "aliases", "backend", "device", title=f"models in {models_dir}")
    for config in registry.list():
        cells = (config.name, ", ".join(config.aliases), config.backend or "-", config.device)
        table.add_row(*map(escape, cells))
    return table


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback IPs; hostnames are not resolved."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_redis(url: str, what: str, read):
    """`read(client)` on a short-lived client of the Redis at `url`; an error names `what` and the URL."""
    client = redis_client(url, decode_responses=True, socket_connect_timeout=3, socket_timeout=5)
    try:
        return read(client)
    except redis.RedisError as exc:
        raise RedisServerError(f"cannot read the {what} from Redis at {redact_url(url)}: {exc}") from None
    finally:
        client.close()
