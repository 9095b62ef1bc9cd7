"""API keys on `/v1`, the routes that stay open, and CORS (off unless origins are configured)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from api.auth import MISSING_KEY_MESSAGE, WRONG_KEY_MESSAGE, key_matches, presented_key, _digest
from api.settings import Settings

KEY = "sk-localq-test-1"
OTHER_KEY = "sk-localq-test-2"


def make_client(**overrides):
    from api.app import create_app

    return create_app(replace(Settings.from_env({}), **overrides)).test_client()


@pytest.fixture
def locked():
    return make_client(api_keys=frozenset({KEY, OTHER_KEY}))


def test_no_keys_configured_means_open(client):
    assert client.get("/v1/models").status_code == 200


def test_missing_key_is_openai_shaped_401(locked):
    response = locked.get("/v1/models")
    assert response.status_code == 401
    assert response.get_json() == {
        "error": {"message": MISSING_KEY_MESSAGE, "type": "invalid_request_error", "param": None, "code": None}
    }
    assert MISSING_KEY_MESSAGE == "You didn't provide an API key. Provide it in an Authorization: Bearer header."
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    "headers",
    [{"Authorization": "Bearer sk-wrong"}, {"x-api-key": "sk-wrong"}, {"Authorization": f"Bearer {KEY}x"},
     {"Authorization": f"Bearer {KEY[:-1]}"}],
)
def test_wrong_key_is_invalid_api_key(locked, headers):
    response = locked.get("/v1/models", headers=headers)
    assert response.status_code == 401
    assert response.get_json() == {
        "error": {"message": WRONG_KEY_MESSAGE, "type": "invalid_request_error", "param": None,
                  "code": "invalid_api_key"}
    }
    assert WRONG_KEY_MESSAGE == "Incorrect API key provided."


@pytest.mark.parametrize("headers", [{"Authorization": "Basic c2stbG9jYWxx"}, {"Authorization": "Bearer "},
                                     {"x-api-key": ""}])
def test_unusable_credentials_count_as_missing(locked, headers):
    response = locked.get("/v1/models", headers=headers)
    assert response.status_code == 401
    assert response.get_json()["error"]["message"] == MISSING_KEY_MESSAGE


@pytest.mark.parametrize(
    "headers",
    [{"Authorization": f"Bearer {KEY}"}, {"Authorization": f"bearer {OTHER_KEY}"}, {"x-api-key": KEY},
     {"X-Api-Key": OTHER_KEY}],
)
def test_right_key_passes(locked, headers):
    response = locked.get("/v1/models", headers=headers)
    assert response.status_code == 200
    assert response.get_json()["object"] == "list"


def test_key_is_checked_before_validation(locked):
    """An unauthenticated client learns nothing about the request it sent."""
    response = locked.post("/v1/chat/completions", json={"model": 5})
    assert response.status_code == 401
    authed = locked.post("/v1/chat/completions", json={"model": 5}, headers={"Authorization": f"Bearer {KEY}"})
    assert authed.status_code == 400


def test_unknown_v1_route_needs_a_key_too(locked):
    assert locked.get("/v1/no-such-thing").status_code == 401
    assert locked.get("/v1/no-such-thing", headers={"x-api-key": KEY}).status_code == 404


@pytest.mark.parametrize("path", ["/healthz", "/openapi.json", "/docs", "/docs/swagger-ui.css"])
def test_open_routes_stay_open(locked, path):
    assert locked.get(path).status_code == 200, path


@pytest.mark.parametrize("path", ["/readyz", "/metrics", "/docs/", "/v1beta", "/"])
def test_routes_outside_v1_never_answer_401(locked, path):
    # Whether these exist depends on the build; none of them may ask for a key.
    assert locked.get(path).status_code != 401


def test_openai_sdk_style_request(locked):
    """The OpenAI SDK sends `Authorization: Bearer <key>` on every call."""
    response = locked.get("/v1/models/gpt-4o-mini", headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200


def test_keys_file_locks_the_api(tmp_path, monkeypatch):
    from api.app import create_app

    keys_file = tmp_path / "keys"
    keys_file.write_text("# ops team\nsk-from-file\n")
    client = create_app(Settings.from_env({"LOCALQ_API_KEYS_FILE": str(keys_file)})).test_client()
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer sk-from-file"}).status_code == 200
    assert client.get("/v1/models", headers={"Authorization": "Bearer # ops team"}).status_code == 401


def test_key_matching_compares_against_every_key():
    digests = [_digest(key) for key in ("a", "bb", "ccc")]
    assert key_matches("bb", digests)
    assert key_matches("ccc", digests)
    assert not key_matches("b", digests)
    assert not key_matches("", digests)
    assert not key_matches("bb", [])


def test_compare_digest_runs_once_per_key_even_after_a_match(monkeypatch):
    import api.auth

    calls = []
    real = api.auth.hmac.compare_digest

    def counting(a, b):
        calls.append(b)
        return real(a, b)

    monkeypatch.setattr(api.auth.hmac, "compare_digest", counting)
    digests = [_digest(key) for key in ("first", "second", "third")]
    assert key_matches("first", digests)
    assert len(calls) == 3


def test_presented_key_prefers_bearer():
    assert presented_key({"Authorization": "Bearer one", "x-api-key": "two"}) == "one"
    assert presented_key({"Authorization": "Basic xyz", "x-api-key": "two"}) == "two"
    assert presented_key({}) is None


# --- CORS -------------------------------------------------------------------------------------

ORIGIN = "http://localhost:3000"


def test_cors_off_by_default(client):
    response = client.get("/v1/models", headers={"Origin": ORIGIN})
    assert response.status_code == 200
    assert "Access-Control-Allow-Origin" not in response.headers
    preflight = client.options(
        "/v1/chat/completions",
        headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"},
    )
    assert "Access-Control-Allow-Origin" not in preflight.headers


@pytest.fixture
def cors_locked():
    return make_client(api_keys=frozenset({KEY}), cors_origins=(ORIGIN,))


def test_cors_allows_configured_origin(cors_locked):
    response = cors_locked.get("/v1/models", headers={"Origin": ORIGIN, "Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    exposed = response.headers["Access-Control-Expose-Headers"].lower()
    assert "x-localq-job-id" in exposed


def test_cors_ignores_other_origins(cors_locked):
    response = cors_locked.get(
        "/v1/models", headers={"Origin": "http://evil.test", "Authorization": f"Bearer {KEY}"}
    )
    assert "Access-Control-Allow-Origin" not in response.headers


def test_preflight_needs_no_key(cors_locked):
    response = cors_locked.options(
        "/v1/chat/completions",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, x-api-key",
        },
    )
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    allowed = response.headers["Access-Control-Allow-Headers"].lower()
    for header in ("authorization", "content-type", "x-api-key"):
        assert header in allowed
    assert "POST" in response.headers["Access-Control-Allow-Methods"]


def test_401_is_readable_by_the_browser(cors_locked):
    response = cors_locked.get("/v1/models", headers={"Origin": ORIGIN})
    assert response.status_code == 401
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN


def test_cors_only_on_v1(cors_locked):
    response = cors_locked.get("/healthz", headers={"Origin": ORIGIN})
    assert "Access-Control-Allow-Origin" not in response.headers
