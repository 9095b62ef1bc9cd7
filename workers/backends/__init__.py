"""Model backends. Each module imports its model library itself, only when a model is loaded.

A text backend (llama-cpp) offers `chat_prompt`, `completion_prompt`, `start` (see
`workers.backends.llama_cpp`); an embedding backend offers `embed`; both offer `tokenize`,
`detokenize` and `close`.
"""

from __future__ import annotations

import importlib
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


def load(config: ModelConfig) -> Any:
    """Load the model `config` describes with its backend."""
    name = backend_name(config)
    if name is None:
        raise ModelConfigError(
            f"{config.source}: backend: {config.backend!r} is not a backend localq workers can run "
            f"(known: {', '.join(sorted(_CLASSES))})"
        )
    module_name, class_name = _CLASSES[name]
    return getattr(importlib.import_module(module_name), class_name)(config)
