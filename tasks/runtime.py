"""Per-process connections and state: one Redis client, job store and event log per process.

Built on first use, so a Celery worker creates them in each pool process after the fork (and a
GPU worker never touches CUDA in its parent).

A worker's clients (`runtime()`) ride over a Redis restart: a command that meets a dropped
connection, a refused one or a server still loading its append-only file (BusyLoadingError is a
ConnectionError) is sent again with exponential backoff for about 37 s, so a job or
batch line running across the restart records its outcome instead of failing or losing it. The
API's clients (`connect()` as `api.queue` calls it) keep redis-py's short default retries, so a
request answers 503 soon when Redis is gone.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from tasks.redis_url import redis_client
from store.events import EventLog
from store.jobs import JobStore
from store.spill import Spill
from tasks.settings import QueueSettings
from tasks.worker_settings import WorkerSettings
from workers.cache import ModelCache  # light: a model's library is imported when the model loads
from workers.registry import ModelRegistry

# Backoff 0.1, 0.2, 0.4, 0.8 s, then 1 s per try: about 37 s of Redis being away before a command fails.
RIDE_OVER_BACKOFF = {"base": 0.05, "cap": 1.0}
RIDE_OVER_RETRIES = 40


T = TypeVar("T")


class once(Generic[T]):  # noqa: N801 - used as a decorator, like functools.cache
    """A no-argument function's value, built on the first call and shared after: unlike
    functools.cache, two threads calling it first at once (a worker's job slots, its heartbeat
    and its preload) get one value, never two (two model caches would load every model twice)."""

    def __init__(self, build: Callable[[], T]):
        self._build = build
        self._lock = threading.Lock()
        self._value: list[T] = []
        self.__doc__ = build.__doc__
        self.__name__ = build.__name__

    def __call__(self) -> T:
        if not self._value:
            with self._lock:
                if not self._value:
                    self._value.append(self._build())
        return self._value[0]

    def cache_clear(self) -> None:
        with self._lock:
            self._value.clear()


@dataclass(frozen=True)
class Runtime:
    settings: QueueSettings
    redis: redis.Redis  # text replies: job records and event logs
    blobs: redis.Redis  # byte replies: uploaded files
    jobs: JobStore
    events: EventLog


def ride_over_retry() -> Retry:
    """The retry policy of a worker's clients: commands wait out a Redis restart of several seconds."""
    return Retry(ExponentialBackoff(**RIDE_OVER_BACKOFF), RIDE_OVER_RETRIES,
                 supported_errors=(RedisConnectionError, RedisTimeoutError))


def connect(settings: QueueSettings, *, ride_over: bool = False) -> Runtime:
    # redis-py caps a pool at 100 connections by default; an API process holds one per open stream
    # (blocked in XREAD), so past 100 streams every other command would fail. A pool opens
    # connections only as they are needed: a high cap costs nothing.
    # Explicit timeouts (redis-py before 8 has none): a stalled Redis fails a command after 5 s
    # instead of hanging it; every blocking read (XREAD BLOCK) asks for less than that.
    options: dict = {"health_check_interval": 30, "max_connections": 10_000, "socket_timeout": 5,
                     "socket_connect_timeout": 5}
    if ride_over:
        options.update(retry=ride_over_retry(), retry_on_error=[RedisConnectionError, RedisTimeoutError])
    client = redis_client(settings.redis_url, decode_responses=True, **options)
    blobs = redis_client(settings.redis_url, **options)
    spill = Spill.under(settings.files_dir)  # large results: in the file store, a reference in Redis
    return Runtime(settings, client, blobs, JobStore(client, settings.job_ttl, spill),
                   EventLog(client, settings.job_ttl, settings.resume_window, spill))


@once
def runtime() -> Runtime:
    """This worker process's settings and connections (they ride over a Redis restart)."""
    return connect(QueueSettings.from_env(), ride_over=True)


@once
def worker_settings() -> WorkerSettings:
    """This worker process's own settings (model cache, heartbeat), read once."""
    return WorkerSettings.from_env()


def models_dir() -> Path:
    """The model configs this worker process serves (LOCALQ_MODELS_DIR; callers cache what they load)."""
    return QueueSettings.from_env().models_dir


@once
def model_runtime():
    """The worker's model registry and model cache (built on first use: only workers need them)."""
    own = worker_settings()
    return ModelRegistry.load(models_dir()), ModelCache(max_models=own.max_loaded_models,
                                                       max_bytes=own.model_cache_bytes)
