"""Rate limits per project (and per model where configured): the budgets in Redis
(`store.rate_limits`), their enforcement and headers on `/v1` (`api.rate_limits`), the admin
routes (`api.routes.rate_limits`), and two API processes sharing one Redis."""

from __future__ import annotations

import math
import re

import httpx
import pytest

from store.api_keys import OWNER, KeyStore
from store.rate_limits import (
    BATCH_TPD,
    INDEX,
    PROJECT_WIDE,
    RPM,
    TPM,
    Limits,
    RateLimitStore,
    admit_batch_tokens,
    admit_request,
    batch_tokens_left,
    counter_key,
    duration,
)

CHAT = "smollm2-135m-instruct"
STREAM = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True,
          "max_tokens": 4}
RATE_HEADERS = tuple(f"x-ratelimit-{what}-{kind}" for kind in ("requests", "tokens")
                     for what in ("limit", "remaining", "reset"))


def seconds(text: str) -> float:
    """An `x-ratelimit-reset-*` value (Go-style duration) in seconds."""
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m(?!s))?(?:([\d.]+)s)?(?:(\d+)ms)?", text)
    assert match and text, f"not an OpenAI duration: {text!r}"
    hours, minutes, secs, millis = match.groups()
    return int(hours or 0) * 3600 + int(minutes or 0) * 60 + float(secs or 0) + int(millis or 0) / 1000


# --- units over a real Redis -------------------------------------------------------------------

@pytest.mark.parametrize("ms, text", [(0, "0s"), (-5, "0s"), (20, "20ms"), (999, "999ms"), (1000, "1s"),
                                      (8640, "8.64s"), (59_990, "59.99s"), (60_000, "1m0s"),
                                      (360_000, "6m0s"), (3_723_004, "1h2m3.004s"), (86_400_000, "24h0m0s")])
def test_durations_are_written_as_openai_writes_them(ms, text):
    assert duration(ms) == text
    assert seconds(text) == pytest.approx(max(ms, 0) / 1000)


def test_limits_from_env():
    assert Limits.from_env({}) == Limits()
    assert not Limits.from_env({}).per_minute()
    limits = Limits.from_env({"LOCALQ_RATE_LIMIT_RPM": "3", "LOCALQ_RATE_LIMIT_TPM": " 1000 ",
                              "LOCALQ_BATCH_TOKENS_PER_DAY": "", })
    assert limits == Limits(max_requests_per_1_minute=3, max_tokens_per_1_minute=1000)
    assert limits.per_minute() and Limits(batch_1_day_max_input_tokens=5).per_minute() is False
    for bad in ("0", "-1", "x", "1.5"):
        with pytest.raises(ValueError, match="LOCALQ_RATE_LIMIT_RPM"):
            Limits.from_env({"LOCALQ_RATE_LIMIT_RPM": bad})


def test_settings_read_the_defaults():
    from api.settings import Settings

    settings = Settings.from_env({"LOCALQ_RATE_LIMIT_TPM": "500", "LOCALQ_BATCH_TOKENS_PER_DAY": "9000"})
    assert settings.rate_limits == Limits(max_tokens_per_1_minute=500, batch_1_day_max_input_tokens=9000)
    assert Settings.from_env({}).rate_limits == Limits()


def test_a_budget_refills_continuously_and_a_refusal_costs_nothing(redis_db):
    defaults = Limits(max_requests_per_1_minute=3)
    seen = [admit_request(redis_db, "proj_a", None, 0, defaults) for _ in range(3)]
    assert all(decision.allowed for decision in seen)
    assert [decision.tightest(RPM).remaining for decision in seen] == [2, 1, 0]
    # each request takes 20 s of the minute: the budget is full again that long after the last
    assert [round(decision.tightest(RPM).reset_ms / 1000) for decision in seen] == [20, 40, 60]
    refused = admit_request(redis_db, "proj_a", None, 0, defaults)
    assert not refused.allowed
    state = refused.blocking()
    assert state.budget.field == RPM and state.remaining == 0 and 19_000 < state.retry_ms <= 20_000
    again = admit_request(redis_db, "proj_a", None, 0, defaults)
    assert again.blocking().retry_ms <= state.retry_ms  # the refusal did not push the wait further
    # another project has budgets of its own; no limit at all: nothing is counted
    assert admit_request(redis_db, "proj_b", None, 0, defaults).tightest(RPM).remaining == 2
    assert admit_request(redis_db, "proj_a", None, 0, Limits()) is None
    # the budget's key expires once it is full again
    assert 59_000 < redis_db.pttl(counter_key("proj_a", PROJECT_WIDE, RPM)) <= 60_000


def test_tokens_per_minute_and_requests_too_large(redis_db):
    defaults = Limits(max_tokens_per_1_minute=100)
    first = admit_request(redis_db, "p", None, 60, defaults)
    assert first.allowed and first.tightest(TPM).remaining == 40 and first.tightest(RPM) is None
    second = admit_request(redis_db, "p", None, 60, defaults)
    assert not second.allowed
    blocking = second.blocking()
    assert blocking.budget.kind == "tokens" and not blocking.too_large
    assert 11_000 < blocking.retry_ms <= 12_000  # 20 tokens short, at 100 tokens a minute
    huge = admit_request(redis_db, "q", None, 101, defaults)
    assert not huge.allowed and huge.blocking().too_large


def test_rows_override_defaults_and_models_get_budgets_of_their_own(redis_db):
    store = RateLimitStore(redis_db)
    defaults = Limits(max_requests_per_1_minute=100, max_tokens_per_1_minute=1000)
    assert not store.any()
    assert store.update("p", PROJECT_WIDE, {RPM: 10, TPM: 0}) == {RPM: 10, TPM: 0}
    assert store.update("p", CHAT, {RPM: 2}) == {RPM: 2}
    assert store.any() and redis_db.smembers(INDEX) == {"p"}
    project, model = store.effective("p", CHAT, defaults)
    assert project == Limits(max_requests_per_1_minute=10)  # TPM 0: no limit, whatever the default
    assert model == Limits(max_requests_per_1_minute=2)
    assert store.effective("other", CHAT, defaults) == (defaults, Limits())
    # a request to the model draws on both budgets; another model only on the project's
    for _ in range(2):
        assert admit_request(redis_db, "p", CHAT, 5, defaults).allowed
    refused = admit_request(redis_db, "p", CHAT, 5, defaults)
    assert not refused.allowed and refused.blocking().budget.scope == CHAT
    assert refused.tightest(RPM).budget.scope == CHAT  # the headers report the budget with least left
    other = admit_request(redis_db, "p", "all-minilm-l6-v2", 5, defaults)
    assert other.allowed and other.tightest(RPM).remaining == 7  # 10, less the 2 charged and this one
    # null clears a field; a row without fields goes, and the project leaves the index with its last row
    assert store.update("p", CHAT, {RPM: None}) == {}
    assert store.rows("p") == {PROJECT_WIDE: {RPM: 10, TPM: 0}}
    store.update("p", PROJECT_WIDE, {RPM: None, TPM: None})
    assert store.rows("p") == {} and not store.any()
    with pytest.raises(ValueError):
        store.update("p", CHAT, {"max_images_per_1_minute": 3})


def test_batch_input_tokens_per_day(redis_db):
    defaults = Limits(max_requests_per_1_minute=1, batch_1_day_max_input_tokens=1000)
    assert batch_tokens_left(redis_db, "", CHAT, defaults) == 1000
    assert admit_batch_tokens(redis_db, "", CHAT, 600, defaults) == (True, 0.0)
    assert batch_tokens_left(redis_db, "", CHAT, defaults) == 400
    ok, retry_after = admit_batch_tokens(redis_db, "", CHAT, 500, defaults)
    assert not ok and 8_600 < retry_after <= 8_640  # 100 tokens short, at 1000 a day
    assert admit_batch_tokens(redis_db, "", CHAT, 1001, defaults) == (False, math.inf)
    # a separate budget: per-minute requests are untouched, and they do not touch it
    assert admit_request(redis_db, "", CHAT, 10, defaults).allowed
    assert batch_tokens_left(redis_db, "", CHAT, defaults) == 400
    # a model's own daily budget, beside the project's; no limit at all: always admitted
    RateLimitStore(redis_db).update("proj_x", CHAT, {BATCH_TPD: 50})
    assert admit_batch_tokens(redis_db, "proj_x", CHAT, 60, defaults) == (False, math.inf)
    assert admit_batch_tokens(redis_db, "proj_x", "other-model", 60, defaults) == (True, 0.0)
    assert admit_batch_tokens(redis_db, "proj_y", CHAT, 10**9, Limits()) == (True, 0.0)
    assert batch_tokens_left(redis_db, "proj_y", CHAT, Limits()) is None


def test_a_batch_of_several_models_is_charged_all_or_nothing(redis_db):
    from store.rate_limits import admit_batch

    RateLimitStore(redis_db).update("p", "small", {BATCH_TPD: 100})
    defaults = Limits(batch_1_day_max_input_tokens=1000)
    assert admit_batch(redis_db, "p", {"small": 150, "big": 10}, defaults) == (False, math.inf)
    assert batch_tokens_left(redis_db, "p", "big", defaults) == 1000  # nothing was charged
    assert admit_batch(redis_db, "p", {"small": 60, "big": 500}, defaults) == (True, 0.0)
    assert batch_tokens_left(redis_db, "p", "big", defaults) == 440
    assert batch_tokens_left(redis_db, "p", "small", defaults) == 40
    ok, retry_after = admit_batch(redis_db, "p", {"small": 50, "big": 10}, defaults)
    assert not ok and 0 < retry_after <= 8_640  # 10 short of the model's own 100 a day
    assert batch_tokens_left(redis_db, "p", "big", defaults) == 440


def test_the_default_batch_budget_is_read_from_the_environment(redis_db, monkeypatch):
    monkeypatch.setenv("LOCALQ_BATCH_TOKENS_PER_DAY", "10")
    assert admit_batch_tokens(redis_db, "proj_z", CHAT, 11) == (False, math.inf)
    assert admit_batch_tokens(redis_db, "proj_z", CHAT, 10) == (True, 0.0)


def test_token_estimates():
    from store.rate_limits import estimate_tokens, prompt_tokens

    chat = {"model": CHAT, "messages": [
        {"role": "system", "content": "x" * 40},
        {"role": "user", "content": [{"type": "text", "text": "y" * 40},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 9000}}]}],
        "max_completion_tokens": 100, "n": 2}
    assert estimate_tokens("createChatCompletion", chat) == 20 + 200
    assert estimate_tokens("createChatCompletion", {**chat, "max_completion_tokens": None, "max_tokens": 7,
                                                    "n": None}) == 20 + 7
    assert estimate_tokens("createCompletion", {"model": CHAT, "prompt": "abcde"}) == 2 + 16
    assert estimate_tokens("createEmbedding", {"model": "e", "input": [[1, 2, 3], [4]]}) == 4
    assert estimate_tokens("createEmbedding", {"model": "e", "input": ["abcd", "efgh"]}) == 2
    assert estimate_tokens("createImage", {"model": "i", "prompt": "a cat", "n": 4}) == 2
    assert prompt_tokens(chat) == 20  # a batch line's cost: its input only
    assert prompt_tokens({"model": CHAT, "messages": [{"role": "user", "content": "hi"}],
                          "x-localai-extensions": {"grammar": "x" * 400}}) == 1


# --- the API, in process ------------------------------------------------------------------------

def _app(redis_server, **env):
    from api.app import create_app
    from api.settings import Settings

    return create_app(Settings.from_env({"LOCALQ_REDIS_URL": redis_server.url, **env}))


def _call(client, key=None, model="gpt-4o-mini"):
    """A model operation that is counted and then answered without a worker: an embedding from the
    chat model (400: it embeds nothing) or from a model that does not exist (404). In-process apps
    cannot queue here (the Celery app reads its broker from the environment); streams are in the
    test with API processes below."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return client.post("/v1/embeddings", json={"model": model, "input": "hi"}, headers=headers)


def test_over_the_limit_is_429_with_retry_after_and_other_projects_are_unaffected(redis_server, redis_db):
    a, _ = KeyStore(redis_db).create("team-a")
    b, _ = KeyStore(redis_db).create("team-b")
    client = _app(redis_server, LOCALQ_RATE_LIMIT_RPM="3", LOCALQ_RATE_LIMIT_TPM="1000").test_client()
    answers = [_call(client, a) for _ in range(3)]
    assert [answer.status_code for answer in answers] == [400] * 3  # counted, then answered by the operation
    for answer, left in zip(answers, (2, 1, 0), strict=True):
        assert answer.headers["x-ratelimit-limit-requests"] == "3"
        assert answer.headers["x-ratelimit-remaining-requests"] == str(left)
        assert answer.headers["x-ratelimit-limit-tokens"] == "1000"
        assert answer.headers["x-ratelimit-remaining-tokens"] == str(1000 - 1 * (3 - left))  # "hi": 1 token
    assert 19 < seconds(answers[0].headers["x-ratelimit-reset-requests"]) <= 20
    assert 59 < seconds(answers[2].headers["x-ratelimit-reset-requests"]) <= 60
    assert seconds(answers[0].headers["x-ratelimit-reset-tokens"]) == pytest.approx(0.06, abs=0.002)
    refused = _call(client, a)
    assert refused.status_code == 429
    error = refused.get_json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("requests", "rate_limit_exceeded", None)
    assert "Limit 3, Used 3, Requested 1" in error["message"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 20
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert all(name in refused.headers for name in RATE_HEADERS)
    other = _call(client, b)
    assert other.status_code == 400 and other.headers["x-ratelimit-remaining-requests"] == "2"
    # not a model operation: neither counted nor given the headers
    listed = client.get("/v1/models", headers={"Authorization": f"Bearer {a}"})
    assert listed.status_code == 200 and "x-ratelimit-limit-requests" not in listed.headers


def test_tokens_per_minute_are_enforced_with_type_tokens(redis_server, redis_db):
    client = _app(redis_server, LOCALQ_RATE_LIMIT_TPM="100").test_client()
    body = {"model": "no-such-model", "prompt": "x" * 200, "max_tokens": 10}  # 50 + 10 tokens
    first = client.post("/v1/completions", json=body)
    assert first.status_code == 404  # counted, then answered by its operation
    assert (first.headers["x-ratelimit-limit-tokens"], first.headers["x-ratelimit-remaining-tokens"]) == ("100", "40")
    assert "x-ratelimit-limit-requests" not in first.headers  # no request limit here
    second = client.post("/v1/completions", json=body)
    assert second.status_code == 429 and second.get_json()["error"]["type"] == "tokens"
    assert 1 <= int(second.headers["Retry-After"]) <= 12
    too_large = client.post("/v1/completions", json={**body, "max_tokens": 1000})
    assert too_large.status_code == 429 and "Request too large" in too_large.get_json()["error"]["message"]


def test_without_limits_nothing_changes(redis_server, redis_db):
    client = _app(redis_server).test_client()
    answer = client.post("/v1/completions", json={"model": "no-such-model", "prompt": "x"})
    assert answer.status_code == 404 and "x-ratelimit-limit-requests" not in answer.headers
    assert redis_db.keys("localq:rate:*") == []


def test_no_redis_is_503_never_500():
    from api.app import create_app
    from api.settings import Settings

    client = create_app(Settings.from_env({"LOCALQ_REDIS_URL": "redis://127.0.0.1:1/0",
                                           "LOCALQ_RATE_LIMIT_RPM": "3"})).test_client()
    answer = client.post("/v1/completions", json={"model": "no-such-model", "prompt": "x"})
    assert answer.status_code == 503 and answer.get_json()["error"]["code"] == "queue_unavailable"
    assert answer.headers["Retry-After"] == "5"
    # without limits the request is answered as before, Redis or not
    plain = create_app(Settings.from_env({"LOCALQ_REDIS_URL": "redis://127.0.0.1:1/0"})).test_client()
    assert plain.post("/v1/completions", json={"model": "no-such-model", "prompt": "x"}).status_code == 404


def test_admin_routes(redis_server, redis_db):
    from tests.contract import upstream

    owner, _ = KeyStore(redis_db).create("admins", role=OWNER)
    member, member_key = KeyStore(redis_db).create("team-a")
    project = member_key.project_id
    client = _app(redis_server, LOCALQ_RATE_LIMIT_RPM="60", LOCALQ_BATCH_TOKENS_PER_DAY="5000").test_client()
    as_owner = {"Authorization": f"Bearer {owner}"}
    url = f"/v1/organization/projects/{project}/rate_limits"

    listed = client.get(url, headers=as_owner)
    assert listed.status_code == 200
    upstream().assert_conforms("ProjectRateLimitListResponse", listed.get_json())
    rows = {row["id"]: row for row in listed.get_json()["data"]}
    assert listed.get_json()["data"][0]["id"] == "rl-*"
    assert rows["rl-*"] == {"object": "project.rate_limit", "id": "rl-*", "model": "*",
                            "max_requests_per_1_minute": 60, "max_tokens_per_1_minute": 0,
                            "batch_1_day_max_input_tokens": 5000}
    assert rows[f"rl-{CHAT}"]["max_requests_per_1_minute"] == 60  # no limit of its own: the project's

    updated = client.post(f"{url}/rl-gpt-4o-mini", json={"max_requests_per_1_minute": 2}, headers=as_owner)
    assert updated.status_code == 200
    upstream().assert_conforms("ProjectRateLimit", updated.get_json())
    assert updated.get_json()["id"] == f"rl-{CHAT}" and updated.get_json()["max_requests_per_1_minute"] == 2
    wide = client.post(f"{url}/rl-*", json={"max_tokens_per_1_minute": 5000}, headers=as_owner)
    assert wide.get_json()["max_tokens_per_1_minute"] == 5000
    page = client.get(f"{url}?limit=1&after=rl-*", headers=as_owner).get_json()
    every = [row["id"] for row in listed.get_json()["data"]]
    assert [row["id"] for row in page["data"]] == every[1:2] and page["has_more"]
    last = client.get(f"{url}?after={every[-2]}", headers=as_owner).get_json()
    assert [row["id"] for row in last["data"]] == every[-1:] and not last["has_more"]

    # the model's own limit holds for the member's project, under the alias too
    assert [_call(client, member).status_code for _ in range(3)] == [400, 400, 429]
    assert _call(client, member, "no-such-model").status_code == 404  # the project's budget still has room
    assert _call(client, owner).status_code == 400  # another project

    for path, body, status, code in [
        (f"{url}/rl-{CHAT}", {"max_images_per_1_minute": 1}, 400, "unsupported_parameter"),
        (f"{url}/rl-{CHAT}", {"max_requests_per_1_minute": -1}, 400, "invalid_value"),
        (f"{url}/rl-{CHAT}", {"max_requests_per_1_minute": True}, 400, "invalid_type"),
        (f"{url}/rl-{CHAT}", {"colour": 1}, 400, "unknown_parameter"),
        (f"{url}/rl-{CHAT}", [1], 400, "invalid_type"),
        (f"{url}/rl-no-such-model", {}, 404, "not_found"),
        ("/v1/organization/projects/proj_nobody/rate_limits/rl-*", {}, 404, "not_found"),
    ]:
        answer = client.post(path, json=body, headers=as_owner)
        assert (answer.status_code, answer.get_json()["error"]["code"]) == (status, code), (path, body)
    assert client.get("/v1/organization/projects/proj_nobody/rate_limits", headers=as_owner).status_code == 404
    assert client.get(f"{url}?limit=0", headers=as_owner).status_code == 400

    for answer in (client.get(url, headers={"Authorization": f"Bearer {member}"}),
                   client.post(f"{url}/rl-*", json={"max_requests_per_1_minute": 1000},
                               headers={"Authorization": f"Bearer {member}"})):
        assert answer.status_code == 403
        assert answer.get_json()["error"]["code"] == "insufficient_permissions"

    cleared = client.post(f"{url}/rl-{CHAT}", json={"max_requests_per_1_minute": None}, headers=as_owner)
    assert cleared.get_json()["max_requests_per_1_minute"] == 60


def test_a_server_without_keys_is_project_default(redis_server, redis_db):
    client = _app(redis_server).test_client()
    answer = client.post("/v1/organization/projects/default/rate_limits/rl-*", json={"max_requests_per_1_minute": 1})
    assert answer.status_code == 200
    assert [_call(client).status_code for _ in range(2)] == [400, 429]


# --- two API processes, one Redis ---------------------------------------------------------------

def test_limits_hold_across_two_api_processes(tmp_path):
    import os

    import redis

    from ops.redis_server import RedisServer
    from ops.stack import ServiceProcesses

    with RedisServer(tmp_path / "redis") as redis_server:
        client = redis.Redis.from_url(redis_server.url, decode_responses=True)
        a, _ = KeyStore(client).create("team-a")
        b, _ = KeyStore(client).create("team-b")
        env = {**os.environ, "LOCALQ_REDIS_URL": redis_server.url, "PYTHONUNBUFFERED": "1",
               "LOCALQ_RATE_LIMIT_RPM": "3", "LOCALQ_RATE_LIMIT_TPM": "100000"}
        apis = [ServiceProcesses(env=env, log_dir=tmp_path / f"logs{i}") for i in (1, 2)]
        try:
            for api in apis:
                api.start_api()

            def send(api: ServiceProcesses, key: str) -> httpx.Response:
                with httpx.stream("POST", api.base_url + "/v1/chat/completions", json=STREAM, timeout=30,
                                  headers={"Authorization": f"Bearer {key}"}) as response:
                    if response.status_code != 200:
                        response.read()
                    return response  # a stream's headers; leaving closes it (the job is cancelled)

            first, second = apis
            passed = [send(first, a), send(second, a), send(first, a)]
            assert [r.status_code for r in passed] == [200, 200, 200]
            assert [r.headers["x-ratelimit-remaining-requests"] for r in passed] == ["2", "1", "0"]
            for api in apis:
                refused = send(api, a)
                assert refused.status_code == 429, refused.text
                assert refused.json()["error"]["code"] == "rate_limit_exceeded"
                assert refused.json()["error"]["type"] == "requests"
                assert 1 <= int(refused.headers["Retry-After"]) <= 20
                assert refused.headers["x-ratelimit-limit-requests"] == "3"
                assert refused.headers["x-ratelimit-remaining-requests"] == "0"
                assert 40 < seconds(refused.headers["x-ratelimit-reset-requests"]) <= 60
            other = send(second, b)
            assert other.status_code == 200 and other.headers["x-ratelimit-remaining-requests"] == "2"
        finally:
            for api in apis:
                api.stop()
            client.close()
