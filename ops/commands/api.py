"""`localq api`: the HTTP API under gunicorn (ops/api_server.py)."""

from __future__ import annotations

import argparse
from functools import partial

from api.app import create_app
from api.metrics import prepare_multiprocess_dir
from api.settings import Settings
from ops.api_server import GunicornServer, gunicorn_options, raise_open_files_limit
from workers.registry import ModelRegistry


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Check the model configs first (bad configs fail here, clearly), then hand over to gunicorn,
    whose workers build the app once gevent has patched them (ops/api_server.py)."""
    ModelRegistry.load(settings.models_dir)  # what create_app would refuse, refused before any worker starts
    prepare_multiprocess_dir()  # before the app exists: prometheus_client picks its storage on first use
    raise_open_files_limit(args.connections)
    options = gunicorn_options(settings.host, settings.port, args.workers, args.connections)
    GunicornServer(partial(_create_app, settings), options).run()  # returns via SystemExit
    return 0


def _create_app(settings: Settings):
    return create_app(settings)
