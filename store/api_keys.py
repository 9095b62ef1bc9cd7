"""Projects and their API keys, as OpenAI has them: every key belongs to one project and has a
role (`owner` of the server, or `member` of its project).

Only a SHA-256 digest of each secret is stored. The secrets are 256 random bits, so a digest
cannot be turned back into a key by guessing; a slow password hash would add nothing but latency
to every request. The secret is returned once, by `create`.

Redis layout (all hashes of JSON records):
- `localq:projects`: project id -> {id, name, created_at, archived_at}; `localq:project_names`: name -> id;
- `localq:api_keys`: secret digest -> {id, project_id, role, name, redacted_value, created_at, archived};
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


class ArchivedProject(ValueError):
    """Keys are neither made for nor accepted from an archived project."""


@dataclass(frozen=True)
class Project:
    id: str
    name: str
    created_at: int
    archived_at: int | None = None


@dataclass(frozen=True)
class ApiKey:
    id: str
    project_id: str
    role: str
    name: str
    redacted_value: str  # what a listing shows: the prefix and the last four characters
    created_at: int
    archived: bool = False  # its project was archived: the key is refused


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
        if project.archived_at is not None:
            raise ArchivedProject(f"project {project_name!r} is archived")
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
        return sorted((Project(**json.loads(raw)) for raw in self.client.hvals(PROJECTS)),
                      key=lambda p: (p.created_at, p.id))

    def project_by_id(self, project_id: str) -> Project | None:
        raw = self.client.hget(PROJECTS, project_id)
        return Project(**json.loads(raw)) if raw else None

    def rename(self, project_id: str, name: str) -> Project | None:
        """Give project `project_id` the name `name`; None when there is no such project.
        ValueError when another project has that name."""
        project = self.project_by_id(project_id)
        if project is None or project.name == name:
            return project
        if not self.client.hsetnx(PROJECT_NAMES, name, project_id):
            raise ValueError(f"a project named {name!r} exists")
        renamed = Project(**{**asdict(project), "name": name})
        pipe = self.client.pipeline()
        pipe.hset(PROJECTS, project_id, json.dumps(asdict(renamed)))
        pipe.hdel(PROJECT_NAMES, project.name)
        pipe.execute()
        return renamed

    def archive(self, project_id: str) -> Project | None:
        """Archive a project: its keys are refused from now on, and no key is made for it again."""
        project = self.project_by_id(project_id)
        if project is None or project.archived_at is not None:
            return project
        archived = Project(**{**asdict(project), "archived_at": int(time.time())})
        pipe = self.client.pipeline()
        pipe.hset(PROJECTS, project_id, json.dumps(asdict(archived)))
        for key in self.keys(project_id):
            hashed = self.client.hget(KEY_IDS, key.id)
            if hashed:
                pipe.hset(KEYS, hashed, json.dumps({**asdict(key), "archived": True}))
        pipe.execute()
        return archived

    def lookup(self, secret: str) -> ApiKey | None:
        """The key `secret` is, or None (never issued, revoked, or its project archived)."""
        raw = self.client.hget(KEYS, digest(secret))
        key = ApiKey(**json.loads(raw)) if raw else None
        return None if key is None or key.archived else key

    def key(self, key_id: str) -> ApiKey | None:
        hashed = self.client.hget(KEY_IDS, key_id)
        raw = self.client.hget(KEYS, hashed) if hashed else None
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
