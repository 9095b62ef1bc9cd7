"""`/healthz` (liveness) and `/readyz` (Redis, and a live worker for every device a model needs).

The app-level tests talk to a real Redis and publish worker heartbeats the way workers do
(`store.heartbeats`); the last test runs the real service and stops and starts its worker.
"""

from __future__ import annotations

import httpx
import pytest

from api.settings import Settings
from ops.redis_server import free_port
from store import heartbeats
from tests.service import running_service, wait_until


@pytest.fixture
def store(redis_db):
    return redis_db


def make_client(env: dict):
    from api.app import create_app

    return create_app(Settings.from_env(env)).test_client()


def beat(store, worker_id: str, device: str, interval: float = 30) -> None:
    heartbeats.publish(store, {"id": worker_id, "device": device, "queues": [device]}, interval)


def test_healthz_answers_without_touching_redis():
    client = make_client({"LOCALQ_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})  # nothing listens there
    response = client.get("/healthz")
    assert response.status_code == 200 and response.get_json() == {"status": "ok"}


def test_probes_and_metrics_need_no_key_when_keys_are_configured(redis_server, store):
    client = make_client({"LOCALQ_REDIS_URL": redis_server.url, "LOCALQ_API_KEYS": "sk-secret"})
    assert client.get("/v1/models").status_code == 401  # the API is locked...
    assert client.get("/healthz").status_code == 200  # ...its probes are not
    assert client.get("/readyz").status_code == 503  # no worker, but not 401
    beat(store, "cpu@a", "cpu")
    assert client.get("/readyz").status_code == 200
    assert client.get("/metrics").status_code == 200


def test_readyz_is_503_at_once_when_redis_is_down():
    client = make_client({"LOCALQ_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    response = client.get("/readyz")  # at once: no retry loop
    assert response.status_code == 503
    assert response.get_json() == {"status": "unready", "redis": False, "missing_devices": ["cpu"], "workers": {}}


def test_readyz_needs_a_live_worker_for_the_models_device(redis_server, store):
    client = make_client({"LOCALQ_REDIS_URL": redis_server.url})  # the default models: all cpu
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.get_json() == {"status": "unready", "redis": True, "missing_devices": ["cpu"],
                                   "workers": {"cpu": 0}}
    beat(store, "gpu@a", "gpu")  # a worker, but not of a device any model needs
    assert client.get("/readyz").status_code == 503
    beat(store, "cpu@a", "cpu")
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ready", "redis": True, "missing_devices": [],
                                   "workers": {"cpu": 1, "gpu": 1}}
    heartbeats.remove(store, "cpu@a")  # a clean stop
    assert client.get("/readyz").status_code == 503


def test_readyz_checks_every_device_a_model_needs(redis_server, store, models_dir, write_model):
    write_model("small.yaml", {"name": "small", "backend": "llama-cpp", "parameters": {"model": "s.gguf"}})
    write_model("big.yaml", {"name": "big", "backend": "llama-cpp", "device": "gpu", "gpus": [1],
                             "parameters": {"model": "b.gguf"}})
    client = make_client({"LOCALQ_REDIS_URL": redis_server.url, "LOCALQ_MODELS_DIR": str(models_dir)})
    beat(store, "cpu@a", "cpu")
    response = client.get("/readyz")
    assert response.status_code == 503 and response.get_json()["missing_devices"] == ["gpu"]
    beat(store, "gpu@b", "gpu", interval=0.1)  # its heartbeat lives 3 s unless renewed
    assert client.get("/readyz").status_code == 200
    wait_until(lambda: client.get("/readyz").status_code == 503, 10, "the gpu heartbeat to expire")
    assert client.get("/readyz").get_json()["missing_devices"] == ["gpu"]


def test_readyz_follows_the_real_worker_stopping_and_starting(tmp_path):
    env = {"LOCALQ_HEARTBEAT_INTERVAL": "0.5"}
    with running_service(tmp_path, env) as service:
        url = service.base_url + "/readyz"
        wait_until(lambda: httpx.get(url, timeout=5).status_code == 200, 60, "/readyz with the worker up")
        assert httpx.get(url, timeout=5).json()["workers"]["cpu"] == 1

        def unready():
            response = httpx.get(url, timeout=5)
            return response.json() if response.status_code == 503 else None

        service.stop_worker("cpu")  # warm shutdown: its heartbeat goes (removed, or expired after 3 s)
        assert wait_until(unready, 15, "/readyz to turn unready") == {
            "status": "unready", "redis": True, "missing_devices": ["cpu"], "workers": {"cpu": 0}}

        service.start_worker("cpu", "cpu")
        wait_until(lambda: httpx.get(url, timeout=5).status_code == 200, 60, "/readyz with a worker again")
