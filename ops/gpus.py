"""Which GPUs this machine has, found without initialising CUDA in the calling process.

`localq worker --gpus all|0,1|none` (the launcher, `ops.launcher`) asks `find_gpus()` which
GPUs exist and `select_gpus()` which of them to start a worker on. Discovery never imports
torch or any CUDA library: a CUDA context created in the launcher would be inherited by nothing
useful and would hold memory on every GPU. It asks, in order:

1. `LOCALQ_SIMULATE_GPUS` (see below), when set;
2. NVML through `pynvml` (the `nvidia-ml-py` package): `nvmlInit`, `nvmlDeviceGetCount`, then
   per index `nvmlDeviceGetHandleByIndex`, `nvmlDeviceGetName`, `nvmlDeviceGetMemoryInfo`;
3. `nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader,nounits`;
4. nothing answered: no GPUs (an empty list, not an error).

GPU indexes are NVML's, the same as `nvidia-smi` prints. The launcher starts GPU workers with
`CUDA_DEVICE_ORDER=PCI_BUS_ID`, so CUDA numbers devices in that same order and
`CUDA_VISIBLE_DEVICES=<index>` reaches the GPU the index names.

`LOCALQ_SIMULATE_GPUS` -- for tests and local experiments only
-----------------------------------------------------------------
`LOCALQ_SIMULATE_GPUS=N` (or `N:SIZE`, e.g. `2:8GiB`; the size defaults to 8 GiB) replaces
discovery with N simulated GPUs named "simulated", each with SIZE of memory. Their workers are
real GPU workers as far as queues, names, `CUDA_VISIBLE_DEVICES` and memory budgets go, but they
get `LOCALQ_SIMULATED_GPU=1`, and `workers.devices` then runs their models on the CPU. So it
makes "GPU" workers that actually compute on the CPU: never set it in a deployment. `0` means
no GPUs at all, whatever the hardware.

Sizes (`parse_size`, also used by `--gpu-memory-budget` and `--cpu-memory-budget`) are bytes,
or a number with a unit: `K`, `M`, `G`, `T` and `KiB`..`TiB` are powers of 1024, `KB`..`TB`
powers of 1000 (`1.5GiB`, `512M`, `8000000000`).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

SIMULATE_ENV = "LOCALQ_SIMULATE_GPUS"
SIMULATED_NAME = "simulated"
GIB = 1024**3
DEFAULT_SIMULATED_MEMORY = 8 * GIB
NVIDIA_SMI_ARGV = ["nvidia-smi", "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"]
NVIDIA_SMI_TIMEOUT = 20.0
MIB = 1024**2

_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kib": 1024, "kb": 1000,
    "m": 1024**2, "mib": 1024**2, "mb": 1000**2,
    "g": 1024**3, "gib": 1024**3, "gb": 1000**3,
    "t": 1024**4, "tib": 1024**4, "tb": 1000**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([a-zA-Z]*)\s*$")


@dataclass(frozen=True)
class Gpu:
    """One GPU: its NVML index, its name and its total memory (0 when unknown)."""

    index: int
    name: str
    memory_bytes: int
    simulated: bool = False


class GpuSelectionError(ValueError):
    """`--gpus` asks for GPUs this machine does not have, or is malformed."""


def parse_size(text: str | int) -> int:
    """Bytes from `8GiB`, `512M`, `1.5G`, `1000000` (see the module docstring); at least 1."""
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE.match(str(text))
        unit = match and _UNITS.get(match.group(2).lower())
        if not match or unit is None:
            raise ValueError(f"{text!r} is not a size (bytes, or a number with K, M, G, T, KiB.., KB..)")
        value = int(float(match.group(1)) * unit)
    if value < 1:
        raise ValueError(f"{text!r}: a size must be at least one byte")
    return value


def format_size(size: int | None) -> str:
    """`1.5 GiB`, for logs and tables (`-` for None)."""
    if size is None:
        return "-"
    for unit, scale in (("TiB", 1024**4), ("GiB", GIB), ("MiB", MIB), ("KiB", 1024)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


# --- discovery -------------------------------------------------------------------------------


def find_gpus(environ: Mapping[str, str] | None = None) -> tuple[list[Gpu], str]:
    """The GPUs, and how they were found: `simulated`, `nvml`, `nvidia-smi` or `none`."""
    environ = os.environ if environ is None else environ
    simulate = environ.get(SIMULATE_ENV, "").strip()
    if simulate:
        return simulated_gpus(simulate), "simulated"
    gpus = nvml_gpus()
    if gpus is not None:
        return gpus, "nvml"
    gpus = nvidia_smi_gpus()
    if gpus is not None:
        return gpus, "nvidia-smi"
    return [], "none"


def discover(environ: Mapping[str, str] | None = None) -> list[Gpu]:
    """The GPUs of this machine (see `find_gpus`); empty when none are found."""
    return find_gpus(environ)[0]


def simulated_gpus(spec: str) -> list[Gpu]:
    """`N` or `N:SIZE` (the value of LOCALQ_SIMULATE_GPUS) as N simulated GPUs."""
    count_text, _, memory_text = spec.strip().partition(":")
    try:
        count = int(count_text)
        if count < 0:
            raise ValueError("negative")
        memory = parse_size(memory_text) if memory_text.strip() else DEFAULT_SIMULATED_MEMORY
    except ValueError:
        raise ValueError(
            f"{SIMULATE_ENV}={spec!r}: expected a GPU count, optionally with memory, such as 2 or 2:8GiB"
        ) from None
    return [Gpu(index, SIMULATED_NAME, memory, simulated=True) for index in range(count)]


def _import_nvml():
    import pynvml

    return pynvml


def nvml_gpus() -> list[Gpu] | None:
    """The GPUs NVML reports, or None when NVML is missing or fails (no driver, no library)."""
    try:
        nvml = _import_nvml()
    except ImportError:
        return None
    try:
        nvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ...
        log.debug("NVML unavailable: %s", exc)
        return None
    try:
        gpus = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            name = nvml.nvmlDeviceGetName(handle)
            if isinstance(name, bytes):  # older bindings
                name = name.decode(errors="replace")
            gpus.append(Gpu(index, str(name), int(nvml.nvmlDeviceGetMemoryInfo(handle).total)))
        return gpus
    except Exception as exc:
        log.debug("NVML failed while listing GPUs: %s", exc)
        return None
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001 - nothing to do about it
            pass


def nvidia_smi_gpus() -> list[Gpu] | None:
    """The GPUs `nvidia-smi` lists, or None when it is missing or fails."""
    try:
        done = subprocess.run(NVIDIA_SMI_ARGV, capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT,
                              check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("nvidia-smi unavailable: %s", exc)
        return None
    if done.returncode != 0:
        log.debug("nvidia-smi failed (status %s): %s", done.returncode, done.stderr.strip())
        return None
    return parse_nvidia_smi(done.stdout)


def parse_nvidia_smi(text: str) -> list[Gpu]:
    """`index, name, memory.total` lines (memory in MiB; `[N/A]` is unknown, 0) as GPUs."""
    gpus = []
    for line in text.splitlines():
        fields = [field.strip() for field in line.split(",")]
        if len(fields) < 3 or not fields[0].isdigit():
            continue
        index, name, memory = int(fields[0]), ", ".join(fields[1:-1]), fields[-1]
        try:
            memory_bytes = int(float(memory) * MIB)
        except ValueError:
            memory_bytes = 0
        gpus.append(Gpu(index, name, memory_bytes))
    return sorted(gpus, key=lambda gpu: gpu.index)


# --- selection -------------------------------------------------------------------------------


def parse_gpu_spec(text: str) -> str | tuple[int, ...]:
    """`all`, `none`, or a tuple of indexes from `0,1`; GpuSelectionError when malformed."""
    value = text.strip().lower()
    if value in ("all", "none"):
        return value
    parts = [part.strip() for part in value.split(",")]
    if not parts or not all(part.isdigit() for part in parts):
        raise GpuSelectionError(f"--gpus {text!r}: expected all, none, or GPU indexes such as 0,1")
    return tuple(dict.fromkeys(int(part) for part in parts))


def visible_indexes(environ: Mapping[str, str] | None = None) -> set[int] | None:
    """The indexes CUDA_VISIBLE_DEVICES allows in this environment, or None when it is unset."""
    environ = os.environ if environ is None else environ
    value = environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    parts = [part.strip() for part in value.split(",") if part.strip()]
    if not all(part.isdigit() for part in parts):
        raise GpuSelectionError(
            f"CUDA_VISIBLE_DEVICES={value!r}: the launcher gives each worker its GPU by index; "
            "unset it (or set indexes only) and choose GPUs with --gpus"
        )
    return {int(part) for part in parts}


def select_gpus(spec: str | Sequence[int], gpus: Sequence[Gpu],
                visible: set[int] | None = None) -> list[Gpu]:
    """The GPUs `--gpus` asks for among `gpus` (the discovered ones).

    `all`: every one (`visible`, CUDA_VISIBLE_DEVICES of the launcher's environment, limits
    real GPUs to those indexes; simulated ones ignore it); `none`: none; indexes: exactly those,
    GpuSelectionError naming any that is not there.
    """
    if isinstance(spec, str):
        spec = parse_gpu_spec(spec)
    allowed = [gpu for gpu in gpus if gpu.simulated or visible is None or gpu.index in visible]
    if spec == "none":
        return []
    if spec == "all":
        return list(allowed)
    by_index = {gpu.index: gpu for gpu in gpus}
    missing = [index for index in spec if index not in by_index]
    if missing:
        found = ", ".join(str(gpu.index) for gpu in gpus) or "none"
        raise GpuSelectionError(
            f"--gpus {','.join(map(str, spec))}: no GPU {', '.join(map(str, missing))} on this machine "
            f"(GPUs found: {found})"
        )
    hidden = [index for index in spec if by_index[index] not in allowed]
    if hidden:
        raise GpuSelectionError(
            f"--gpus {','.join(map(str, spec))}: GPU {', '.join(map(str, hidden))} is hidden by "
            f"CUDA_VISIBLE_DEVICES in this environment (it allows: {', '.join(map(str, sorted(visible))) or 'none'})"
        )
    return [by_index[index] for index in spec]
