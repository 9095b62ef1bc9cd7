"""A real localq for integration tests: embedded Redis, Celery worker processes, the API under gunicorn.

Everything runs as separate processes on loopback, exactly as `localq up` runs them; tests talk
to the API over HTTP with the official `openai` SDK or httpx.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

from ops.redis_server import RedisServer
from ops.stack import REPO, ServiceProcesses, wait_until

__all__ = ["Service", "only_models", "project_keys", "running_service", "wait_until"]

CHAT, EMBEDDINGS = "smollm2-135m-instruct", "all-minilm-l6-v2"


def only_models(folder: Path, *names: str, **changes) -> dict[str, str]:
    """A models folder holding only the default configs `names` (each updated with `changes`),
    as settings for `running_service`. For modules whose workers die and start again: each
    start preloads what its configs name, and the image and audio models cost seconds."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        config = yaml.safe_load((REPO / "models" / f"{name}.yaml").read_text())
        (folder / f"{name}.yaml").write_text(yaml.safe_dump({**config, **changes}))
    return {"LOCALQ_MODELS_DIR": str(folder)}


@dataclass
class Service(ServiceProcesses):
    redis: RedisServer | None = None


@contextmanager
def running_service(tmp: Path, extra_env: dict | None = None, workers: tuple[str, ...] = ("cpu",),
                    slots: int | None = None):
    """Redis, the API and `workers` (each consuming the queue of its name), with `slots` job
    slots each (default: as `localq worker` decides from the model configs)."""
    with RedisServer(tmp / "redis") as redis_server:
        env = {**os.environ, "LOCALQ_REDIS_URL": redis_server.url, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
        service = Service(env=env, log_dir=tmp / "logs", redis=redis_server)
        try:
            for name in workers:
                service.start_worker(name, name, slots)
            service.start_api()
            yield service
        finally:
            service.stop()


@contextmanager
def project_keys(base_url: str, client, wanted: dict[str, tuple[str, str]]):
    """Keys made in the service's Redis (`client`): {name: (project, role)} -> {name: secret}, each
    labelled with its name. The service asks for keys from the first request after they exist;
    at the end every key, project and model permission is removed and the service is open again."""
    from store.api_keys import KEY_IDS, KEYS, PROJECT_NAMES, PROJECTS, KeyStore
    from store.model_permissions import KEY as MODEL_PERMISSIONS

    keystore = KeyStore(client)
    made = {name: keystore.create(project, role=role, name=name)[0] for name, (project, role) in wanted.items()}
    wait_until(lambda: httpx.get(base_url + "/v1/models").status_code == 401, 10, "keys to be asked for")
    try:
        yield made
    finally:
        client.delete(KEYS, KEY_IDS, PROJECTS, PROJECT_NAMES, MODEL_PERMISSIONS)
        wait_until(lambda: httpx.get(base_url + "/v1/models").status_code == 200, 10, "the service to be open again")
