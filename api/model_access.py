"""The models the request's project may use (`store.model_permissions`): a model outside them is
answered exactly as a model that does not exist (404 model_not_found), in `/v1/models` and in
every call that names one."""

from __future__ import annotations

from flask import current_app, g

from api.queue import queue_runtime
from store.model_permissions import EVERYTHING, ModelPermissions, permissions
from workers.config import ModelConfig


def permitted() -> ModelPermissions:
    """The request's project's permissions: only stored projects have any (not LOCALQ_API_KEYS ones)."""
    tenant = g.get("tenant")
    return permissions(queue_runtime().redis, tenant.project_id) if tenant is not None and tenant.stored else EVERYTHING


def usable_model(name: str) -> ModelConfig | None:
    """The config of model `name` if it exists and the project may use it; None otherwise."""
    config = current_app.extensions["localq.models"].resolve(name)
    return config if config is not None and permitted().allows(config.names) else None


def usable_models() -> list[ModelConfig]:
    allowed = permitted()
    return [config for config in current_app.extensions["localq.models"].list() if allowed.allows(config.names)]
