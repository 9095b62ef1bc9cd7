"""Projects and their API keys, as OpenAI has them: every key belongs to one project and has a
role (`owner` of the server, or `member` of its project).

Only a SHA-256 digest of each secret is stored. The secrets are 256 random bits, so a digest
cannot be turned back into a key by guessing; a slow password hash would add nothing but latency
to every request. The secret is returned once, by `create`.

Redis layout (all hashes of JSON records):
- `localq:projects`: project id -> {id, name, created_at}; `localq:project_names`: name -> id;
- `localq:api_keys`: secret digest -> {id, project_id, role, name, redacted_value, created_at};
- `localq:api_key_ids`: key id -> secret digest (to list and revoke by id).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import asdict, dataclass

import redis

PROJECTS, PROJECT_NAMES = "localq:projects", "localq:project_names"
KEYS, KEY_IDS = "localq:api_keys", "localq:api_key_ids"
OWNER, MEMBER = "owner", "member"
ROLES = (OWNER, MEMBER)
SECRET_PREFIX = "sk-lq-"


@dataclass(frozen=True)
class Project:
    id: str
    name: str
    created_at: int


@dataclass(frozen=True)
class ApiKey:
    id: str
    project_id: str
    role: str
    name: str
    redacted_value: str  # what a listing shows: the prefix and the last four characters
    created_at: int


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


class KeyStore:
    def __init__(self, client: redis.Redis):
        self.client = client

    def create(self, project_name: str, *, role: str = MEMBER, name: str = "") -> tuple[str, ApiKey]:
        """A new key in the project named `project_name` (created when new): (secret, record)."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}")
        project = self.project(project_name, create=True)
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        record = ApiKey(id="key_" + secrets.token_hex(12), project_id=project.id, role=role, name=name,
                        redacted_value=f"{SECRET_PREFIX}...{secret[-4:]}", created_at=int(time.time()))
        hashed = digest(secret)
        pipe = self.client.pipeline()
        pipe.hset(KEYS, hashed, json.dumps(asdict(record)))
        pipe.hset(KEY_IDS, record.id, hashed)
        pipe.execute()
        return secret, record

    def project(self, name: str, *, create: bool = False) -> Project | None:
        """The project named `name`; created (exactly once, whoever asks at the same time) with `create`."""
        found = self.client.hget(PROJECT_NAMES, name)
        if found is None and create:
            # The record goes in before the name points at it, so whoever reads the name finds it;
            # the loser of a race removes its unnamed record.
            candidate = "proj_" + secrets.token_hex(12)
            self.client.hset(PROJECTS, candidate, json.dumps(
                asdict(Project(id=candidate, name=name, created_at=int(time.time())))))
            if not self.client.hsetnx(PROJECT_NAMES, name, candidate):
                self.client.hdel(PROJECTS, candidate)
            found = self.client.hget(PROJECT_NAMES, name)
        if found is None:
            return None
        raw = self.client.hget(PROJECTS, found)
        return Project(**json.loads(raw)) if raw else None

    def projects(self) -> list[Project]:
        return sorted((Project(**json.loads(raw)) for raw in self.client.hvals(PROJECTS)), key=lambda p: p.created_at)

    def lookup(self, secret: str) -> ApiKey | None:
        """The key `secret` is, or None (never issued, or revoked)."""
        raw = self.client.hget(KEYS, digest(secret))
        return ApiKey(**json.loads(raw)) if raw else None

    def keys(self, project_id: str | None = None) -> list[ApiKey]:
        found = [ApiKey(**json.loads(raw)) for raw in self.client.hvals(KEYS)]
        return sorted((key for key in found if project_id is None or key.project_id == project_id),
                      key=lambda key: (key.created_at, key.id))

    def revoke(self, key_id: str) -> bool:
        """Forget key `key_id` (its secret is refused from then on); False when there is none."""
        hashed = self.client.hget(KEY_IDS, key_id)
        if hashed is None:
            return False
        pipe = self.client.pipeline()
        pipe.hdel(KEYS, hashed)
        pipe.hdel(KEY_IDS, key_id)
        pipe.execute()
        return True
