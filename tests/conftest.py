"""Shared fixtures (an app over the default model configs, a scratch models folder, a real Redis,
one running localq shared by the session) and the test tiers: every test is marked `unit` or
`integration`, the heaviest also `slow`.

`make test-fast` runs `-m unit`: tests that start no Redis, service, worker or model process.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import pytest
import redis
import yaml

from api.settings import Settings
from ops.redis_server import RedisServer
from workers.backends import BRIEF_OPENMP_SPIN

# The suite runs two test processes, each with localq stacks of its own, on two cores: more
# llama.cpp threads than cores. A worker serving llama.cpp alone would spin long at OpenMP
# barriers (`workers.backends`) and burn the cores the other half of the suite needs; like an
# operator running several workers on shared cores, the suite asks for the brief spin.
os.environ.setdefault("GOMP_SPINCOUNT", BRIEF_OPENMP_SPIN)


@pytest.fixture
def settings() -> Settings:
    """Defaults only, whatever LOCALQ_* variables the shell running pytest has."""
    return Settings.from_env({})


@pytest.fixture
def app(settings):
    from api.app import create_app  # here, so registry and CLI tests do not need the whole app

    return create_app(settings)


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def models_dir(tmp_path) -> Path:
    """An empty models folder to write configs into."""
    path = tmp_path / "models"
    path.mkdir()
    return path


@pytest.fixture
def write_model(models_dir):
    """Write one config file; a dict is dumped as YAML, a str is written verbatim."""

    def write(filename: str, content: dict | str) -> Path:
        path = models_dir / filename
        text = content if isinstance(content, str) else yaml.safe_dump(content)
        path.write_text(text, encoding="utf-8")
        return path

    return write


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    """A real Redis for one test module (embedded, in its own data folder)."""
    with RedisServer(tmp_path_factory.mktemp("redis")) as running:
        yield running


@pytest.fixture
def redis_db(redis_server):
    """A text client of `redis_server`, emptied for each test."""
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    client.flushall()
    yield client
    client.close()


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """One running localq (embedded Redis, one CPU worker, the API, the default models) for every
    integration test that needs no special settings: starting one per module cost most of the suite's
    time. Started by the first test that asks for it, stopped at the end of the session. Tests that
    use it must not depend on what other modules did on it (compare deltas, filter by their own ids)
    and must leave it as they found it (no killed processes, no queued work left behind)."""
    import subprocess
    import sys

    from ops.stack import REPO
    from tests.service import running_service

    subprocess.run([sys.executable, "-m", "ops.cli", "models", "prepare"], cwd=REPO, check=True)  # image models
    tmp = tmp_path_factory.mktemp("stack")
    with running_service(tmp, {"LOCALQ_FILES_DIR": str(tmp / "files")}) as service:
        yield service


# A test is `integration` when it, or any fixture it depends on, starts a real process: Redis, the
# service, a worker launcher. Read from the source, so a new service fixture is classified alone.
STARTS_A_PROCESS = ("running_service(", "RedisServer(", "ServiceProcesses(", "Popen(", "start_api(")
# Modules whose tests load real models (llama.cpp, sentence-transformers, diffusers, whisper,
# piper), run schemathesis against the app, or spawn Python interpreters: seconds a test.
INTEGRATION_MODULES = {
    "test_batching_engine", "test_fuzz", "test_layering", "test_prompt_bounds", "test_tiny_models",
    "test_workers_audio", "test_workers_embeddings", "test_workers_images", "test_workers_llama",
}
# The heaviest modules, measured with `pytest --durations=0` (see README, "Tests").
SLOW_MODULES = {
    "test_batch_redis_restart", "test_media_integration", "test_placement", "test_response_conformance",
    "test_sentinel_failover", "test_slot_redelivery", "test_worker_pool", "test_workers_audio", "test_workers_images", "test_workers_llama",
}


def _source(function) -> str:
    try:
        return inspect.getsource(function)
    except (OSError, TypeError):
        return ""


def _with_helpers(function) -> list:
    """The function and the module-level functions it calls by name (one level down)."""
    module = inspect.getmodule(function)
    names = getattr(getattr(function, "__code__", None), "co_names", ())
    helpers = [getattr(module, name, None) for name in names]
    return [function, *(helper for helper in helpers if inspect.isfunction(helper))]


def _starts_a_process(item) -> bool:
    functions = [item.function]
    # pytest keeps the resolved fixture closure here; its public `fixturenames` has names only
    for defs in item._fixtureinfo.name2fixturedefs.values():
        functions.extend(definition.func for definition in defs)
    sources = (_source(helper) for function in functions for helper in _with_helpers(function))
    return any(marker in source for source in sources for marker in STARTS_A_PROCESS)


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if getattr(item, "module", None) else ""
        if module in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
        if module in INTEGRATION_MODULES or module in SLOW_MODULES or _starts_a_process(item):
            item.add_marker(pytest.mark.integration)
        else:
            item.add_marker(pytest.mark.unit)
