"""API keys on `/v1` and browser access (CORS), both configured by `Settings`.

Keys come from two places: `LOCALQ_API_KEYS` / `LOCALQ_API_KEYS_FILE` (each listed key is a
project of its own), and the projects' keys kept in Redis (`localq keys create`,
`store.api_keys`). When either has a key, every `/v1` request must carry one as
`Authorization: Bearer <key>` or `x-api-key: <key>`; with none anywhere the server stays open,
as a single tenant. Everything outside `/v1` (`/healthz`, `/readyz`, `/docs`, `/openapi.json`,
`/metrics`) stays open, and so do CORS preflights (`OPTIONS`), which browsers send without
credentials. The request's `Tenant` (project, role, key) is in `flask.g.tenant`.

Listed keys are compared as SHA-256 digests with `hmac.compare_digest`, against every configured
key with no early exit, so neither the length of a key nor which key matched shows in the timing.
A Redis key is looked up by its digest on every request, so a revoked key is refused at once on
every API process; whether Redis holds any key at all is read at most once a second.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Iterable
from dataclasses import dataclass

import redis
from flask import Flask, current_app, g, request

from api.errors import APIError
from store.api_keys import KEYS, MEMBER, OWNER, KeyStore

#: Routes under this prefix need a key when keys are configured.
PROTECTED_PREFIX = "/v1"
#: The job id header clients read from responses (made readable to browsers by CORS).
JOB_ID_HEADER = "x-localq-job-id"
CORS_ALLOW_HEADERS = ("Authorization", "Content-Type", "x-api-key")

MISSING_KEY_MESSAGE = "You didn't provide an API key. Provide it in an Authorization: Bearer header."
WRONG_KEY_MESSAGE = "Incorrect API key provided."

_DIGESTS = "localq.api_key_digests"
_STORED = "localq.stored_keys"  # (read at, whether Redis holds any key)
STORED_KEYS_MAX_AGE = 1.0  # seconds
OPEN = None  # the tenant of a server without keys: everything is one project's


@dataclass(frozen=True)
class Tenant:
    project_id: str
    role: str  # OWNER of the server, or MEMBER of its project
    key_id: str
    stored: bool = True  # a project kept in Redis (with settings of its own), not a LOCALQ_API_KEYS key's


def install_auth(app: Flask, api_keys: Iterable[str]) -> None:
    """Require a key on `/v1` once one is configured (`api_keys`) or created (in Redis)."""
    app.extensions[_DIGESTS] = tuple(_digest(key) for key in sorted(api_keys))
    app.before_request(_require_api_key)


def install_cors(app: Flask, origins: Iterable[str]) -> None:
    """Let browsers on `origins` call `/v1`; does nothing (CORS off) when there are none."""
    origins = list(origins)
    if not origins:
        return
    from flask_cors import CORS  # only needed when configured

    CORS(
        app,
        resources={rf"{PROTECTED_PREFIX}/*": {"origins": origins}},
        allow_headers=list(CORS_ALLOW_HEADERS),
        expose_headers=[JOB_ID_HEADER],
        supports_credentials=False,  # keys travel in headers, never in cookies
        max_age=600,
    )


def presented_key(headers) -> str | None:
    """The key a request carries: a Bearer token, else `x-api-key`; None when neither is there."""
    authorization = headers.get("Authorization", "")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    key = headers.get("x-api-key", "").strip()
    return key or None


def key_matches(presented: str, digests: Iterable[bytes]) -> bool:
    """Constant-time check of `presented` against every digest; never stops at the first match."""
    candidate = _digest(presented)
    matched = False
    for digest in digests:
        matched |= hmac.compare_digest(candidate, digest)
    return matched


def _require_api_key() -> None:
    g.tenant = OPEN
    if request.method == "OPTIONS" or not _is_protected(request.path):
        return
    listed, stored_any = current_app.extensions[_DIGESTS], _redis_has_keys()
    if not listed and not stored_any:
        return
    key = presented_key(request.headers)
    if key is None:
        raise APIError(401, MISSING_KEY_MESSAGE, type="invalid_request_error", headers=_challenge())
    tenant = _tenant_of(key, listed, stored_any)
    if tenant is None:
        raise APIError(
            401, WRONG_KEY_MESSAGE, type="invalid_request_error", code="invalid_api_key",
            headers=_challenge(),
        )
    g.tenant = tenant


def keys_configured() -> bool:
    """Whether this server asks for keys (listed in its settings, or created in Redis)."""
    return bool(current_app.extensions[_DIGESTS]) or _redis_has_keys()


def presented_tenant() -> Tenant | None:
    """The tenant of the key this request carries, for routes outside `/v1` that serve a project's
    objects; None without a key, with a key nobody issued, or on a server without keys."""
    key = presented_key(request.headers)
    listed, stored_any = current_app.extensions[_DIGESTS], _redis_has_keys()
    if key is None or not (listed or stored_any):
        return None
    return _tenant_of(key, listed, stored_any)


def _tenant_of(key: str, listed: tuple[bytes, ...], stored_any: bool) -> Tenant | None:
    if listed and key_matches(key, listed):
        own = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:24]
        return Tenant(project_id=f"proj_{own}", role=MEMBER, key_id=f"key_{own}", stored=False)  # its own project
    stored = _stored_key(key) if stored_any else None
    if stored is None:
        return None
    return Tenant(project_id=stored.project_id, role=stored.role, key_id=stored.id)


def project_scope() -> str:
    """The project the request acts for, which owns what it creates and is all it can see:
    "" on a server without keys (one tenant; everything is its own)."""
    tenant = g.get("tenant")
    return "" if tenant is None else tenant.project_id


def is_owner() -> bool:
    """Whether the request may see every project's objects: a server without keys, or an owner key."""
    tenant = g.get("tenant")
    return tenant is None or tenant.role == OWNER


def require_owner() -> None:
    """Admin operations (`/v1/organization/...`) need an owner key (or a server without keys)."""
    if not is_owner():
        raise APIError(403, "You have insufficient permissions for this operation: it needs an owner key.",
                       type="invalid_request_error", code="insufficient_permissions")


def _redis_has_keys() -> bool:
    """Whether Redis holds any project key, read at most once a second per API process."""
    read_at, present = current_app.extensions.get(_STORED, (float("-inf"), False))
    now = time.monotonic()
    if now - read_at >= STORED_KEYS_MAX_AGE:
        try:
            present = bool(_queue_redis().hlen(KEYS))
        except redis.RedisError:
            present = present  # Redis away: keep what was last known
        current_app.extensions[_STORED] = (now, present)
    return present


def _stored_key(key: str):
    return KeyStore(_queue_redis()).lookup(key)  # Redis away: the app's 503 queue_unavailable


def _queue_redis():
    from api.queue import queue_runtime  # late: auth is installed before the app's queue is first used

    return queue_runtime().redis


def _is_protected(path: str) -> bool:
    return path == PROTECTED_PREFIX or path.startswith(PROTECTED_PREFIX + "/")


def _challenge() -> dict[str, str]:
    return {"WWW-Authenticate": 'Bearer realm="localq"'}


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
