"""This app's connections to the job queue's Redis (job records, event logs, files), made on first use."""

from __future__ import annotations

from flask import current_app

from tasks.heartbeats import CachedWorkers
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
    """The live workers' heartbeats, read from Redis at most once a second per API process."""
    extensions = current_app.extensions
    if "localq.workers" not in extensions:
        extensions["localq.workers"] = CachedWorkers(max_age=1.0)
    return extensions["localq.workers"].get(queue_runtime().redis)
