"""Loaded models of one worker process: each loaded once, least recently used evicted first."""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def _default_loader(config: ModelConfig) -> Any:
    from workers.backends import load

    return load(config)


@dataclass
class _Entry:
    config: ModelConfig
    backend: Any
    size: int


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
        self._loader = loader or _default_loader
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.RLock()
        self.evictions = 0  # models unloaded to make room for another

    def get(self, config: ModelConfig) -> Any:
        """The loaded backend for `config`, loading it (and evicting others) when needed."""
        with self._lock:
            entry = self._entries.get(config.name)
            if entry is not None and entry.config == config:
                self._entries.move_to_end(config.name)
                return entry.backend
            if entry is not None:  # the config changed since it was loaded
                self.evict(config.name)
            size = model_size(config)
            self._make_room(size)
            log.info("loading model %s (%d bytes)", config.name, size)
            backend = self._loader(config)
            self._entries[config.name] = _Entry(config, backend, size)
            return backend

    def evict(self, name: str) -> bool:
        """Unload model `name`; False when it was not loaded."""
        with self._lock:
            entry = self._entries.pop(name, None)
        if entry is None:
            return False
        log.info("unloading model %s", name)
        close = getattr(entry.backend, "close", None)
        if callable(close):
            close()
        return True

    def clear(self) -> None:
        """Unload every model."""
        for name in self.loaded():
            self.evict(name)

    def loaded(self) -> list[str]:
        """Names of the loaded models, least recently used first."""
        with self._lock:
            return list(self._entries)

    @property
    def used_bytes(self) -> int:
        """Sum of the loaded models' sizes."""
        with self._lock:
            return sum(entry.size for entry in self._entries.values())

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._entries

    def _make_room(self, size: int) -> None:
        while self._entries and self._over_budget(size):
            oldest = next(iter(self._entries))
            self.evict(oldest)
            self.evictions += 1

    def _over_budget(self, incoming: int) -> bool:
        if self.max_models is not None and len(self._entries) + 1 > self.max_models:
            return True
        return self.max_bytes is not None and self.used_bytes + incoming > self.max_bytes
