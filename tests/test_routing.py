"""The placement rule (`tasks.routing`): model queues, worker queues, and affinity to loaded models."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tasks.routing import choose_queue, model_queue, own_queue, queue_for, worker_queues


def config(name="m", device="cpu", gpus=(), pool=None):
    return SimpleNamespace(name=name, device=device, gpus=tuple(gpus), pool=pool)


def test_model_queues():
    assert queue_for(config()) == "cpu"
    assert queue_for(config(device="gpu")) == "gpu"
    assert queue_for(config(device="gpu", gpus=[1])) == "gpu.1"
    assert queue_for(config(device="gpu", gpus=[2, 0])) == "gpu.0-2"
    assert queue_for(config(device="gpu", pool="big")) == "gpu.pool.big"
    assert queue_for(config(pool="slow")) == "cpu.pool.slow"
    assert model_queue("gpu", (1, 1)) == "gpu.1"


def test_worker_queues_cover_every_model_they_may_run():
    configs = [config("a", "gpu", [0, 1]), config("b", "gpu", [1, 2]), config("c", "gpu", [3]), config("d")]
    gpu1 = worker_queues("gpu", gpu_index=1, pools=["big"], node_name="gpu1@h", configs=configs)
    assert gpu1 == ["gpu", "gpu.1", "gpu.0-1", "gpu.1-2", "gpu.pool.big", "worker.gpu1@h"]
    gpu0 = worker_queues("gpu", gpu_index=0, node_name="gpu0@h", configs=configs)
    assert gpu0 == ["gpu", "gpu.0", "gpu.0-1", "worker.gpu0@h"]
    cpu = worker_queues("cpu", pools=["slow"], node_name="cpu0@h", configs=configs)
    assert cpu == ["cpu", "cpu.pool.slow", "worker.cpu0@h"]
    # every model's queue is consumed by exactly the workers its placement allows
    workers = {"gpu0": gpu0, "gpu1": gpu1, "cpu0": cpu}
    assert [w for w, qs in workers.items() if queue_for(configs[0]) in qs] == ["gpu0", "gpu1"]
    assert [w for w, qs in workers.items() if queue_for(configs[2]) in qs] == []  # GPU 3 is not on this machine
    assert [w for w, qs in workers.items() if queue_for(configs[3]) in qs] == ["cpu0"]
    with pytest.raises(ValueError):
        worker_queues("tpu")


def beat(worker_id, queues, loaded=(), job=None):
    return {"id": worker_id, "queues": [*queues, own_queue(worker_id)], "loaded_models": list(loaded),
            "current_job": job}


def test_an_idle_worker_holding_the_model_gets_the_job():
    model = config("chat", "gpu")
    workers = [beat("gpu0@h", ["gpu"]), beat("gpu1@h", ["gpu"], loaded=["chat"])]
    assert choose_queue(model, workers) == "worker.gpu1@h"


def test_busy_holders_leave_the_job_on_the_shared_queue():
    model = config("chat", "gpu")
    workers = [beat("gpu0@h", ["gpu"]), beat("gpu1@h", ["gpu"], loaded=["chat"], job="j1")]
    assert choose_queue(model, workers) == "gpu"


def test_no_affinity_with_a_single_worker_or_none_serving_the_queue():
    model = config("chat", "gpu", gpus=[0])
    assert choose_queue(model, [beat("gpu0@h", ["gpu", "gpu.0"], loaded=["chat"])]) == "gpu.0"
    assert choose_queue(model, []) == "gpu.0"
    # holders outside the model's placement never get it
    workers = [beat("gpu0@h", ["gpu", "gpu.0"]), beat("gpu1@h", ["gpu", "gpu.1"], loaded=["chat"]),
               beat("gpu2@h", ["gpu", "gpu.0"])]
    assert choose_queue(model, workers) == "gpu.0"


def test_a_worker_without_its_own_queue_is_never_sent_a_job_directly():
    """`localq worker -Q cpu` (what `localq up` runs) consumes no `worker.<id>` queue."""
    model = config("embed")
    plain = {"id": "up@h", "queues": ["cpu"], "loaded_models": ["embed"], "current_job": None}
    launched = beat("cpu0@h", ["cpu"])
    assert choose_queue(model, [plain, launched]) == "cpu"


def test_a_holder_with_free_slots_gets_the_job_the_freest_first():
    """A batching worker is not idle while it runs a job, yet it takes more while it has free slots."""
    model = config("chat", "gpu")
    busy = {**beat("gpu0@h", ["gpu"], loaded=["chat"], job="j1"), "slots": 4, "slots_busy": 4}
    some = {**beat("gpu1@h", ["gpu"], loaded=["chat"], job="j2"), "slots": 4, "slots_busy": 3}
    fewer = {**beat("gpu2@h", ["gpu"], loaded=["chat"], job="j3"), "slots": 4, "slots_busy": 1}
    assert choose_queue(model, [busy, some]) == "worker.gpu1@h"
    assert choose_queue(model, [busy, some, fewer]) == "worker.gpu2@h"
    full = {**some, "slots_busy": 4}
    assert choose_queue(model, [busy, full]) == "gpu"
