"""API keys on `/v1` and browser access (CORS), both configured by `Settings`.

With `LOCALQ_API_KEYS` / `LOCALQ_API_KEYS_FILE` set, every `/v1` request must carry one of the
keys as `Authorization: Bearer <key>` or `x-api-key: <key>`. Everything outside `/v1`
(`/healthz`, `/readyz`, `/docs`, `/openapi.json`, `/metrics`) stays open, and so do CORS
preflights (`OPTIONS`), which browsers send without credentials.

Keys are compared as SHA-256 digests with `hmac.compare_digest`, against every configured key
with no early exit, so neither the length of a key nor which key matched shows in the timing.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from flask import Flask, current_app, request

from api.errors import APIError

#: Routes under this prefix need a key when keys are configured.
PROTECTED_PREFIX = "/v1"
#: The job id header clients read from responses (made readable to browsers by CORS).
JOB_ID_HEADER = "x-localq-job-id"
CORS_ALLOW_HEADERS = ("Authorization", "Content-Type", "x-api-key")

MISSING_KEY_MESSAGE = "You didn't provide an API key. Provide it in an Authorization: Bearer header."
WRONG_KEY_MESSAGE = "Incorrect API key provided."

_DIGESTS = "localq.api_key_digests"


def install_auth(app: Flask, api_keys: Iterable[str]) -> None:
    """Require one of `api_keys` on `/v1`; does nothing when there are none."""
    digests = tuple(_digest(key) for key in sorted(api_keys))
    if not digests:
        return
    app.extensions[_DIGESTS] = digests
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
    if request.method == "OPTIONS" or not _is_protected(request.path):
        return
    key = presented_key(request.headers)
    if key is None:
        raise APIError(401, MISSING_KEY_MESSAGE, type="invalid_request_error", headers=_challenge())
    if not key_matches(key, current_app.extensions[_DIGESTS]):
        raise APIError(
            401, WRONG_KEY_MESSAGE, type="invalid_request_error", code="invalid_api_key",
            headers=_challenge(),
        )


def _is_protected(path: str) -> bool:
    return path == PROTECTED_PREFIX or path.startswith(PROTECTED_PREFIX + "/")


def _challenge() -> dict[str, str]:
    return {"WWW-Authenticate": 'Bearer realm="localq"'}


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
