"""`localq worker`: a supervisor that runs one Celery worker process per GPU, and N on the CPU.

    localq worker                                   # every GPU found, and one CPU worker
    localq worker --gpus 0,1 --cpu 2 --pool batch   # GPUs 0 and 1, two CPU workers, all in pool "batch"
    localq worker --gpus none --cpu 1               # one CPU worker (GPUs are not even looked for)
    localq worker --gpus all --cpu 0 --gpu-memory-budget 20GiB
    localq worker -Q cpu -n cpu@%h                  # no launcher: this process becomes one Celery worker
                                                    # (what `localq up` runs; see ops/commands/worker.py)

Options: `--gpus all|none|I,J,...` (default `all`: the GPUs `ops.gpus` finds, none found is fine),
`--cpu N` (default 1), `--pool NAME` (repeatable: every worker started also serves the pool's
queue), `--gpu-memory-budget SIZE` (default 90% of each GPU's memory), `--cpu-memory-budget SIZE`
(default 70% of the machine's RAM shared out among the CPU workers), `-l/--loglevel` (default
warning). A `LOCALQ_MODEL_CACHE_BYTES` already set in the environment is the budget of every
worker for which no flag gives one. Sizes are bytes or `8GiB`, `512M`, ... (`ops.gpus.parse_size`).

Every worker is `python -m celery -A tasks.celery_app:app worker --pool P --concurrency N
--prefetch-multiplier 1 --without-gossip --without-mingle --queues Q --hostname NAME --loglevel L`
(`ops.common.worker_argv`), N being its job slots (`workers.slots`: the most sequences one of the
text models it serves batches) and P `threads` for more than one slot, else `prefork`, named `gpu<i>@<host>` (i: the GPU's index) or `cpu<k>@<host>` (k from 0),
the host being `socket.gethostname()`, spelled out (no `%h`: the name is part of a queue name).
Its queues are `tasks.routing.worker_queues(...)` for its device, GPU, pools and name, given the
model configs of the models dir. Its environment, set before it starts, adds:

    CUDA_VISIBLE_DEVICES      the GPU's index (a GPU worker sees exactly its GPU); "" on a CPU worker
    CUDA_DEVICE_ORDER         PCI_BUS_ID, so CUDA's index i is NVML's (nvidia-smi's) index i
    LOCALQ_WORKER_DEVICE      gpu | cpu
    LOCALQ_GPU_INDEX          the GPU's index (GPU workers only)
    LOCALQ_SIMULATED_GPU      1 on a simulated GPU (LOCALQ_SIMULATE_GPUS; models run on the CPU)
    LOCALQ_MODEL_CACHE_BYTES  the worker's memory budget (workers.cache.ModelCache's max_bytes)
    LOCALQ_WORKER_POOLS       the --pool names, comma-separated
    LOCALQ_MODELS_DIR         the models dir the queues were computed from (an absolute path)

`tasks.worker_signals` reads these names to describe the worker in its heartbeats.

Supervision is ops/supervisor.py's, as for `localq up`: a worker that exits while the launcher is
not stopping is started again, with the same name and environment, after 1 s, then 2, 4, ... up to
30 s for one that keeps failing; the delay starts again from 1 s once a worker has run for 60 s.
Its leftover pool processes are killed first, so an orphan never runs a job that is being
redelivered. Each worker's output is relayed to the launcher's stderr, every line prefixed with the
worker's short name (`gpu0 | ...`).

Stopping: SIGTERM, SIGINT (Ctrl-C) or SIGHUP send SIGTERM to every worker: Celery's warm
shutdown, where running jobs finish, and with late acks and prefetch 1 per slot nothing still queued is
taken, so nothing is lost. After `QueueSettings.drain_timeout` (LOCALQ_JOB_TIMEOUT + 30 s, when
every job has hit its hard time limit) stragglers get SIGKILL. A second signal hurries the stop:
SIGQUIT (Celery's cold shutdown: running jobs are put back on their queues by late acks), then
SIGKILL 10 s later. The launcher then exits 0. Workers are started with PR_SET_PDEATHSIG, so a
launcher killed with SIGKILL takes its workers with it (each gets SIGTERM, a warm shutdown).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from ops.gpus import Gpu, format_size
from ops.common import celery_pool, served_slots, worker_argv
from ops.supervisor import RESTART, Program, Supervisor
from tasks.routing import queue_for, worker_queues
from tasks.settings import QueueSettings

log = logging.getLogger(__name__)

GPU_MEMORY_SHARE = 0.9  # of each GPU's memory, its worker's default budget
CPU_MEMORY_SHARE = 0.7  # of the machine's RAM, shared out among the CPU workers
DRAIN_TIMEOUT = QueueSettings().drain_timeout  # with the default job timeout; `localq worker` passes its own

#: Environment names the launcher decides for each worker; inherited values are dropped first.
OWNED_ENV = (
    "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "LOCALQ_WORKER_DEVICE", "LOCALQ_GPU_INDEX",
    "LOCALQ_SIMULATED_GPU", "LOCALQ_MODEL_CACHE_BYTES", "LOCALQ_WORKER_POOLS",
)


# --- what to run -----------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSpec:
    """One worker process: its Celery node name, device, queues and environment additions."""

    name: str
    device: str
    queues: tuple[str, ...]
    env: Mapping[str, str]
    gpu: Gpu | None = None
    memory_budget: int | None = None
    budget_source: str = ""
    slots: int = 1  # jobs it runs at once (`workers.slots`)

    @property
    def label(self) -> str:
        """`gpu0`, `cpu1`: the name without the host."""
        return self.name.partition("@")[0]

    def describe(self) -> str:
        if self.gpu is not None and self.gpu.simulated:
            where = f"simulated GPU {self.gpu.index} ({format_size(self.gpu.memory_bytes)}, models run on the CPU)"
        elif self.gpu is not None:
            memory = format_size(self.gpu.memory_bytes) if self.gpu.memory_bytes else "memory unknown"
            where = f"GPU {self.gpu.index} ({self.gpu.name}, {memory})"
        else:
            where = "CPU"
        budget = f"{format_size(self.memory_budget)} ({self.budget_source})" if self.memory_budget else "no limit"
        return (f"{self.name}: {where}; model budget {budget}; queues {', '.join(self.queues)}; "
                f"{self.slots} job slot{'s' if self.slots != 1 else ''}")


def plan_workers(
    gpus: Sequence[Gpu],
    cpu_workers: int,
    *,
    pools: Iterable[str] = (),
    configs: Iterable = (),
    hostname: str | None = None,
    gpu_memory_budget: int | None = None,
    cpu_memory_budget: int | None = None,
    total_memory: int | None = None,
    inherited_budget: int | None = None,
) -> list[WorkerSpec]:
    """The workers for these GPUs and this many CPU workers (GPU workers first, by index).

    `inherited_budget`: LOCALQ_MODEL_CACHE_BYTES as set for the launcher (`WorkerSettings`), every
    worker's budget where no flag says otherwise."""
    if cpu_workers < 0:
        raise ValueError("--cpu must be 0 or more")
    hostname = hostname or socket.gethostname()
    pools = list(dict.fromkeys(pools))
    configs = list(configs)
    inherited = inherited_budget
    common = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "LOCALQ_WORKER_POOLS": ",".join(pools)}
    specs = []
    for gpu in sorted(gpus, key=lambda g: g.index):
        name = f"gpu{gpu.index}@{hostname}"
        budget, source = _budget(gpu_memory_budget, "--gpu-memory-budget", inherited,
                                 int(gpu.memory_bytes * GPU_MEMORY_SHARE), f"{GPU_MEMORY_SHARE:.0%} of its memory")
        env = {**common, "CUDA_VISIBLE_DEVICES": str(gpu.index), "LOCALQ_WORKER_DEVICE": "gpu",
               "LOCALQ_GPU_INDEX": str(gpu.index)}
        if gpu.simulated:
            env["LOCALQ_SIMULATED_GPU"] = "1"
        if budget:
            env["LOCALQ_MODEL_CACHE_BYTES"] = str(budget)
        queues = worker_queues("gpu", gpu_index=gpu.index, pools=pools, node_name=name, configs=configs)
        specs.append(WorkerSpec(name, "gpu", tuple(queues), env, gpu, budget, source, served_slots(queues, configs)))
    if cpu_workers:
        if total_memory is None and cpu_memory_budget is None and inherited is None:
            total_memory = _total_memory()
        share = int((total_memory or 0) * CPU_MEMORY_SHARE / cpu_workers)
        budget, source = _budget(cpu_memory_budget, "--cpu-memory-budget", inherited, share,
                                 f"{CPU_MEMORY_SHARE:.0%} of RAM / {cpu_workers}")
    for k in range(cpu_workers):
        name = f"cpu{k}@{hostname}"
        env = {**common, "CUDA_VISIBLE_DEVICES": "", "LOCALQ_WORKER_DEVICE": "cpu"}
        if budget:
            env["LOCALQ_MODEL_CACHE_BYTES"] = str(budget)
        queues = worker_queues("cpu", pools=pools, node_name=name, configs=configs)
        specs.append(WorkerSpec(name, "cpu", tuple(queues), env, None, budget, source, served_slots(queues, configs)))
    return specs


def _budget(flag: int | None, flag_name: str, inherited: int | None, default: int, default_source: str):
    if flag:
        return flag, flag_name
    if inherited:
        return inherited, "LOCALQ_MODEL_CACHE_BYTES"
    if default > 0:
        return default, default_source
    return None, ""  # memory unknown (nvidia-smi said [N/A]): no limit rather than a zero one


def _total_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().total)


def unserved_queues(specs: Sequence[WorkerSpec], configs: Iterable) -> dict[str, list[str]]:
    """Model queues (with their models) that no worker in `specs` consumes."""
    consumed = {queue for spec in specs for queue in spec.queues}
    missing: dict[str, list[str]] = {}
    for config in configs:
        queue = queue_for(config)
        if queue not in consumed:
            missing.setdefault(queue, []).append(config.name)
    return missing


def child_argv(spec: WorkerSpec, loglevel: str = "warning") -> list[str]:
    """The Celery command line of one worker: as many jobs at once as it has slots, prefetch 1 each."""
    pool, concurrency = celery_pool(spec.slots)
    return worker_argv(",".join(spec.queues), concurrency=concurrency, name=spec.name, pool=pool, loglevel=loglevel)


def child_environment(spec: WorkerSpec, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this process's environment) without the names the launcher decides,
    plus the worker's own values."""
    env = {key: value for key, value in (os.environ if base is None else base).items() if key not in OWNED_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(spec.env)
    return env


# --- supervision -----------------------------------------------------------------------------


def worker_program(spec: WorkerSpec, argv: Sequence[str], env: Mapping[str, str],
                   stop_timeout: float | None = None) -> Program:
    """A worker as the supervisor runs it: restarted when it exits, stopped with the other workers."""
    return Program(spec.label, list(argv), env, RESTART, group="workers", stop_timeout=stop_timeout,
                   title=spec.name)


class Launcher(Supervisor):
    """`localq worker`: the workers of `specs` under the supervisor (ops/supervisor.py)."""

    def __init__(
        self,
        specs: Sequence[WorkerSpec],
        *,
        loglevel: str = "warning",
        stop_timeout: float = DRAIN_TIMEOUT,
        base_env: Mapping[str, str] | None = None,
        command: Callable[[WorkerSpec], list[str]] | None = None,
        **options,
    ):
        """`command(spec)` is a worker's command line (default: `child_argv` at `loglevel`);
        `options` go to `Supervisor` (output, poll_interval, force_timeout, backoff, clock, cwd)."""
        if not specs:
            raise ValueError("no workers to run")
        command = command or (lambda spec: child_argv(spec, loglevel))
        self.specs = list(specs)
        programs = [worker_program(spec, command(spec), child_environment(spec, base_env)) for spec in specs]
        super().__init__(programs, stop_timeout=stop_timeout, **options)

    def start(self) -> None:
        for spec in self.specs:
            log.info("starting %s", spec.describe())
        super().start()


def configure_logging() -> None:
    """The launcher's own messages on stderr: through rich on a terminal, one plain line each
    otherwise (a log file or `docker logs` should not get lines wrapped at 80 columns)."""
    logger = logging.getLogger("ops")  # the launcher's and the supervisor's messages
    for old in list(logger.handlers):
        logger.removeHandler(old)
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=Console(stderr=True), show_path=False, markup=False)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(asctime)s: %(levelname)s/launcher] %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
