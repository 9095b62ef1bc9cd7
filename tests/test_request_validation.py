"""Request validation through the real app: valid examples pass, invalid ones get OpenAI's 400s.

Valid bodies reach the handler, so a schema that is too strict fails here. Implemented operations
then look the model up: the examples name models that are not configured, so passing validation
shows as a 404 `model_not_found` (nothing is queued), the batch example's input file as a 404
`file_not_found`; the others answer 501. The invalid table
pins status, `type`, `param` and `code`.
"""

from __future__ import annotations

import io
import json

import pytest

CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "Hello"}]


def chat(**extra) -> dict:
    return {"model": "not-configured", "messages": MSG, **extra}


VALID = [
    ("chat-minimal", CHAT, chat()),
    ("chat-full", CHAT, chat(
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Rules"}]},
            {"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}},
            ]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "42"},
        ],
        temperature=0.2, top_p=0.9, max_tokens=16, max_completion_tokens=16, n=2, stop=["\n", "END"], seed=7,
        presence_penalty=0.5, frequency_penalty=-0.5, logit_bias={"50256": -100}, logprobs=True, top_logprobs=3,
        stream=True, stream_options={"include_usage": True}, user="u1",
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
        tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        tool_choice="auto",
    )),
    ("chat-null-optionals", CHAT, chat(temperature=None, stop=None, n=None, seed=None)),
    ("chat-stop-string", CHAT, chat(stop="END")),
    ("chat-open-enum-model", CHAT, chat(model="my-own-model")),
    ("chat-extensions", CHAT, chat(**{"x-localai-extensions": {"top_k": 40, "min_p": 0.05, "grammar": "root ::= \"a\"",
                                                             "priority": "batch", "timeout": 30}})),
    ("chat-top-level-extensions", CHAT, chat(top_k=40, repeat_penalty=1.1, mirostat=2, ignore_eos=True)),
    ("completions", "/v1/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "Say hi", "max_tokens": 5,
                                        "echo": False, "logprobs": 2, "suffix": None, "best_of": 1}),
    ("completions-token-prompt", "/v1/completions", {"model": "m", "prompt": [1, 2, 3]}),
    ("completions-batch-prompt", "/v1/completions", {"model": "m", "prompt": ["a", "b"], "tfs_z": 1.0}),
    ("embeddings", "/v1/embeddings", {"model": "not-configured", "input": "hello", "encoding_format": "base64"}),
    ("embeddings-list", "/v1/embeddings", {"model": "not-configured", "input": ["a", "b"], "dimensions": 8}),
    ("embeddings-tokens", "/v1/embeddings", {"model": "m", "input": [[1, 2], [3]]}),
    ("images", "/v1/images/generations", {"model": "not-configured", "prompt": "a cat", "n": 1, "size": "256x256", "response_format": "b64_json",
                                          "negative_prompt": "dog", "steps": 4, "guidance_scale": 7.5}),
    ("speech", "/v1/audio/speech", {"model": "not-configured", "input": "Hello there", "voice": "alloy",
                                    "response_format": "wav", "speed": 1.0, "length_scale": 1.2}),
    ("batches", "/v1/batches", {"input_file_id": "file-abc", "endpoint": "/v1/chat/completions",
                                "completion_window": "24h", "metadata": {"k": "v"}}),
    ("moderations", "/v1/moderations", {"input": "text"}),
    ("tokenize", "/v1/tokenize", {"model": "not-configured", "content": "hi"}),
    ("detokenize", "/v1/detokenize", {"model": "not-configured", "tokens": [1, 2]}),
]


def assert_passed_validation(response):
    error = response.get_json()["error"]
    passed = ((404, "model_not_found"), (404, "file_not_found"), (501, "not_implemented"))
    assert (response.status_code, error["code"]) in passed, error


@pytest.mark.parametrize("path,body", [pytest.param(p, b, id=i) for i, p, b in VALID])
def test_valid_examples_pass_validation(client, path, body):
    assert_passed_validation(client.post(path, json=body))


def test_valid_multipart_bodies_pass_validation(client):
    response = client.post("/v1/audio/transcriptions", content_type="multipart/form-data", data={
        "model": "not-configured", "file": (io.BytesIO(b"RIFF\0\0\0\0WAVEfmt "), "a.wav"), "language": "en",
        "temperature": "0.2",
        "response_format": "verbose_json", "timestamp_granularities[]": ["word", "segment"], "beam_size": "5",
    })
    assert_passed_validation(response)
    response = client.post("/v1/images/edits", content_type="multipart/form-data", data={
        "model": "not-configured", "image": (io.BytesIO(b"\x89PNG\r\n\x1a\n...."), "a.png"), "prompt": "add a hat",
        "n": "1", "size": "256x256",
        "x-localai-extensions": json.dumps({"strength": 0.6, "steps": 3}),
    })
    assert_passed_validation(response)


# (id, path, body, status, type, param, code). `body` may be bytes (sent raw as JSON).
INVALID = [
    ("missing-model", CHAT, {"messages": MSG}, 400, "invalid_request_error", "model", "missing_required_parameter"),
    ("missing-messages", CHAT, {"model": "m"}, 400, "invalid_request_error", "messages", "missing_required_parameter"),
    ("empty-body-object", CHAT, {}, 400, "invalid_request_error", "messages", "missing_required_parameter"),
    ("messages-empty", CHAT, chat(messages=[]), 400, "invalid_request_error", "messages", "invalid_value"),
    ("messages-not-array", CHAT, chat(messages="hi"), 400, "invalid_request_error", "messages", "invalid_type"),
    ("message-not-object", CHAT, chat(messages=["hi"]), 400, "invalid_request_error", "messages[0]", "invalid_type"),
    ("message-role-missing", CHAT, chat(messages=[{"content": "x"}]), 400, "invalid_request_error",
     "messages[0].role", "missing_required_parameter"),
    ("message-role-unknown", CHAT, chat(messages=[{"role": "robot", "content": "x"}]), 400,
     "invalid_request_error", "messages[0].role", "invalid_value"),
    ("message-content-int", CHAT, chat(messages=[{"role": "user", "content": 5}]), 400,
     "invalid_request_error", "messages[0].content", "invalid_type"),
    ("message-content-missing", CHAT, chat(messages=[{"role": "user"}]), 400, "invalid_request_error",
     "messages[0].content", "missing_required_parameter"),
    ("tool-message-without-id", CHAT, chat(messages=[{"role": "tool", "content": "x"}]), 400,
     "invalid_request_error", "messages[0].tool_call_id", "missing_required_parameter"),
    ("content-part-type-unknown", CHAT, chat(messages=[{"role": "user", "content": [{"type": "video", "x": 1}]}]),
     400, "invalid_request_error", "messages[0].content[0].type", "invalid_value"),
    ("content-part-text-missing", CHAT, chat(messages=[{"role": "user", "content": [{"type": "text"}]}]), 400,
     "invalid_request_error", "messages[0].content[0].text", "missing_required_parameter"),
    ("image-url-wrong-type", CHAT, chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": 3}}]}]), 400, "invalid_request_error",
     "messages[0].content[0].image_url.url", "invalid_type"),
    ("message-unknown-field", CHAT, chat(messages=[{"role": "user", "content": "x", "mood": "happy"}]), 400,
     "invalid_request_error", "messages[0].mood", "unknown_parameter"),
    ("model-int", CHAT, chat(model=42), 400, "invalid_request_error", "model", "invalid_type"),
    ("temperature-string", CHAT, chat(temperature="hot"), 400, "invalid_request_error", "temperature", "invalid_type"),
    ("temperature-too-high", CHAT, chat(temperature=2.5), 400, "invalid_request_error", "temperature", "invalid_value"),
    ("temperature-negative", CHAT, chat(temperature=-0.1), 400, "invalid_request_error", "temperature", "invalid_value"),
    ("top-p-too-high", CHAT, chat(top_p=1.5), 400, "invalid_request_error", "top_p", "invalid_value"),
    ("n-zero", CHAT, chat(n=0), 400, "invalid_request_error", "n", "invalid_value"),
    ("n-float", CHAT, chat(n=1.5), 400, "invalid_request_error", "n", "invalid_type"),
    ("n-bool", CHAT, chat(n=True), 400, "invalid_request_error", "n", "invalid_type"),
    ("max-tokens-string", CHAT, chat(max_tokens="10"), 400, "invalid_request_error", "max_tokens", "invalid_type"),
    ("presence-penalty-range", CHAT, chat(presence_penalty=3), 400, "invalid_request_error", "presence_penalty",
     "invalid_value"),
    ("top-logprobs-range", CHAT, chat(top_logprobs=21), 400, "invalid_request_error", "top_logprobs", "invalid_value"),
    ("stream-string", CHAT, chat(stream="yes"), 400, "invalid_request_error", "stream", "invalid_type"),
    ("stop-too-many", CHAT, chat(stop=["a", "b", "c", "d", "e"]), 400, "invalid_request_error", "stop",
     "invalid_value"),
    ("stop-int", CHAT, chat(stop=5), 400, "invalid_request_error", "stop", "invalid_type"),
    ("logit-bias-value", CHAT, chat(logit_bias={"12": "high"}), 400, "invalid_request_error", "logit_bias.12",
     "invalid_type"),
    ("response-format-unknown", CHAT, chat(response_format={"type": "xml"}), 400, "invalid_request_error",
     "response_format.type", "invalid_value"),
    ("response-format-schema-missing", CHAT, chat(response_format={"type": "json_schema"}), 400,
     "invalid_request_error", "response_format.json_schema", "missing_required_parameter"),
    ("stream-options-type", CHAT, chat(stream_options={"include_usage": "yes"}), 400, "invalid_request_error",
     "stream_options.include_usage", "invalid_type"),
    ("tools-not-array", CHAT, chat(tools={"type": "function"}), 400, "invalid_request_error", "tools",
     "invalid_type"),
    ("unknown-top-level", CHAT, chat(temprature=0.5), 400, "invalid_request_error", "temprature",
     "unknown_parameter"),
    ("extension-both-places", CHAT, chat(top_k=5, **{"x-localai-extensions": {"top_k": 6}}), 400,
     "invalid_request_error", "top_k", "duplicate_parameter"),
    ("extension-top-level-out-of-range", CHAT, chat(top_k=-1), 400, "invalid_request_error", "top_k",
     "invalid_value"),
    ("extension-nested-bad-type", CHAT, chat(**{"x-localai-extensions": {"min_p": "low"}}), 400,
     "invalid_request_error", "x-localai-extensions.min_p", "invalid_type"),
    ("extension-unknown-knob", CHAT, chat(**{"x-localai-extensions": {"warp_speed": 9}}), 400,
     "invalid_request_error", "x-localai-extensions.warp_speed", "unknown_parameter"),
    ("extension-priority-enum", CHAT, chat(priority="urgent"), 400, "invalid_request_error", "priority",
     "invalid_value"),
    ("extension-timeout-zero", CHAT, chat(timeout=0), 400, "invalid_request_error", "timeout", "invalid_value"),
    ("body-is-array", CHAT, [1, 2], 400, "invalid_request_error", None, "invalid_type"),
    ("malformed-json", CHAT, b'{"model": "m", ', 400, "invalid_request_error", None, "invalid_json"),
    ("nan-literal", CHAT, b'{"model": "m", "messages": [], "temperature": NaN}', 400, "invalid_request_error",
     None, "invalid_json"),
    ("not-utf8", CHAT, b"\xff\xfe\x00", 400, "invalid_request_error", None, "invalid_json"),
    ("completions-prompt-dict", "/v1/completions", {"model": "m", "prompt": {"a": 1}}, 400,
     "invalid_request_error", "prompt", "invalid_type"),
    ("completions-logprobs-range", "/v1/completions", {"model": "m", "prompt": "x", "logprobs": 9}, 400,
     "invalid_request_error", "logprobs", "invalid_value"),
    ("embeddings-missing-input", "/v1/embeddings", {"model": "m"}, 400, "invalid_request_error", "input",
     "missing_required_parameter"),
    ("embeddings-encoding-format", "/v1/embeddings", {"model": "m", "input": "x", "encoding_format": "hex"}, 400,
     "invalid_request_error", "encoding_format", "invalid_value"),
    ("embeddings-input-object", "/v1/embeddings", {"model": "m", "input": {"text": "x"}}, 400,
     "invalid_request_error", "input", "invalid_type"),
    ("images-missing-prompt", "/v1/images/generations", {"n": 1}, 400, "invalid_request_error", "prompt",
     "missing_required_parameter"),
    ("images-n-range", "/v1/images/generations", {"prompt": "x", "n": 11}, 400, "invalid_request_error", "n",
     "invalid_value"),
    ("images-steps-range", "/v1/images/generations", {"prompt": "x", "steps": 0}, 400, "invalid_request_error",
     "steps", "invalid_value"),
    ("images-text-extension-rejected", "/v1/images/generations", {"prompt": "x", "x-localai-extensions": {
        "top_k": 3}}, 400, "invalid_request_error", "x-localai-extensions.top_k", "unknown_parameter"),
    ("speech-missing-voice", "/v1/audio/speech", {"model": "tts-1", "input": "hi"}, 400, "invalid_request_error",
     "voice", "missing_required_parameter"),
    ("speech-speed-range", "/v1/audio/speech", {"model": "tts-1", "input": "hi", "voice": "alloy", "speed": 9},
     400, "invalid_request_error", "speed", "invalid_value"),
    ("speech-format", "/v1/audio/speech", {"model": "tts-1", "input": "hi", "voice": "alloy",
                                           "response_format": "ogg"}, 400, "invalid_request_error",
     "response_format", "invalid_value"),
    ("batch-endpoint", "/v1/batches", {"input_file_id": "f", "endpoint": "/v1/nope", "completion_window": "24h"},
     400, "invalid_request_error", "endpoint", "invalid_value"),
    ("batch-window", "/v1/batches", {"input_file_id": "f", "endpoint": "/v1/chat/completions",
                                     "completion_window": "1h"}, 400, "invalid_request_error",
     "completion_window", "invalid_value"),
    ("tokenize-unknown-field", "/v1/tokenize", {"model": "m", "content": "x", "extra": 1}, 400,
     "invalid_request_error", "extra", "unknown_parameter"),
    ("detokenize-negative-token", "/v1/detokenize", {"model": "m", "tokens": [-1]}, 400, "invalid_request_error",
     "tokens[0]", "invalid_value"),
]


def assert_openai_error(response, status, type_, param, code):
    body = response.get_json()
    assert response.status_code == status, body
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert body["error"]["type"] == type_
    assert body["error"]["param"] == param, body["error"]["message"]
    assert body["error"]["code"] == code
    return body["error"]


@pytest.mark.parametrize("path,body,status,type_,param,code", [pytest.param(*row[1:], id=row[0]) for row in INVALID])
def test_invalid_bodies(client, path, body, status, type_, param, code):
    if isinstance(body, bytes):
        response = client.post(path, data=body, content_type="application/json")
    else:
        response = client.post(path, json=body)
    error = assert_openai_error(response, status, type_, param, code)
    if param:
        assert f"'{param}'" in error["message"]


def test_the_table_is_large_enough():
    assert len(INVALID) >= 40


def test_wrong_content_type_is_415(client):
    response = client.post(CHAT, data="model=m", content_type="text/plain")
    assert_openai_error(response, 415, "invalid_request_error", None, "unsupported_media_type")


def test_multipart_errors_name_the_form_field(client):
    response = client.post("/v1/audio/transcriptions", content_type="multipart/form-data",
                           data={"model": "whisper-1", "temperature": "0.1"})
    assert_openai_error(response, 400, "invalid_request_error", "file", "missing_required_parameter")
    response = client.post("/v1/audio/transcriptions", content_type="multipart/form-data",
                           data={"model": "whisper-1", "file": (io.BytesIO(b"x"), "a.wav"), "temperature": "warm"})
    assert_openai_error(response, 400, "invalid_request_error", "temperature", "invalid_type")
    response = client.post("/v1/audio/transcriptions", content_type="multipart/form-data",
                           data={"model": "whisper-1", "file": (io.BytesIO(b"x"), "a.wav"), "colour": "red"})
    assert_openai_error(response, 400, "invalid_request_error", "colour", "unknown_parameter")


def test_query_parameters_are_validated(client):
    response = client.get("/v1/files?limit=abc")
    assert_openai_error(response, 400, "invalid_request_error", "limit", "invalid_type")
    response = client.get("/v1/files?order=sideways")
    assert_openai_error(response, 400, "invalid_request_error", "order", "invalid_value")


def test_oversized_body_is_413(tmp_path):
    from api.app import create_app
    from api.settings import Settings

    app = create_app(Settings(max_request_bytes=1024))
    response = app.test_client().post(CHAT, json=chat(user="x" * 4096))
    assert_openai_error(response, 413, "invalid_request_error", None, "request_too_large")


def test_unknown_fields_can_be_ignored_and_logged(caplog):
    from api.app import create_app
    from api.settings import Settings

    client = create_app(Settings(unknown_fields="ignore")).test_client()
    with caplog.at_level("WARNING"):
        response = client.post(CHAT, json=chat(temprature=0.5, messages=[{"role": "user", "content": "x", "m": 1}]))
    assert_passed_validation(response)
    assert "temprature" in caplog.text and "messages[0].m" in caplog.text
    # other errors still count
    response = client.post(CHAT, json=chat(temprature=0.5, temperature=9))
    assert_openai_error(response, 400, "invalid_request_error", "temperature", "invalid_value")


def test_unknown_route_and_method(client):
    assert_openai_error(client.get("/v1/does-not-exist"), 404, "invalid_request_error", None, "unknown_url")
    response = client.delete(CHAT)
    assert_openai_error(response, 405, "invalid_request_error", None, "method_not_allowed")
    assert "POST" in response.headers["Allow"]


def test_unimplemented_operation_is_501_naming_it(client):
    response = client.post("/v1/moderations", json={"input": "x"})
    error = assert_openai_error(response, 501, "not_implemented_error", None, "not_implemented")
    assert "createModeration" in error["message"]
