"""Bounds on what a request may hold, decided in the API before anything is queued (issue 10).

Each case here once passed validation and failed later: a 500-deep `json_schema` crashed the
worker pickling its job; lone surrogates, odd `logit_bias` keys and `max_tokens` <= 0 were
answered 500 (or 200 with nothing) by the worker; 100,000 embedding inputs were reported as
"input[0]: expected an integer". The app here has no reachable queue, so a request that passes
validation answers 503 `queue_unavailable`: every assertion below fails on such a pass.
"""

from __future__ import annotations

import json

import pytest

from api.app import create_app
from api.settings import Settings
from schemas.errors import Invalid
from schemas.json_bounds import MAX_DEPTH, check_bounds
from tasks.batch_input import check_lines

JSON = "application/json"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def api():
    # nothing listens on port 1: a request that passes validation answers 503 queue_unavailable
    return create_app(Settings.from_env({"LOCALQ_REDIS_URL": "redis://127.0.0.1:1/0"})).test_client()


def post(api, path: str, body: dict | str):
    data = body if isinstance(body, str) else json.dumps(body)
    response = api.post(path, data=data, content_type=JSON)
    return response.status_code, response.get_json()


def assert_invalid(answer, param: str, *words: str) -> dict:
    status, body = answer
    assert status == 400, (status, body)
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    for word in words:
        assert word in error["message"], error
    return error


def nested_schema(depth: int) -> dict:
    schema: dict = {}
    for _ in range(depth):
        schema = {"a": schema}
    return schema


# ----- depth ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [100, 300, 500, 900])
def test_deep_json_schema_is_refused_before_queueing(api, depth):
    body = {**CHAT, "response_format": {"type": "json_schema",
                                        "json_schema": {"name": "x", "schema": nested_schema(depth)}}}
    assert_invalid(post(api, "/v1/chat/completions", body), "response_format", "nested too deeply", str(MAX_DEPTH))


def test_deep_metadata_and_tool_parameters_are_refused(api):
    deep = nested_schema(200)
    assert_invalid(post(api, "/v1/chat/completions", {**CHAT, "metadata": {"k": deep}}), "metadata")
    tools = [{"type": "function", "function": {"name": "f", "parameters": deep}}]
    assert_invalid(post(api, "/v1/chat/completions", {**CHAT, "tools": tools}), "tools")


def test_depth_bound_is_exact():
    check_bounds({"v": nested_schema(MAX_DEPTH - 2)})  # the body object and 63 more: 64 levels
    with pytest.raises(Invalid) as raised:
        check_bounds({"v": nested_schema(MAX_DEPTH - 1)})
    assert raised.value.param == "v"
    check_bounds([[[]]] * 3, max_depth=3)
    with pytest.raises(Invalid):
        check_bounds([[[[]]]], max_depth=3)


def test_depth_walk_does_not_recurse():
    value: list = []
    for _ in range(100_000):  # far past Python's recursion limit
        value = [value]
    with pytest.raises(Invalid):
        check_bounds(value)


def test_moderate_nesting_still_passes(api):
    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "string"}}}}}
    body = {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}
    status, answer = post(api, "/v1/chat/completions", body)
    assert status == 503 and answer["error"]["code"] == "queue_unavailable"  # valid: it would be queued


# ----- lone surrogates --------------------------------------------------------------------------------

SURROGATE = '"a\\ud800b"'  # valid JSON, not valid text


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/chat/completions", '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": %s}]}',
         "messages[0].content"),
        ("/v1/chat/completions", '{"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", '
                                 '"content": [{"type": "text", "text": %s}]}]}', "messages[0].content[0].text"),
        ("/v1/completions", '{"model": "gpt-3.5-turbo-instruct", "prompt": %s}', "prompt"),
        ("/v1/completions", '{"model": "gpt-3.5-turbo-instruct", "prompt": ["ok", %s]}', "prompt[1]"),
        ("/v1/embeddings", '{"model": "text-embedding-3-small", "input": %s}', "input"),
        ("/v1/embeddings", '{"model": "text-embedding-3-small", "input": ["ok", %s]}', "input[1]"),
        ("/v1/tokenize", '{"model": "gpt-4o-mini", "input": %s}', "input"),
        ("/v1/chat/completions", '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], '
                                 '"metadata": {%s: "v"}}', "metadata.a\ud800b"),
    ],
)
def test_lone_surrogate_is_400_naming_the_parameter(api, path, body, param):
    error = assert_invalid(post(api, path, body % SURROGATE), param, "lone surrogate", "U+D800")
    assert error["code"] == "invalid_value"


def test_paired_surrogates_are_text(api):
    body = '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "sea \\ud83c\\udf0a"}]}'
    status, answer = post(api, "/v1/chat/completions", body)
    assert status == 503, answer  # a real emoji written as an escaped pair is fine


def test_lone_surrogate_in_a_form_field_is_400(api):
    from io import BytesIO

    # form text arrives as UTF-8 bytes, which hold no surrogates; JSON inside a form field is
    # decoded by localq, escapes and all, and is checked like a body
    form = {"file": (BytesIO(b"RIFF0000WAVE"), "a.wav"), "model": "whisper-1",
            "x-localai-extensions": '{"priority": "x\\ud800"}'}
    response = api.post("/v1/audio/transcriptions", data=form, content_type="multipart/form-data")
    assert response.status_code == 400 and "lone surrogate" in response.get_json()["error"]["message"]


# ----- logit_bias keys --------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["abc", "1e3", "5.0", " 5", "\u0663", "-1", "+5", "05", "", "99999999999"])
@pytest.mark.parametrize("path, model", [("/v1/chat/completions", "gpt-4o-mini"),
                                         ("/v1/completions", "gpt-3.5-turbo-instruct")])
def test_logit_bias_keys_must_be_token_ids(api, path, model, key):
    body = {"model": model, "logit_bias": {key: 5}}
    body.update({"messages": CHAT["messages"]} if "chat" in path else {"prompt": "hi"})
    error = assert_invalid(post(api, path, body), "logit_bias", "Invalid key in 'logit_bias'", repr(key))
    assert error["code"] == "invalid_value"


def test_logit_bias_token_id_keys_pass(api):
    status, answer = post(api, "/v1/chat/completions", {**CHAT, "logit_bias": {"0": -100, "42": 5, "1234567": 1}})
    assert status == 503, answer


# ----- max_tokens -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("value", [-1, 0])
def test_chat_token_limit_below_one_is_400(api, name, value):
    assert_invalid(post(api, "/v1/chat/completions", {**CHAT, name: value}), name, ">= 1")


def test_chat_token_limit_of_one_passes(api):
    assert post(api, "/v1/chat/completions", {**CHAT, "max_tokens": 1})[0] == 503


# ----- list lengths ----------------------------------------------------------------------------------


@pytest.mark.parametrize("item", ["x", 1, [1]])
def test_too_many_embedding_inputs_says_so(api, item):
    body = {"model": "text-embedding-3-small", "input": [item] * 100_000}
    error = assert_invalid(post(api, "/v1/embeddings", body), "input", "at most 2048 items", "100000")
    assert "expected an integer" not in error["message"]


# ----- batch lines -----------------------------------------------------------------------------------


def test_batch_lines_keep_the_same_bounds():
    def line(custom_id: str, body: str) -> str:
        return f'{{"custom_id": "{custom_id}", "method": "POST", "url": "/v1/chat/completions", "body": {body}}}'

    deep = json.dumps({**CHAT, "response_format": {"type": "json_schema",
                                                   "json_schema": {"name": "x", "schema": nested_schema(300)}}})
    lines = [
        line("ok", json.dumps(CHAT)),
        line("deep", deep),
        line("surrogate", '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "a\\udfffb"}]}'),
        line("bias", json.dumps({**CHAT, "logit_bias": {"1e3": 1}})),
    ]
    parsed = check_lines(lines, "/v1/chat/completions")
    assert [item.custom_id for item in parsed.lines] == ["ok"]
    params = {error["line"]: error["param"] for error in parsed.errors}
    assert params == {2: "body.response_format", 3: "body.messages[0].content", 4: "body.logit_bias"}
