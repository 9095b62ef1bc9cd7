"""Which models a project may use: OpenAI's project model permissions (an allow list or a deny list).

One hash, `localq:model_permissions`: project id -> {"mode", "model_ids"}. A project without an
entry may use every model (a deny list of nothing). A model is named by its config name or any
alias; a list that names any one of them covers the model under all its names, so a denied model
cannot be reached through an alias and an allowed one answers to all of them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

import redis

KEY = "localq:model_permissions"
ALLOW, DENY = "allow_list", "deny_list"
MODES = (ALLOW, DENY)
MAX_MODEL_IDS = 1000


@dataclass(frozen=True)
class ModelPermissions:
    mode: str = DENY
    model_ids: tuple[str, ...] = ()

    def allows(self, names: Iterable[str]) -> bool:
        """Whether a model known by `names` (its name and aliases) may be used."""
        listed = not set(self.model_ids).isdisjoint(names)
        return listed if self.mode == ALLOW else not listed

    def as_object(self) -> dict:
        return {"object": "project.model_permissions", "mode": self.mode, "model_ids": list(self.model_ids)}


EVERYTHING = ModelPermissions()


def permissions(client: redis.Redis, project: str) -> ModelPermissions:
    """`project`'s permissions; every model for a project without any ("": a server without keys)."""
    raw = client.hget(KEY, project) if project else None
    if not raw:
        return EVERYTHING
    stored = json.loads(raw)
    return ModelPermissions(mode=stored["mode"], model_ids=tuple(stored["model_ids"]))


def set_permissions(client: redis.Redis, project: str, mode: str, model_ids: Iterable[str]) -> ModelPermissions:
    """Replace `project`'s permissions (ValueError for an unknown mode or too many ids)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}")
    ids = tuple(dict.fromkeys(model_ids))
    if len(ids) > MAX_MODEL_IDS:
        raise ValueError(f"at most {MAX_MODEL_IDS} model ids")
    found = ModelPermissions(mode=mode, model_ids=ids)
    client.hset(KEY, project, json.dumps({"mode": mode, "model_ids": list(ids)}))
    return found


def delete_permissions(client: redis.Redis, project: str) -> bool:
    """Forget `project`'s permissions (every model allowed again); False when it had none."""
    return bool(client.hdel(KEY, project))
