"""Where a backend runs a model: on the GPU the worker was given, or on the CPU.

A model config's `device: gpu` means "a GPU worker runs it". The backends ask here instead of
reading `config.device` themselves, so one rule decides:

- `device: cpu` models run on the CPU (and llama.cpp offloads no layers);
- `device: gpu` models run on CUDA (`cuda`, i.e. the first device CUDA sees: the launcher gives
  each GPU worker exactly one with `CUDA_VISIBLE_DEVICES`), with every llama.cpp layer offloaded
  unless the config's `gpu_layers` says how many;
- except on a simulated GPU worker (`LOCALQ_SIMULATED_GPU=1`, set by the launcher under
  `LOCALQ_SIMULATE_GPUS`, for tests and local experiments only): it has no GPU, so its models
  run on the CPU.

Nothing here imports torch or CUDA.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from workers.config import ModelConfig

SIMULATED_ENV = "LOCALQ_SIMULATED_GPU"
#: llama.cpp's "offload every layer".
ALL_LAYERS = -1


def simulated_gpu(environ: Mapping[str, str] | None = None) -> bool:
    """True in a simulated GPU worker (models then run on the CPU)."""
    environ = os.environ if environ is None else environ
    return environ.get(SIMULATED_ENV, "").strip() == "1"


def uses_gpu(config: ModelConfig, environ: Mapping[str, str] | None = None) -> bool:
    """Whether this worker runs `config`'s model on a GPU."""
    return config.device == "gpu" and not simulated_gpu(environ)


def torch_device(config: ModelConfig, environ: Mapping[str, str] | None = None) -> str:
    """`cuda` or `cpu`: the device for torch-style libraries (torch, CTranslate2)."""
    return "cuda" if uses_gpu(config, environ) else "cpu"


def gpu_layers(config: ModelConfig, environ: Mapping[str, str] | None = None) -> int:
    """llama.cpp's `n_gpu_layers`: the config's `gpu_layers` (all layers when unset) on a GPU, else 0."""
    if not uses_gpu(config, environ):
        return 0
    return ALL_LAYERS if config.gpu_layers is None else config.gpu_layers
