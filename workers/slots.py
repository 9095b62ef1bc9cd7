"""How many jobs a worker runs at once: one per sequence its text models decode together.

A llama-cpp text model batches up to `parallel` sequences in one engine (`workers.batching`), so a
worker serving it takes that many jobs at once (Celery's threads pool, one thread per slot; the
jobs share the loaded model). Every other model runs one job at a time (`sequences` 1): a worker
serving only those stays a prefork worker with one pool process, as before batching.
"""

from __future__ import annotations

from collections.abc import Iterable

from workers.capabilities import backend_name
from workers.config import ModelConfig


def sequences(config: ModelConfig) -> int:
    """Jobs of this model one worker runs at once."""
    if backend_name(config) == "llama-cpp" and not config.embeddings:
        return config.default_parallel
    return 1


def worker_slots(configs: Iterable[ModelConfig]) -> int:
    """A worker's job slots: the most sequences any one of the models it serves runs at once."""
    return max((sequences(config) for config in configs), default=1)
