"""Projects and their API keys in Redis (store/api_keys.py) and `localq keys` (ops/commands/keys.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

from ops.stack import REPO
from store.api_keys import KEY_IDS, KEYS, OWNER, KeyStore, digest


def test_a_key_is_stored_as_a_digest_and_found_by_its_secret(redis_db):
    store = KeyStore(redis_db)
    secret, key = store.create("team-a", name="ci")
    assert secret.startswith("sk-lq-") and len(secret) > 40
    assert store.lookup(secret) == key
    assert (key.role, key.name, key.redacted_value) == ("member", "ci", f"sk-lq-...{secret[-4:]}")
    assert store.lookup(secret + "x") is None
    stored = [value for kind_key in redis_db.keys("*") for value in _values(redis_db, kind_key)]
    assert not any(secret in value for value in stored), "the secret itself is never kept"
    assert redis_db.hget(KEY_IDS, key.id) == digest(secret)


def _values(client, key: str) -> list[str]:
    kind = client.type(key)
    if kind == "hash":
        return [*client.hkeys(key), *client.hvals(key)]
    return [client.get(key) or ""] if kind == "string" else []


def test_keys_of_one_project_share_it_and_projects_are_created_once(redis_db):
    store = KeyStore(redis_db)
    made = []
    threads = [threading.Thread(target=lambda: made.append(store.create("shared")[1])) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({key.project_id for key in made}) == 1
    assert [project.name for project in store.projects()] == ["shared"]
    _, other = store.create("other", role=OWNER)
    assert other.project_id != made[0].project_id and other.role == OWNER
    assert {key.id for key in store.keys(made[0].project_id)} == {key.id for key in made}
    assert len(store.keys()) == 9
    with pytest.raises(ValueError):
        store.create("x", role="admin")


def test_a_revoked_key_is_refused(redis_db):
    store = KeyStore(redis_db)
    secret, key = store.create("team-a")
    assert store.revoke(key.id) and store.lookup(secret) is None
    assert not store.revoke(key.id)
    assert redis_db.hlen(KEYS) == 0 and redis_db.hlen(KEY_IDS) == 0


def _cli(redis_server, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LOCALQ_REDIS_URL": redis_server.url}
    return subprocess.run([sys.executable, "-m", "ops.cli", "keys", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)


def test_localq_keys_create_list_revoke(redis_server, redis_db):
    created = _cli(redis_server, "create", "--project", "team-a", "--role", "owner", "--name", "admin")
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    key = KeyStore(redis_db).lookup(secret)
    assert key is not None and key.role == "owner" and key.id in created.stderr
    listed = _cli(redis_server, "list", "--json")
    assert listed.returncode == 0
    [entry] = json.loads(listed.stdout)
    assert (entry["id"], entry["project"], entry["role"]) == (key.id, "team-a", "owner")
    assert secret not in listed.stdout and entry["redacted_value"].endswith(secret[-4:])
    assert json.loads(_cli(redis_server, "list", "--json", "--project", "nobody").stdout) == []
    assert _cli(redis_server, "revoke", key.id).returncode == 0
    assert KeyStore(redis_db).lookup(secret) is None
    again = _cli(redis_server, "revoke", key.id)
    assert again.returncode == 1 and "no key" in again.stderr


def _api(redis_server, **env):
    from api.app import create_app
    from api.settings import Settings

    return create_app(Settings.from_env({"LOCALQ_REDIS_URL": redis_server.url, **env})).test_client()


def test_the_api_asks_for_a_key_once_a_project_has_one_and_refuses_it_once_revoked(redis_server, redis_db):
    from tests.service import wait_until

    api = _api(redis_server)
    assert api.get("/v1/models").status_code == 200  # no key anywhere: open, as before
    secret, key = KeyStore(redis_db).create("team-a")
    wait_until(lambda: api.get("/v1/models").status_code == 401, 3, "the API to ask for a key")
    assert api.get("/v1/models", headers={"Authorization": f"Bearer {secret}"}).status_code == 200
    assert api.get("/v1/models", headers={"x-api-key": secret}).status_code == 200
    wrong = api.get("/v1/models", headers={"Authorization": f"Bearer {secret}x"})
    assert (wrong.status_code, wrong.json["error"]["code"]) == (401, "invalid_api_key")
    assert api.get("/healthz").status_code == 200  # outside /v1: open
    KeyStore(redis_db).revoke(key.id)
    assert api.get("/v1/models", headers={"Authorization": f"Bearer {secret}"}).status_code == 401  # at once


def test_listed_keys_and_project_keys_work_side_by_side(redis_server, redis_db):
    secret, _ = KeyStore(redis_db).create("team-a")
    api = _api(redis_server, LOCALQ_API_KEYS="sk-listed")
    for presented in ("sk-listed", secret):
        assert api.get("/v1/models", headers={"Authorization": f"Bearer {presented}"}).status_code == 200
    assert api.get("/v1/models", headers={"Authorization": "Bearer sk-other"}).status_code == 401
    assert api.get("/v1/models").status_code == 401
