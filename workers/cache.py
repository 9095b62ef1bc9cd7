"""Loaded models of one worker process: each loaded once, least recently used evicted first.

A worker with several job slots (`workers.slots`) runs jobs in threads that share these models, so
a job holds its model through `lease`: a leased model is never evicted under a running job, and at
most `backend.concurrent_jobs` jobs use one backend at once (1 unless the backend says more: the
llama-cpp backend batches `parallel` sequences; pipelines such as diffusers' are not thread-safe).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workers.backends import load  # light: each backend imports its model library when a model loads
from workers.config import ModelConfig

log = logging.getLogger(__name__)


def model_size(config: ModelConfig) -> int:
    """Bytes the model takes on disk: its file, or every file under its folder.

    Raises ModelConfigError (naming the config) when the model is missing.
    """
    path = config.locate_model()
    if path.is_dir():
        return sum(_file_size(Path(root) / name) for root, _, names in os.walk(path) for name in names)
    return _file_size(path)


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


@dataclass
class _Entry:
    config: ModelConfig
    backend: Any
    size: int
    users: int = 0  # jobs holding a lease on it now
    retired: bool = False  # evicted while in use: closed when its last user leaves
    gate: threading.BoundedSemaphore = field(init=False)

    def __post_init__(self) -> None:
        self.gate = threading.BoundedSemaphore(max(1, int(getattr(self.backend, "concurrent_jobs", 1) or 1)))


def _close(name: str, backend: Any) -> None:
    log.info("unloading model %s", name)
    close = getattr(backend, "close", None)
    if callable(close):
        close()


class ModelCache:
    """Backends by model name, within `max_models` and `max_bytes` (None: no limit).

    `get` loads on first use; before loading, the least recently used models are evicted
    until the new one fits. A model bigger than `max_bytes` on its own is still loaded, alone.
    `loader(config)` builds a backend (default: `workers.backends.load`); an evicted backend's
    `close()` is called when it has one.
    """

    def __init__(
        self,
        max_models: int | None = None,
        max_bytes: int | None = None,
        loader: Callable[[ModelConfig], Any] | None = None,
    ):
        if max_models is not None and max_models < 1:
            raise ValueError("max_models must be at least 1")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        self.max_models = max_models
        self.max_bytes = max_bytes
        self._loader = loader or load
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.RLock()
        self._loading: dict[str, threading.Lock] = {}  # one per model name: a model loads once at a time
        self._reserved = 0  # bytes of the models loading now
        self.evictions = 0  # models unloaded to make room for another

    def get(self, config: ModelConfig) -> Any:
        """The loaded backend for `config`, loading it (and evicting others) when needed."""
        return self._entry(config).backend

    @contextmanager
    def lease(self, config: ModelConfig) -> Iterator[Any]:
        """`get`, held for one job: not evicted meanwhile; waits while the backend already runs
        as many jobs as it can at once."""
        entry = self._entry(config, hold=True)
        try:
            with entry.gate:
                yield entry.backend
        finally:
            with self._lock:
                entry.users -= 1
                closing = entry.retired and entry.users == 0
            if closing:
                _close(entry.config.name, entry.backend)

    def _entry(self, config: ModelConfig, *, hold: bool = False) -> _Entry:
        """The entry for `config`, loaded now if it is not (`hold`: counted as in use before the
        lock is let go). A model loads outside the cache's lock: jobs on loaded models go on
        meanwhile; two jobs wanting the same model wait for one load."""
        name = config.name
        with self._lock:
            found = self._current(config, hold)
            if found is not None:
                return found
            loading = self._loading.setdefault(name, threading.Lock())
        with loading:
            with self._lock:
                found = self._current(config, hold)
                if found is not None:
                    return found
                if name in self._entries:  # the config changed since it was loaded
                    self.evict(name)
                size = model_size(config)
                self._make_room(size)
                self._reserved += size
            try:
                log.info("loading model %s (%d bytes)", name, size)
                backend = self._loader(config)
            finally:
                with self._lock:
                    self._reserved -= size
            with self._lock:
                # a backend that knows what it takes once loaded (weights and caches) says so
                entry = _Entry(config, backend, int(getattr(backend, "memory_bytes", None) or size), users=int(hold))
                self._entries[name] = entry
                if entry.size > size:
                    self._make_room(0, keep=name)
                return entry

    def _current(self, config: ModelConfig, hold: bool) -> _Entry | None:
        """(Under the lock.) The loaded entry for exactly this config, marked as just used."""
        entry = self._entries.get(config.name)
        if entry is None or entry.config != config:
            return None
        self._entries.move_to_end(config.name)
        entry.users += int(hold)
        return entry

    def evict(self, name: str) -> bool:
        """Unload model `name` (once the jobs using it are done); False when it was not loaded."""
        with self._lock:
            entry = self._entries.pop(name, None)
            if entry is not None and entry.users:
                entry.retired = True
                return True
        if entry is None:
            return False
        _close(name, entry.backend)
        return True

    def clear(self) -> None:
        """Unload every model."""
        for name in self.loaded():
            self.evict(name)

    def loaded(self) -> list[str]:
        """Names of the loaded models, least recently used first."""
        with self._lock:
            return list(self._entries)

    def has_room(self, config: ModelConfig) -> bool:
        """Whether `config`'s model is loaded, or would load without evicting another."""
        with self._lock:
            entry = self._entries.get(config.name)
            return (entry is not None and entry.config == config) or not self._over_budget(model_size(config))

    def backends(self) -> dict[str, Any]:
        """The loaded backends by model name (for reports such as a worker's heartbeat)."""
        with self._lock:
            return {name: entry.backend for name, entry in self._entries.items()}

    @property
    def used_bytes(self) -> int:
        """Sum of the loaded models' sizes."""
        with self._lock:
            return sum(entry.size for entry in self._entries.values())

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._entries

    def _make_room(self, size: int, keep: str | None = None) -> None:
        """Evict the least recently used models until `size` more bytes fit; a model a job is
        using stays (the budget is then exceeded until that job ends), and so does `keep`."""
        while self._entries and self._over_budget(size, extra=0 if keep is None else -1):
            idle = [name for name, entry in self._entries.items() if not entry.users and name != keep]
            if not idle:
                log.warning("model budget exceeded: the models left are in use by running jobs (or just loaded)")
                return
            self.evict(idle[0])
            self.evictions += 1

    def _over_budget(self, incoming: int, extra: int = 0) -> bool:
        """Whether one more model (`extra` -1: none, it is in already) of `incoming` bytes would not fit."""
        if self.max_models is not None and len(self._entries) + 1 + extra > self.max_models:
            return True
        return self.max_bytes is not None and self.used_bytes + self._reserved + incoming > self.max_bytes
