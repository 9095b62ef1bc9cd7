"""Settings only a worker reads: its model cache and its heartbeat.

Apart from `tasks.settings.QueueSettings`, which the API and every worker must agree on: these
may differ from one worker to the next (a GPU worker's cache budget is not a CPU worker's), and
the API never reads them. `localq worker` and `localq up` read them before starting a worker, so
a typo stops start-up with an error naming the variable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from tasks.settings import optional_positive_int, positive_int, positive_number


@dataclass(frozen=True)
class WorkerSettings:
    # models a worker process keeps loaded (least recently used evicted first)
    max_loaded_models: int = 8  # the byte budget (model_cache_bytes) is the real bound; the default models all fit
    # bytes the loaded models' files may take (None: no limit); the launcher sets one per worker
    model_cache_bytes: int | None = None
    # seconds between a worker's heartbeats (`store.heartbeats`)
    heartbeat_interval: float = 2.0
    # seconds between a worker's sends of job events to Redis (`tasks.publisher`): tokens after a
    # job's first wait at most this long and go together; 0 sends each as soon as it can
    stream_interval: float = 0.05

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> WorkerSettings:
        """Read the variables; a malformed value raises ValueError naming it."""
        return cls(
            max_loaded_models=positive_int(environ, "LOCALQ_MAX_LOADED_MODELS", cls.max_loaded_models),
            model_cache_bytes=optional_positive_int(environ, "LOCALQ_MODEL_CACHE_BYTES"),
            heartbeat_interval=positive_number(environ, "LOCALQ_HEARTBEAT_INTERVAL", cls.heartbeat_interval),
            stream_interval=positive_number(environ, "LOCALQ_STREAM_INTERVAL", cls.stream_interval, allow_zero=True),
        )
