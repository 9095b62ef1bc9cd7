"""Shared fixtures: an app over the default model configs, and a scratch models folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from api.settings import Settings


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
