"""Model backends. Each module imports its model library itself, only when a model is loaded.

A text backend (llama-cpp) offers `chat_prompt`, `completion_prompt`, `start` (see
`workers.backends.llama_cpp`); an embedding backend offers `embed`; both offer `tokenize`,
`detokenize` and `close`.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import MutableMapping
from typing import Any

from workers.capabilities import backend_name
from workers.config import ModelConfig, ModelConfigError

_CLASSES = {
    "llama-cpp": ("workers.backends.llama_cpp", "LlamaCppBackend"),
    "sentence-transformers": ("workers.backends.sentence_transformers", "SentenceTransformersBackend"),
    "diffusers": ("workers.backends.diffusers", "DiffusersBackend"),
    "faster-whisper": ("workers.backends.whisper", "WhisperBackend"),
    "piper": ("workers.backends.piper", "PiperBackend"),
}

# llama.cpp's CPU threads meet at an OpenMP barrier after every operation of a decode. libgomp's
# default has a waiting thread spin about 300,000 times before it sleeps: when another process
# holds the core its partner needs, the spinner burns its time slice at every barrier. Beside one
# other busy process on 2 cores, 4 sequences on one engine decoded 4-10x slower. A short spin
# decodes as fast on a quiet machine (ops/bench/batch_engine.py, README) and yields soon under
# contention. libgomp reads it when llama.cpp's library loads, so it is set before.
OPENMP_SPIN_COUNT = "10000"


def brief_openmp_spin(environ: MutableMapping[str, str] = os.environ) -> None:
    """Set GOMP_SPINCOUNT for this process unless the operator chose how OpenMP threads wait."""
    if "GOMP_SPINCOUNT" not in environ and "OMP_WAIT_POLICY" not in environ:
        environ["GOMP_SPINCOUNT"] = OPENMP_SPIN_COUNT


def load(config: ModelConfig) -> Any:
    """Load the model `config` describes with its backend."""
    name = backend_name(config)
    if name is None:
        raise ModelConfigError(
            f"{config.source}: backend: {config.backend!r} is not a backend localq workers can run "
            f"(known: {', '.join(sorted(_CLASSES))})"
        )
    module_name, class_name = _CLASSES[name]
    brief_openmp_spin()
    return getattr(importlib.import_module(module_name), class_name)(config)
