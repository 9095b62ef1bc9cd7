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

Every worker is `python -m celery -A tasks.celery_app:app worker --pool prefork --concurrency 1
--prefetch-multiplier 1 --without-gossip --without-mingle --queues Q --hostname NAME --loglevel L`
(`ops.common.worker_argv`), named `gpu<i>@<host>` (i: the GPU's index) or `cpu<k>@<host>` (k from 0),
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

Supervision: a worker that exits while the launcher is not stopping is started again, with the
same name and environment, after 1 s, then 2, 4, ... up to 30 s for one that keeps failing; the
delay starts again from 1 s once a worker has run for 60 s. Its leftover pool processes are
killed first, so an orphan never runs a job that is being redelivered. Each worker's output is
relayed to the launcher's stderr, every line prefixed with the worker's short name (`gpu0 | ...`).

Stopping: SIGTERM, SIGINT (Ctrl-C) or SIGHUP send SIGTERM to every worker: Celery's warm
shutdown, where running jobs finish, and with late acks and prefetch 1 nothing still queued is
taken, so nothing is lost. After `QueueSettings.drain_timeout` (LOCALQ_JOB_TIMEOUT + 30 s, when
every job has hit its hard time limit) stragglers get SIGKILL. A second signal hurries the stop:
SIGQUIT (Celery's cold shutdown: running jobs are put back on their queues by late acks), then
SIGKILL 10 s later. The launcher then exits 0. Workers are started with PR_SET_PDEATHSIG, so a
launcher killed with SIGKILL takes its workers with it (each gets SIGTERM, a warm shutdown).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ops.gpus import Gpu, format_size
from ops.redis_server import child_preexec
from ops.common import worker_argv
from tasks.routing import queue_for, worker_queues
from tasks.settings import QueueSettings

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
GPU_MEMORY_SHARE = 0.9  # of each GPU's memory, its worker's default budget
CPU_MEMORY_SHARE = 0.7  # of the machine's RAM, shared out among the CPU workers
RESTART_INITIAL = 1.0
RESTART_CAP = 30.0
RESTART_RESET_AFTER = 60.0
POLL_INTERVAL = 0.2
FORCE_STOP_TIMEOUT = 10.0
DRAIN_TIMEOUT = QueueSettings().drain_timeout  # with the default job timeout; `localq worker` passes its own
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

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
        return f"{self.name}: {where}; model budget {budget}; queues {', '.join(self.queues)}"


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
        specs.append(WorkerSpec(name, "gpu", tuple(queues), env, gpu, budget, source))
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
        specs.append(WorkerSpec(name, "cpu", tuple(queues), env, None, budget, source))
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
    """The Celery command line of one worker: prefork, one job at a time, prefetch 1."""
    return worker_argv(",".join(spec.queues), concurrency=1, name=spec.name, pool="prefork", loglevel=loglevel)


def child_environment(spec: WorkerSpec, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this process's environment) without the names the launcher decides,
    plus the worker's own values."""
    env = {key: value for key, value in (os.environ if base is None else base).items() if key not in OWNED_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(spec.env)
    return env


# --- restarts --------------------------------------------------------------------------------


class Backoff:
    """Restart delays: `initial`, doubling up to `cap`; back to `initial` after `reset_after` s up."""

    def __init__(self, initial: float = RESTART_INITIAL, cap: float = RESTART_CAP,
                 reset_after: float = RESTART_RESET_AFTER):
        self.initial, self.cap, self.reset_after = initial, cap, reset_after
        self.delay = 0.0  # the last delay given; 0 before the first

    def next_delay(self, uptime: float) -> float:
        """The delay before restarting a worker that ran for `uptime` seconds."""
        if not self.delay or uptime >= self.reset_after:
            self.delay = self.initial
        else:
            self.delay = min(self.delay * 2, self.cap)
        return self.delay


# --- supervision -----------------------------------------------------------------------------


@dataclass
class Child:
    """One supervised worker: its spec and its current process (None while it waits to restart)."""

    spec: WorkerSpec
    argv: list[str]
    env: dict[str, str]
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    restart_at: float | None = None
    starts: int = 0
    backoff: Backoff = field(default_factory=Backoff)
    relay: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class Launcher:
    """Start the workers of `specs`, keep them running, stop them on SIGTERM/SIGINT/SIGHUP."""

    def __init__(
        self,
        specs: Sequence[WorkerSpec],
        *,
        loglevel: str = "warning",
        stop_timeout: float = DRAIN_TIMEOUT,
        base_env: Mapping[str, str] | None = None,
        cwd: Path = REPO_ROOT,
        output: Callable[[bytes], None] | None = None,
        poll_interval: float = POLL_INTERVAL,
        force_timeout: float = FORCE_STOP_TIMEOUT,
        backoff: Callable[[], Backoff] = Backoff,
        clock: Callable[[], float] = time.monotonic,
        command: Callable[[WorkerSpec], list[str]] | None = None,
    ):
        """`command(spec)` is a worker's command line (default: `child_argv` at `loglevel`)."""
        if not specs:
            raise ValueError("no workers to run")
        command = command or (lambda spec: child_argv(spec, loglevel))
        self.children = [Child(spec, command(spec), child_environment(spec, base_env), backoff=backoff())
                         for spec in specs]
        self.stop_timeout = stop_timeout
        self.cwd = cwd
        self.output = output or _write_stderr
        self.poll_interval = poll_interval
        self.force_timeout = force_timeout
        self.clock = clock
        self.signals = 0  # stop requests seen
        self.stopping = False
        self._output_lock = threading.Lock()

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> int:
        """Run until a stop signal, then stop every worker; the exit status (0)."""
        previous = {signum: signal.signal(signum, self.request_stop) for signum in STOP_SIGNALS}
        try:
            self.start()
            while not self.signals:
                self.supervise()
                time.sleep(self.poll_interval)
            log.info("stopping %d worker(s)", sum(child.running for child in self.children))
        finally:
            self.stop()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return 0

    def request_stop(self, signum=None, frame=None) -> None:
        """Signal handler: the first call stops the loop, a second one hurries the stop along."""
        self.signals += 1

    def start(self) -> None:
        for child in self.children:
            log.info("starting %s", child.spec.describe())
            self._spawn(child)

    def supervise(self) -> None:
        """Notice workers that exited and schedule their restart; start those that are due."""
        if self.stopping:
            return
        now = self.clock()
        for child in self.children:
            process = child.process
            if process is not None and process.poll() is not None:
                self._reap(child)
                uptime = now - child.started_at
                delay = child.backoff.next_delay(uptime)
                child.restart_at = now + delay
                log.warning("%s (pid %d) %s after %.0f s; restarting it in %.0f s", child.spec.name, process.pid,
                            _exit_text(process.returncode), uptime, delay)
            if child.process is None and child.restart_at is not None and now >= child.restart_at:
                self._spawn(child)

    def stop(self) -> None:
        """Warm-stop every worker (SIGTERM), waiting up to `stop_timeout`, then SIGKILL."""
        if self.stopping:
            return
        self.stopping = True
        signals_at_stop = self.signals
        for child in self.children:
            child.restart_at = None
            if child.running:
                _signal(child.process, signal.SIGTERM)
        started = self.clock()
        forced_at = None
        while True:
            running = [child for child in self.children if child.running]
            for child in self.children:
                if child.process is not None and not child.running:
                    self._reap(child)
            if not running:
                break
            now = self.clock()
            if forced_at is None and self.signals > signals_at_stop:
                log.warning("stopping now: cold shutdown of %d worker(s) (their running jobs go back on the queue)",
                            len(running))
                for child in running:
                    _signal(child.process, signal.SIGQUIT)
                forced_at = now
            if now - started > self.stop_timeout or (forced_at is not None and now - forced_at > self.force_timeout):
                for child in running:
                    log.warning("%s (pid %d) did not stop in time; killing it", child.spec.name, child.process.pid)
                    _kill_group(child.process.pid)
                    child.process.wait()
                continue
            time.sleep(self.poll_interval)
        log.info("every worker stopped")

    # -- one child -----------------------------------------------------------------------------

    def _spawn(self, child: Child) -> None:
        child.restart_at = None
        child.started_at = self.clock()
        try:
            process = subprocess.Popen(
                child.argv,
                env=child.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                # Its own process group: a terminal's Ctrl-C reaches the launcher alone, which then
                # stops every worker the same way; the group also holds the worker's pool processes.
                process_group=0,
                preexec_fn=child_preexec(),  # SIGTERM when the launcher dies
            )
        except OSError as exc:
            delay = child.backoff.next_delay(0.0)
            child.restart_at = self.clock() + delay
            log.error("cannot start %s: %s; trying again in %.0f s", child.spec.name, exc, delay)
            return
        child.process = process
        child.starts += 1
        if child.starts > 1:
            log.warning("restarted %s (pid %d)", child.spec.name, process.pid)
        else:
            log.info("started %s (pid %d)", child.spec.name, process.pid)
        child.relay = threading.Thread(target=self._relay, args=(process.stdout, child.spec.label),
                                       name=f"relay-{child.spec.label}", daemon=True)
        child.relay.start()

    def _reap(self, child: Child) -> None:
        """After a worker's main process ended: kill what is left of its group, finish its output."""
        process, child.process = child.process, None
        process.wait()
        _kill_group(process.pid)  # leftover pool processes; nothing reuses the id while they live
        if child.relay is not None:
            child.relay.join(timeout=2.0)
            child.relay = None

    def _relay(self, stream, label: str) -> None:
        prefix = f"{label} | ".encode()
        with stream:
            for line in iter(stream.readline, b""):
                if not line.endswith(b"\n"):
                    line += b"\n"
                with self._output_lock:
                    self.output(prefix + line)


def _write_stderr(data: bytes) -> None:
    try:
        while data:
            written = os.write(2, data)
            data = data[written:]
    except OSError:
        pass


def _signal(process: subprocess.Popen, signum: int) -> None:
    try:
        process.send_signal(signum)
    except ProcessLookupError:
        pass


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _exit_text(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


def configure_logging() -> None:
    """The launcher's own messages on stderr: through rich on a terminal, one plain line each
    otherwise (a log file or `docker logs` should not get lines wrapped at 80 columns)."""
    logger = logging.getLogger(__name__)
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
