"""`GET /healthz` (liveness) and `GET /readyz` (readiness), both open without an API key.

- `/healthz`: 200 `{"status": "ok"}` whenever the process answers; it touches nothing else, so
  a Redis outage never gets the API restarted.
- `/readyz`: 200 when Redis answers PING and every device tag a configured model needs (its
  config's `device`) has at least one live worker (`store.heartbeats.live_workers`); else 503
  saying what is missing, e.g. `{"status": "unready", "redis": true, "missing_devices": ["gpu"],
  "workers": {"cpu": 1, "gpu": 0}}`. With Redis unreachable no worker can be reached either, so
  every needed device counts as missing (`"redis": false`). For a load balancer: this API can
  serve every configured model now.

Both read Redis through their own client (`monitor_client`), with short timeouts and no retries,
so a probe (and a `/metrics` scrape) answers within about a second even when Redis is gone or
unreachable, instead of waiting out the retries of the job path's client.
"""

from __future__ import annotations

import redis
from flask import Blueprint, current_app
from redis.backoff import NoBackoff
from redis.retry import Retry

from tasks.redis_url import redis_client
from store.heartbeats import live_workers

blueprint = Blueprint("health", __name__)

#: Seconds a probe waits for Redis to accept the connection, then for each reply.
CONNECT_TIMEOUT = 1.0
REPLY_TIMEOUT = 2.0
_CLIENT = "localq.monitor_redis"


def monitor_client() -> redis.Redis:
    """This app's Redis client for probes and scrapes: fails fast, never retries."""
    extensions = current_app.extensions
    if _CLIENT not in extensions:
        extensions[_CLIENT] = redis_client(
            current_app.config["LOCALQ"].queue.redis_url, decode_responses=True,
            socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=REPLY_TIMEOUT,
            retry=Retry(NoBackoff(), 0), retry_on_timeout=False,
        )
    return extensions[_CLIENT]


def needed_devices() -> list[str]:
    """The device tags the configured models run on."""
    return sorted({config.device for config in current_app.extensions["localq.models"].list()})


@blueprint.get("/healthz")
def healthz():
    """Liveness only: the process is up and answering."""
    return {"status": "ok"}


@blueprint.get("/readyz")
def readyz():
    needed = needed_devices()
    client = monitor_client()
    try:
        client.ping()
        workers = live_workers(client)
    except (redis.RedisError, OSError):
        return {"status": "unready", "redis": False, "missing_devices": needed, "workers": {}}, 503
    counts = {device: 0 for device in needed}
    for worker in workers:
        device = worker.get("device")
        if isinstance(device, str):
            counts[device] = counts.get(device, 0) + 1
    missing = [device for device in needed if counts[device] == 0]
    body = {"status": "unready" if missing else "ready", "redis": True, "missing_devices": missing,
            "workers": counts}
    return body, 503 if missing else 200
