"""Model backends. Each module imports its model library itself, only when a model is loaded.

A text backend (llama-cpp) offers `chat_prompt`, `completion_prompt`, `start` (see
`workers.backends.llama_cpp`); an embedding backend offers `embed`; both offer `tokenize`,
`detokenize` and `close`.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable, MutableMapping
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

# llama.cpp's CPU threads meet at an OpenMP barrier after every operation of a decode; a thread
# that waits spins GOMP_SPINCOUNT times, then sleeps until woken (libgomp's default: about
# 300,000). Which count is right depends on what else computes beside the model's threads:
# * Only llama.cpp (a worker serving llama-cpp models alone): spin long. A partner thread held up a
#   moment by the API, Redis or the event sender is met without a sleep and a wake-up, and the
#   threads stay awake between engine steps. On the 2-core machine, 4 streams through localq gave
#   108.3 / 112.3 / 124.1 tok/s with 10,000 / 100,000 / 1,000,000 (llama-server 123.2, one run).
# * Other CPU models in the same worker (torch, whisper): spin briefly. A spinning thread burns the
#   core another model's thread needs: beside one other busy process on 2 cores, 4 sequences on
#   one engine decoded 4-10x slower with libgomp's default.
# libgomp reads the count when its library loads, so it is set before any model loads.
LONG_OPENMP_SPIN = "1000000"  # about 12 ms of spinning after the last decode, on the 2-core machine
BRIEF_OPENMP_SPIN = "10000"


def openmp_spin(configs: Iterable[ModelConfig]) -> str:
    """The GOMP_SPINCOUNT for a worker serving `configs` (brief when none are known)."""
    backends = {backend_name(config) for config in configs}
    return LONG_OPENMP_SPIN if backends == {"llama-cpp"} else BRIEF_OPENMP_SPIN


def choose_openmp_spin(configs: Iterable[ModelConfig] = (), environ: MutableMapping[str, str] = os.environ) -> None:
    """Set GOMP_SPINCOUNT for this process unless the operator chose how OpenMP threads wait, or
    it was chosen already (the worker chooses at start, from every model it serves)."""
    if "GOMP_SPINCOUNT" not in environ and "OMP_WAIT_POLICY" not in environ:
        environ["GOMP_SPINCOUNT"] = openmp_spin(configs)


def load(config: ModelConfig) -> Any:
    """Load the model `config` describes with its backend."""
    name = backend_name(config)
    if name is None:
        raise ModelConfigError(
            f"{config.source}: backend: {config.backend!r} is not a backend localq workers can run "
            f"(known: {', '.join(sorted(_CLASSES))})"
        )
    module_name, class_name = _CLASSES[name]
    choose_openmp_spin()
    return getattr(importlib.import_module(module_name), class_name)(config)
