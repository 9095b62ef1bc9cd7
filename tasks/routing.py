"""The queue layout: task names, priorities, kombu's key names, and placement (which queue a
model's jobs go to, and which queues a worker consumes). No project imports: the Celery app, the
tasks, the sweeper and the API all read it.

The rule, in one place (the README draws it):

    cpu, gpu                every worker of that device consumes its device's queue
    gpu.<i>                 GPU index i, on every machine: a model pinned with `gpus: [i]`
    gpu.<i>-<j>             a set of GPU indexes: a model pinned with `gpus: [i, j]`
    <device>.pool.<name>    workers started with `--pool NAME`: a model with `pool: NAME`
    worker.<node name>      one worker alone (its own queue)

A job goes to its model's queue, except that when several live workers consume that queue and
one of them already holds the model and has a free job slot, the job goes to that worker's own
queue (the one with the most free slots): GPUs do not all load every model, and a model is
loaded a second time only when its holders are busy and another worker is free.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from kombu.transport.redis import Channel

DEVICES = ("cpu", "gpu")
DEVICE_QUEUES = DEVICES  # the queues the Celery app declares
PRIORITIES = {"interactive": 0, "batch": 9}
# kombu's Redis transport keeps one list per step and pops the lowest step first
PRIORITY_STEPS = [0, 3, 6, 9]

# Celery task names: they travel in queued messages, so they never change.
RUN_TASK = "localq.run_job"
START_TASK = "localq.batch.start"
LINES_TASK = "localq.batch.lines"
FINALIZE_TASK = "localq.batch.finalize"


def step_key(queue: str, step: int) -> str:
    """kombu's Redis list for one priority step of a queue."""
    return queue if step == 0 else f"{queue}{Channel.sep}{step}"


def queue_keys(queue: str, up_to: int | None = None) -> list[str]:
    """The Redis lists kombu keeps for one queue, one per priority step (those served no later
    than priority `up_to`, if given)."""
    return [step_key(queue, step) for step in PRIORITY_STEPS if up_to is None or step <= up_to]


def model_queue(device: str, gpus: Sequence[int] = (), pool: str | None = None) -> str:
    """The queue every job for a model with this placement goes to (unless a holder is idle)."""
    if pool:
        return f"{device}.pool.{pool}"
    if gpus:
        return "gpu." + "-".join(str(index) for index in sorted(set(gpus)))
    return device


def queue_for(config) -> str:
    """`model_queue` of a `workers.config.ModelConfig`."""
    return model_queue(config.device, config.gpus, config.pool)


def own_queue(node_name: str) -> str:
    return f"worker.{node_name}"


def worker_queues(device: str, *, gpu_index: int | None = None, pools: Iterable[str] = (),
                  node_name: str | None = None, configs: Iterable = ()) -> list[str]:
    """Every queue one worker consumes: its device's, its GPU's, the GPU sets of the model
    configs that include its GPU, its pools', and its own."""
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}")
    queues = [device]
    if device == "gpu" and gpu_index is not None:
        queues.append(model_queue("gpu", (gpu_index,)))
        for config in configs:
            if config.device == "gpu" and len(config.gpus) > 1 and gpu_index in config.gpus:
                queues.append(queue_for(config))
    queues += [model_queue(device, pool=pool) for pool in pools]
    if node_name:
        queues.append(own_queue(node_name))
    return list(dict.fromkeys(queues))


def choose_queue(config, workers: Iterable[dict]) -> str:
    """The queue for a job on `config`'s model, given the live workers' heartbeats
    (`store.heartbeats`: each with `id`, `queues`, `loaded_models` and `current_job`)."""
    shared = queue_for(config)
    serving = [w for w in workers if shared in w.get("queues", ())]
    if len(serving) < 2:
        return shared
    holders = [w for w in serving if config.name in w.get("loaded_models", ()) and free_slots(w) > 0
               and own_queue(w["id"]) in w["queues"]]  # a plain `-Q` worker has no own queue
    if not holders:
        return shared
    return own_queue(min(holders, key=lambda w: (-free_slots(w), w["id"]))["id"])


def free_slots(worker: dict) -> int:
    """Job slots a worker's heartbeat says are free (a heartbeat without `slots`: one slot,
    busy while it has a `current_job`)."""
    slots = worker.get("slots") or 1
    busy = worker.get("slots_busy", 1 if worker.get("current_job") else 0)
    return max(0, int(slots) - int(busy or 0))
