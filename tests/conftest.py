"""Shared fixtures: an app over the default model configs, and a scratch models folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
import yaml

from api.settings import Settings
from ops.redis_server import RedisServer


@pytest.fixture
def settings() -> Settings:
    """Defaults only, whatever LOCALQ_* variables the shell running pytest has."""
    return Settings.from_env({})


@pytest.fixture
def app(settings):
    from api import create_app  # here, so registry and CLI tests do not need the whole app

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
