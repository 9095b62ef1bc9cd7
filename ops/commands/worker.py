"""`localq worker`: with -Q/--queues this process becomes one Celery worker (exec); otherwise the
launcher (ops/launcher.py) runs one supervised worker process per selected GPU and --cpu N on the CPU."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

from rich.console import Console

from api.settings import Settings
from ops import gpus as gpu_discovery
from ops import launcher
from ops.common import CELERY_APP, CELERY_POOLS, _child_env, served_slots, worker_argv
from ops.common import celery_pool as pool_for_slots
from tasks.worker_settings import WorkerSettings
from workers.registry import ModelRegistry


def run(args: argparse.Namespace, settings: Settings) -> int:
    """`localq worker`: with -Q/--queues one Celery worker (exec), otherwise the launcher."""
    worker = WorkerSettings.from_env()  # a worker's own settings: a typo stops it here, before it starts
    if args.queues is not None:
        return exec_worker(args, settings)
    return run_launcher(args, settings, worker)


def exec_worker(args: argparse.Namespace, settings: Settings | None = None) -> int:
    """Become the Celery worker (exec), so its signal handling applies unchanged.

    Celery's own command line runs in this very process (same pid): SIGTERM is a warm shutdown
    (the running job finishes), SIGQUIT a cold one, Ctrl-C warm then cold on a second press.
    Settings travel through the environment, which exec keeps.
    """
    launcher_only = [flag for flag, value in (
        ("--gpus", args.gpus), ("--cpu", args.cpu), ("--gpu-memory-budget", args.gpu_memory_budget),
        ("--cpu-memory-budget", args.cpu_memory_budget)) if value is not None]
    celery_pool = args.celery_pool
    if args.pools:
        if len(args.pools) == 1 and args.pools[0] in CELERY_POOLS and celery_pool is None:
            # `--pool prefork|solo|threads` named Celery's pool before --pool named worker pools
            celery_pool = args.pools[0]
            Console(stderr=True).print(
                f"note: --pool {args.pools[0]} taken as Celery's pool; it is spelt -P/--celery-pool now",
                highlight=False)
        else:
            launcher_only.append("--pool")
    if launcher_only:
        raise ValueError(
            f"{', '.join(launcher_only)} start the launcher, and -Q/--queues runs one worker without it: "
            "leave out -Q (or, for one worker, name its queues with -Q, e.g. cpu.pool.NAME)"
        )
    if args.models_dir:
        os.environ["LOCALQ_MODELS_DIR"] = str(Path(args.models_dir).resolve())
    concurrency = args.concurrency
    if concurrency is None and celery_pool is None:  # as many jobs at once as the models served allow
        models_dir = Path(args.models_dir) if args.models_dir else (settings.models_dir if settings else None)
        configs = ModelRegistry.load(models_dir).list() if models_dir else ()
        celery_pool, concurrency = pool_for_slots(served_slots(args.queues.split(","), configs))
    argv = worker_argv(args.queues, concurrency or 1, args.name, celery_pool or "prefork", args.loglevel)
    if importlib.util.find_spec(CELERY_APP.partition(":")[0]) is None:
        raise ValueError(f"the Celery app module {CELERY_APP.partition(':')[0]} is not installed")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)
    return 0  # not reached; kept for tests that replace os.execv


def run_launcher(args: argparse.Namespace, settings: Settings, worker: WorkerSettings) -> int:
    """One Celery worker process per selected GPU and --cpu N on the CPU, supervised (ops/launcher.py)."""
    single_only = [flag for flag, given in (
        ("-c/--concurrency", args.concurrency not in (None, 1)), ("-n/--name", args.name is not None),
        ("-P/--celery-pool", args.celery_pool not in (None, "prefork"))) if given]
    if single_only:
        raise ValueError(
            f"{', '.join(single_only)} apply to a single worker (with -Q/--queues); the launcher runs "
            "prefork workers, one job at a time each, named gpu<i>@host and cpu<k>@host"
        )
    launcher.configure_logging()
    registry = ModelRegistry.load(settings.models_dir)  # bad configs stop us before anything runs
    spec = args.gpus if args.gpus is not None else "all"
    found, source = ([], "none") if spec == "none" else gpu_discovery.find_gpus()
    visible = gpu_discovery.visible_indexes() if found and source != "simulated" else None
    selected = gpu_discovery.select_gpus(spec, found, visible)
    if spec != "none":
        launcher.log.info("GPUs found (%s): %s", source, ", ".join(
            f"{gpu.index} {gpu.name} {gpu_discovery.format_size(gpu.memory_bytes)}" for gpu in found) or "none")
    cpu_workers = 1 if args.cpu is None else args.cpu
    specs = launcher.plan_workers(
        selected, cpu_workers, pools=args.pools or (), configs=registry.list(),
        gpu_memory_budget=args.gpu_memory_budget, cpu_memory_budget=args.cpu_memory_budget,
        inherited_budget=worker.model_cache_bytes,
    )
    if not specs:
        raise ValueError(f"no workers to run: --gpus {spec} selects no GPU and --cpu is 0")
    for queue, names in launcher.unserved_queues(specs, registry.list()).items():
        launcher.log.info("no worker started here consumes queue %s (model %s)", queue, ", ".join(names))
    env = _child_env(args)
    env["LOCALQ_MODELS_DIR"] = str(Path(settings.models_dir).resolve())  # the workers run from the repo root
    return launcher.Launcher(specs, loglevel=args.loglevel, stop_timeout=settings.queue.drain_timeout,
                             base_env=env).run()
