"""`system_fingerprint`: which model file, settings and library produced an answer.

OpenAI's responses carry a string that changes whenever the backend configuration that shapes
outputs changes, so a client seeing different answers to a seeded request can tell whether the
setup changed. Ours hashes the model file's identity (path, size, modification time: cheap, no
need to read gigabytes), the config fields that affect generation, and the backend's version.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from workers.config import ModelConfig

#: Config fields that name, describe or place the model without changing what it generates.
_NOT_OUTPUT = frozenset({"name", "aliases", "description", "source", "created", "known_usecases", "pool", "gpus",
                         "model_ref", "model_file"})


def fingerprint(config: ModelConfig, model_file: Path, backend_version: str) -> str:
    """`fp_` and 10 hex digits, stable while the file, the settings and the backend stay the same."""
    stat = model_file.stat()
    settings = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in _NOT_OUTPUT}
    identity = {
        "file": [str(model_file.resolve()), stat.st_size, stat.st_mtime_ns],
        "config": settings,
        "backend": backend_version,
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode("utf-8")).hexdigest()
    return f"fp_{digest[:10]}"
