"""`/v1/models`: the configured models the key's project may use, each listed under its name and
every alias."""

from __future__ import annotations

from api.model_access import usable_model, usable_models
from schemas.openai_errors import model_not_found
from workers.capabilities import backend_name, supported_kinds
from workers.config import ModelConfig


def _model_object(model_id: str, config: ModelConfig) -> dict:
    """OpenAI's Model, plus `localq` (an extension field): what a client such as the web console
    needs to offer the model for the right things."""
    details = {"name": config.name, "aliases": list(config.aliases), "capabilities": sorted(supported_kinds(config)),
               "backend": backend_name(config) or config.backend or "", "device": config.device}
    if config.description:
        details["description"] = config.description
    if config.voices:
        details["voices"] = sorted(config.voices)
    return {"id": model_id, "object": "model", "created": config.created, "owned_by": "localq", "localq": details}


def list_models(call) -> dict:
    """One entry per id a client may send, so aliases such as gpt-4o-mini show up."""
    data = [
        _model_object(model_id, config)
        for config in usable_models()
        for model_id in config.names
    ]
    return {"object": "list", "data": data}


def retrieve_model(call) -> dict:
    """The model object for a name or alias, or OpenAI's model_not_found error."""
    model_id = call.path["model"]
    config = usable_model(model_id)
    if config is None:
        raise model_not_found(model_id)
    return _model_object(model_id, config)


HANDLERS = {"listModels": list_models, "retrieveModel": retrieve_model}
