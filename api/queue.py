"""This app's connections to the job queue's Redis (job records, event logs, files), made on first use.

A new request keeps redis-py's defaults (redis-py 8: one try, a 5 s socket timeout), so it
answers 503 soon when Redis is gone. Whoever follows a job already running (a stream, a wait for its result) has
more to lose and rides over Redis being away (stalled, restarting) for the `relay_ride_over` setting
seconds: reads are tried again with backoff, then the client gets an error, never a cut
connection (see `api.sse.relay`).
"""

from __future__ import annotations

from flask import current_app

from store.heartbeats import CachedWorkers
from tasks.runtime import Runtime, connect


def queue_runtime() -> Runtime:
    extensions = current_app.extensions
    if "localq.queue" not in extensions:
        extensions["localq.queue"] = connect(current_app.config["LOCALQ"].queue)
    return extensions["localq.queue"]


def setting(name: str):
    """One of the app's settings (`api.settings.Settings`)."""
    return getattr(current_app.config["LOCALQ"], name)


def live_workers_cached() -> list[dict]:
    """The live workers' heartbeats, read from Redis at most once per `workers_max_age` seconds
    per API process (0: on every call, on the request's own time)."""
    extensions = current_app.extensions
    if "localq.workers" not in extensions:
        max_age = setting("workers_max_age")
        extensions["localq.workers"] = CachedWorkers(max_age=max_age, stale_limit=10.0 if max_age else 0.0)
    return extensions["localq.workers"].get(queue_runtime().redis)
