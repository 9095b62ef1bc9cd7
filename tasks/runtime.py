"""Per-process connections and state: one Redis client, job store and event log per process.

Built on first use, so a Celery worker creates them in each pool process after the fork (and a
GPU worker never touches CUDA in its parent).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import redis

from tasks.events import EventLog
from tasks.jobs import JobStore
from tasks.settings import QueueSettings

DEFAULT_MODELS_DIR = Path(__file__).resolve().parent.parent / "models"


@dataclass(frozen=True)
class Runtime:
    settings: QueueSettings
    redis: redis.Redis  # text replies: job records and event logs
    blobs: redis.Redis  # byte replies: uploads and generated files
    jobs: JobStore
    events: EventLog


def connect(settings: QueueSettings) -> Runtime:
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True, health_check_interval=30)
    blobs = redis.Redis.from_url(settings.redis_url, health_check_interval=30)
    return Runtime(settings, client, blobs, JobStore(client, settings.job_ttl), EventLog(client, settings.job_ttl))


@cache
def runtime() -> Runtime:
    return connect(QueueSettings.from_env())


def models_dir() -> Path:
    return Path(os.environ.get("LOCALQ_MODELS_DIR") or DEFAULT_MODELS_DIR)


@cache
def model_runtime():
    """The worker's model registry and model cache (imported here: only workers need them)."""
    from workers.cache import ModelCache
    from workers.registry import ModelRegistry

    max_models = int(os.environ.get("LOCALQ_MAX_LOADED_MODELS", "4"))
    max_bytes = os.environ.get("LOCALQ_MODEL_CACHE_BYTES")
    return ModelRegistry.load(models_dir()), ModelCache(max_models=max_models,
                                                       max_bytes=int(max_bytes) if max_bytes else None)
