"""What each localq worker does around Celery's own work, wired through Celery's signals.

* Identity: after setup, the worker's node name and queues go into the environment, so the pool
  processes it forks know them. The launcher (`localq worker --gpus ...`) sets the rest:
  `LOCALQ_WORKER_DEVICE`, `LOCALQ_GPU_INDEX`, `LOCALQ_WORKER_POOLS`, `LOCALQ_SIMULATED_GPU`,
  `LOCALQ_MODEL_CACHE_BYTES` (the memory budget) and `CUDA_VISIBLE_DEVICES`. These are hand-offs
  from a parent to its own children, read here for the heartbeat; settings a person sets are read
  in `tasks.settings` and `tasks.worker_settings`.
* Heartbeats (`store.heartbeats`): the pool process, which holds the models, publishes what it
  holds and runs every `LOCALQ_HEARTBEAT_INTERVAL` seconds, and `HEARTBEAT_SETTLE` (50 ms) after
  a job starts or ends.
* Its own queue handed back when it stops (`tasks.orphans`): jobs dispatch sent to it while it
  was idle go to their models' queues instead of waiting for a worker of the same name.
* Preloading: the models whose configs say `preload: true` and whose queue this worker consumes
  are loaded when its pool process starts (in a thread: the worker answers pings and heartbeats
  meanwhile; a job for a model still loading waits for that load, as it would have loaded it
  anyway). The heartbeat's `preloaded` turns true when they are all in (`localq up` waits for it).
* Prompt redelivery after a crash: the main process remembers the delivery tags it received.
  When a worker's main process is killed, its messages stay in kombu's `unacked` hash until the
  visibility timeout (longer than the longest job). Its successor, started under the same node
  name (the launcher restarts it), puts those messages back on their queues at once with kombu's
  `restore_by_tag` (`tasks.delivery_log` writes the tags, off the event loop). A pool process
  dies with its main process (PR_SET_PDEATHSIG), so a job is never run by an orphan while it is
  redelivered.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import socket
import threading
import time

from celery import signals

from store.heartbeats import Heartbeat
from tasks.delivery_log import DeliveryLog
from tasks.lost_acks import handed_messages, job_id_of
from tasks.orphans import registry_resolver, rescue
from tasks.routing import LINES_TASK, RUN_TASK, queue_for
from tasks.runtime import model_runtime, runtime, worker_settings
from tasks.watchdog import HardLimitWatchdog
from workers.backends import choose_openmp_spin
from workers.slots import sequences

log = logging.getLogger(__name__)

MIN_HEARTBEAT_INTERVAL = 0.1
HEARTBEAT_SETTLE = 0.05  # seconds from a job's start or end to the beat that shows it (`store.heartbeats`)
RECENT_TAGS = 32  # delivery tags remembered per job slot: prefetch 1 keeps about one in flight per slot
_state: dict = {"heartbeat": None, "jobs": {}, "hard_limits": {}, "slots": 1, "jobs_done": 0,
               "started_at": int(time.time()), "preloaded": False}


def inflight_key(node_name: str) -> str:
    return f"localq:worker:{node_name}:deliveries"


def worker_hard_limit() -> float:
    """The hard time limit of a job sent without one of its own."""
    return runtime().settings.hard_limit


def heartbeat_interval() -> float:
    """`LOCALQ_HEARTBEAT_INTERVAL`, but at least MIN_HEARTBEAT_INTERVAL: a heartbeat is a Redis write."""
    return max(worker_settings().heartbeat_interval, MIN_HEARTBEAT_INTERVAL)


def describe() -> dict:
    """This pool process's heartbeat document (see `store.heartbeats`)."""
    cache = model_runtime()[1]
    environ = os.environ
    queues = _own_queues()
    device = environ.get("LOCALQ_WORKER_DEVICE") or ("gpu" if "gpu" in queues else "cpu")
    gpu_index = environ.get("LOCALQ_GPU_INDEX")
    running = list(_state["jobs"].values())
    job = running[0] if running else None
    engines = {name: backend.engine.stats() for name, backend in cache.backends().items()
               if getattr(backend, "engine", None) is not None}
    return {
        "id": environ.get("LOCALQ_WORKER_NAME") or f"worker@{socket.gethostname()}",
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "device": device,
        "gpu_index": int(gpu_index) if gpu_index and gpu_index.isdigit() else None,
        "cuda_visible_devices": environ.get("CUDA_VISIBLE_DEVICES"),
        "simulated": environ.get("LOCALQ_SIMULATED_GPU") == "1",
        "pools": [p for p in environ.get("LOCALQ_WORKER_POOLS", "").split(",") if p],
        "queues": queues,
        "memory_budget_bytes": cache.max_bytes or 0,
        "memory_used_bytes": cache.used_bytes,
        "loaded_models": cache.loaded(),
        "evictions": cache.evictions,
        "current_job": job["id"] if job else None,
        "current_job_model": job["model"] if job else None,
        "slots": _state["slots"],
        "slots_busy": len(running),
        "running_jobs": running,
        "engines": engines,
        "preloaded": _state["preloaded"],
        "jobs_done": _state["jobs_done"],
        "started_at": _state["started_at"],
    }


# -- main process ------------------------------------------------------------------------------


@signals.celeryd_after_setup.connect
def _remember_identity(sender, instance, **_) -> None:
    os.environ["LOCALQ_WORKER_NAME"] = str(sender)
    os.environ["LOCALQ_WORKER_QUEUES"] = ",".join(instance.app.amqp.queues.consume_from)


_deliveries = DeliveryLog(lambda: runtime().redis, lambda: inflight_key(os.environ.get("LOCALQ_WORKER_NAME", "")),
                          lambda: RECENT_TAGS * _state["slots"])


@signals.task_received.connect
def _remember_delivery(sender=None, request=None, **_) -> None:
    message = getattr(request, "_message", None)
    tag = getattr(message, "delivery_tag", None)
    if tag is not None:
        _deliveries.add(tag)
        name = getattr(request, "name", None)
        if name == LINES_TASK:
            handed_messages.received(tag)
        elif name == RUN_TASK:
            handed_messages.received(tag, job_id_of(request))


@signals.worker_ready.connect
def _heartbeat_without_pool_processes(sender=None, **_) -> None:
    """With the solo or threads pool, jobs run in this process: it publishes the heartbeat."""
    controller = getattr(sender, "controller", None)
    pool = str(getattr(controller, "pool_cls", "")).lower()
    if "solo" in pool or "thread" in pool:
        _state["slots"] = max(1, int(getattr(controller, "concurrency", 1) or 1))
        _start_pool_process()
        watchdog = HardLimitWatchdog(lambda: dict(_state["hard_limits"]))
        _state["watchdog"] = watchdog
        watchdog.start()


@signals.worker_ready.connect
def _restore_predecessor_messages(sender=None, **_) -> None:
    """Put back on their queues the messages a killed predecessor of this node left unacked."""
    node = os.environ.get("LOCALQ_WORKER_NAME", "")
    try:
        rt = runtime()
        tags = rt.redis.lrange(inflight_key(node), 0, -1)
        rt.redis.delete(inflight_key(node))
        if not tags:
            return
        with sender.app.connection_for_write() as connection:
            channel = connection.default_channel
            unacked = channel.unacked_key
            restored = 0
            for tag in tags:
                if rt.redis.hexists(unacked, tag):
                    channel.qos.restore_by_tag(tag, leftmost=True)
                    restored += 1
        if restored:
            log.warning("%s: put back %d message(s) a previous run of this worker left unacknowledged",
                        node, restored)
    except Exception:
        log.warning("could not restore the messages of a previous run of %s", node, exc_info=True)


@signals.worker_shutdown.connect
def _hand_back_own_queue(**_) -> None:
    """A stopping worker's own queue has no other consumer: move its jobs to their models' queues."""
    node = os.environ.get("LOCALQ_WORKER_NAME")
    if not node:
        return
    try:
        rescue(runtime().redis, node, registry_resolver())
    except Exception:
        log.warning("%s: jobs on its own queue not handed back; the sweep will", node, exc_info=True)


# -- pool process ------------------------------------------------------------------------------


@signals.worker_process_init.connect
def _start_pool_process(**_) -> None:
    if _state["heartbeat"] is not None:
        return
    _die_with_parent()

    try:
        choose_openmp_spin(served_configs(model_runtime()[0].list(), _own_queues()))
        log.info("OpenMP threads spin %s times at a barrier before they sleep (GOMP_SPINCOUNT)",
                 os.environ.get("GOMP_SPINCOUNT", "libgomp's default"))
    except Exception:  # noqa: BLE001 - a bad models folder fails its jobs, not the worker's start
        log.warning("could not read the served models to choose the OpenMP spin", exc_info=True)
    heartbeat = Heartbeat(runtime().redis, describe, heartbeat_interval(), settle=HEARTBEAT_SETTLE)
    _state["heartbeat"] = heartbeat
    heartbeat.start()
    threading.Thread(target=_preload, name="preload-models", daemon=True).start()


def served_configs(configs, queues) -> list:
    """The configs whose queue is among `queues`: the models this worker may be asked to run."""
    served = set(queues)
    return [config for config in configs if queue_for(config) in served]


def preload_configs(configs, queues) -> list:
    """The configs with `preload: true` whose queue is among `queues`: batching text models first
    (their first requests are the ones people wait on), then by name."""
    chosen = [config for config in served_configs(configs, queues) if config.preload]
    return sorted(chosen, key=lambda config: (sequences(config) == 1, config.name))


def _own_queues() -> list[str]:
    """The queues this worker consumes (set by `_remember_identity`, inherited by pool processes)."""
    return [q for q in os.environ.get("LOCALQ_WORKER_QUEUES", "").split(",") if q]


def _preload() -> None:
    """Load this worker's `preload` models; a model that fails to load is logged and left to load
    (and fail its job with the reason) on demand."""
    registry, cache = model_runtime()
    for config in preload_configs(registry.list(), _own_queues()):
        started = time.monotonic()
        try:
            if not cache.has_room(config):  # preloading never evicts another preloaded model
                log.warning("model %s not preloaded: the worker's model cache is full", config.name)
                continue
            cache.get(config)
            log.info("preloaded model %s in %.1f s", config.name, time.monotonic() - started)
        except Exception:
            log.warning("could not preload model %s; it loads on its first job instead", config.name, exc_info=True)
    _state["preloaded"] = True
    if _state["heartbeat"] is not None:
        _state["heartbeat"].poke()


@signals.worker_process_shutdown.connect
@signals.worker_shutdown.connect
def _stop_pool_process(**_) -> None:
    heartbeat = _state["heartbeat"]
    if heartbeat is not None:
        heartbeat.stop()


@signals.task_prerun.connect
def _job_started(task_id=None, task=None, args=None, **_) -> None:
    args = args or []
    if args and isinstance(args[0], dict):  # localq.run_job(job)
        current = {"id": args[0].get("id") or task_id, "model": args[0].get("model")}
    elif len(args) > 1 and isinstance(args[1], list) and args[1]:  # localq.batch.lines(batch_id, items)
        body = args[1][0][2] if len(args[1][0]) > 2 and isinstance(args[1][0][2], dict) else {}
        current = {"id": f"{args[0]}:{args[1][0][1]}", "model": body.get("model")}
    else:
        current = {"id": task_id, "model": None}
    _state["jobs"][task_id] = current
    limits = getattr(getattr(task, "request", None), "timelimit", None) or (None, None)
    _state["hard_limits"][task_id] = time.monotonic() + float(limits[0] or worker_hard_limit())
    if _state["heartbeat"] is not None:
        _state["heartbeat"].poke()


@signals.task_postrun.connect
def _job_ended(task_id=None, **_) -> None:
    _state["jobs"].pop(task_id, None)
    _state["hard_limits"].pop(task_id, None)
    _state["jobs_done"] += 1
    if _state["heartbeat"] is not None:
        _state["heartbeat"].poke()


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent (the worker's main process) dies."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
