"""`localq models`: the configured models; `localq models prepare` builds the tiny demo ones
(ops/tiny_models.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from api.settings import Settings
from ops import tiny_models
from ops.common import _models_table, _shown
from workers.config import ModelConfigError
from workers.registry import ModelRegistry


def run(args: argparse.Namespace, settings: Settings) -> int:
    """A table of the configured models, validating every file on the way."""
    registry = ModelRegistry.load(settings.models_dir)
    Console().print(_models_table(registry, settings.models_dir))
    return 0


def prepare(args: argparse.Namespace, settings: Settings) -> int:
    """Build the tiny diffusion pipeline (idempotent: an existing one is kept unless --force)."""
    target = tiny_models.tiny_diffusion_path(args.dir) if args.dir else _tiny_diffusion_target(settings.models_dir)
    if args.force or not tiny_models.is_prepared(target):
        Console(stderr=True).print(f"building {tiny_models.TINY_DIFFUSION} in {escape(_shown(target))}", highlight=False)
    if tiny_models.prepare_tiny_diffusion(target, force=args.force):
        Console().print(f"built {tiny_models.TINY_DIFFUSION} in {escape(_shown(target))}", highlight=False)
    else:
        Console().print(
            f"{tiny_models.TINY_DIFFUSION} is already in {escape(_shown(target))} (--force rebuilds it)",
            highlight=False,
        )
    return 0


def _tiny_diffusion_target(models_dir: Path) -> Path:
    """Where the models dir's tiny-diffusion config points, else var/models/tiny-diffusion."""
    try:
        config = ModelRegistry.load(models_dir).resolve(tiny_models.TINY_DIFFUSION)
    except ModelConfigError:
        config = None
    if config is not None and config.model_file is not None:
        return config.model_file.resolve()
    return tiny_models.tiny_diffusion_path()
