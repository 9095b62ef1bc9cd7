"""Every kind of response localq sends validates against its schema in OpenAI's spec.

A real service (the session's shared one: embedded Redis, one CPU worker, the API under gunicorn,
the tiny default models) answers one or two requests per implemented operation; each JSON body,
stream chunk and stream event is validated with `tests.contract` against the component schema the
spec gives it (the upstream spec plus localq's overlay, so localq's own jobs, workers and tokenize
are included), and against the same schema in the document the service serves (`GET /openapi.json`),
where it has one: that document is stricter (no undocumented properties) and is what clients
generate from.

Documented exceptions, where the spec contradicts what OpenAI's API really sends:

* `encoding_format: base64` embeddings: `embedding` is a base64 string of little-endian float32s,
  which the spec types as an array of numbers. The test checks the string decodes to the
  vector and validates the rest of the object.
* Completion stream chunks: `finish_reason` is null until a choice's last chunk and, with
  `stream_options.include_usage`, `usage` is null until the usage chunk, as OpenAI sends them;
  the spec reuses CreateCompletionResponse for chunks, which has no null for either.
* `GET /v1/files/{id}/content` and speech without `stream_format: sse` are raw bytes: no schema.
"""

from __future__ import annotations

import base64
import io
import json
import struct

import time

import httpx
import pytest
import redis
from PIL import Image

from api.routes import collect_handlers
from store.api_keys import OWNER, KeyStore
from tests import sse
from tests.contract import Contract, upstream
from tests.service import wait_until

CHAT_MODEL = "gpt-4o-mini"
CHAT = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}
COMPLETION = {"model": CHAT_MODEL, "prompt": "Once upon a time", "max_tokens": 4}
EMBEDDING = {"model": "text-embedding-3-small", "input": ["a", "b"]}
IMAGE = {"model": "dall-e-2", "prompt": "a red square", "size": "64x64", "x-localai-extensions": {"steps": 2}}
TERMINAL_BATCH = ("completed", "failed", "expired", "cancelled")

# Operation -> the schemas its answers are checked against here (a guard that none is forgotten).
CHECKED = {
    "createChatCompletion": ["CreateChatCompletionResponse", "CreateChatCompletionStreamResponse"],
    "createCompletion": ["CreateCompletionResponse"],
    "createEmbedding": ["CreateEmbeddingResponse"],
    "createImage": ["ImagesResponse", "ImageGenStreamEvent"],
    "createImageEdit": ["ImagesResponse", "ImageEditStreamEvent"],
    "createSpeech": ["CreateSpeechResponseStreamEvent"],  # the audio body itself is bytes
    "createTranscription": ["CreateTranscriptionResponseJson", "CreateTranscriptionResponseVerboseJson",
                            "CreateTranscriptionResponseStreamEvent"],
    "createTranslation": ["CreateTranslationResponseJson", "CreateTranslationResponseVerboseJson"],
    "listModels": ["ListModelsResponse"],
    "retrieveModel": ["Model"],
    "createFile": ["OpenAIFile"],
    "listFiles": ["ListFilesResponse"],
    "retrieveFile": ["OpenAIFile"],
    "deleteFile": ["DeleteFileResponse"],
    "downloadFile": [],  # the file's bytes
    "createBatch": ["Batch"],
    "retrieveBatch": ["Batch"],
    "listBatches": ["ListBatchesResponse"],
    "cancelBatch": ["Batch"],
    "tokenize": ["LocalqTokenizeResponse"],
    "detokenize": ["LocalqDetokenizeResponse"],
    "getJob": ["LocalqJob"],
    "listJobs": ["LocalqJobList"],
    "cancelJob": ["LocalqJob"],
    "streamJobEvents": ["LocalqJobEvent"],
    "listWorkers": ["LocalqWorkerList"],
    "listQueues": ["LocalqQueueList"],
    # the Responses API: tests/test_responses_api.py checks every Response and every event it streams;
    # here one of each answer
    "createResponse": ["Response", "ResponseStreamEvent"],
    "getResponse": ["Response"],
    "deleteResponse": [],  # {"id", "object", "deleted"}: the spec documents no body
    "cancelResponse": ["Response"],
    "listInputItems": ["ResponseItemList"],
    "Getinputtokencounts": ["TokenCountsResource"],
    # admin operations (owner keys): projects, their keys, model permissions, rate limits, usage
    "list-projects": ["ProjectListResponse"],
    "create-project": ["Project"],
    "retrieve-project": ["Project"],
    "modify-project": ["Project"],
    "archive-project": ["Project"],
    "list-project-api-keys": ["ProjectApiKeyListResponse"],
    "retrieve-project-api-key": ["ProjectApiKey"],
    "delete-project-api-key": ["ProjectApiKeyDeleteResponse"],
    "retrieve-project-model-permissions": ["ProjectModelPermissions"],
    "update-project-model-permissions": ["ProjectModelPermissions"],
    "delete-project-model-permissions": ["ProjectModelPermissionsDeleteResponse"],
    "list-project-rate-limits": ["ProjectRateLimitListResponse"],
    "update-project-rate-limits": ["ProjectRateLimit"],
    **{f"usage-{kind}": ["UsageResponse"] for kind in ("completions", "embeddings", "images", "audio-speeches",
                                                       "audio-transcriptions", "moderations")},
}


# Schemas the spec documents for an answer that localq never sends.
NOT_SENT = {"CreateTranscriptionResponseDiarizedJson"}  # diarized_json is refused: no diarization


def _documented_schemas(operation_id: str) -> set[str]:
    """The component schemas the upstream spec names for an operation's 200 answer."""
    found: set[str] = set()

    def walk(node):
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/components/schemas/"):
                found.add(ref.rsplit("/", 1)[-1])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for item in upstream().document["paths"].values():
        for operation in item.values():
            if isinstance(operation, dict) and operation.get("operationId") == operation_id:
                walk(operation["responses"].get("200", {}).get("content", {}))
    return found


def test_every_implemented_operation_is_checked():
    assert sorted(collect_handlers()) == sorted(CHECKED)
    missing = {op: sorted(_documented_schemas(op) - set(schemas) - NOT_SENT) for op, schemas in CHECKED.items()}
    assert not any(missing.values()), f"answers documented but not checked here: {missing}"


@pytest.fixture(scope="module")
def service(stack):
    """The session's shared service (conftest's `stack`, which prepares the image models)."""
    return stack


@pytest.fixture(scope="module")
def api(service):
    with httpx.Client(base_url=service.base_url + "/v1", timeout=180) as client:
        yield client


@pytest.fixture(scope="module")
def conforms(service):
    """Check a body against its schema in the upstream spec, and in the document the service serves."""
    served = Contract(httpx.get(service.base_url + "/openapi.json", timeout=30).json(), "the served document")

    def check(schema_name: str, instance, what: str = "") -> None:
        upstream().assert_conforms(schema_name, instance, what)
        if served.has(schema_name):
            served.assert_conforms(schema_name, instance, what)

    return check


def ok_json(response: httpx.Response) -> dict:
    assert response.status_code == 200, f"{response.request.method} {response.request.url} -> " \
                                        f"{response.status_code}: {response.text[:800]}"
    assert response.headers["content-type"].startswith("application/json"), response.headers["content-type"]
    return response.json()


def sse_events(api: httpx.Client, method: str, url: str, **kwargs) -> list[tuple[str | None, str]]:
    """(event name, data text) of each event of a stream, keep-alive comments left out."""
    with api.stream(method, url, **kwargs) as response:
        assert response.status_code == 200, f"{method} {url} -> {response.status_code}: {response.read()[:800]!r}"
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [(event.event, event.data) for event in sse.events(response.iter_lines())]
    return events


def chunks(events: list[tuple[str | None, str]]) -> list[dict]:
    """The JSON chunks of an OpenAI-style stream that ends with `data: [DONE]`."""
    assert events and events[-1][1] == "[DONE]", f"the stream does not end with [DONE]: {events[-3:]}"
    found = [json.loads(data) for _, data in events[:-1]]
    failed = [chunk["error"] for chunk in found if "error" in chunk]
    assert not failed, f"the job failed mid-stream: {failed}"
    return found


# ----- chat and completions -----------------------------------------------------------------------


def test_chat_completion(api, conforms):
    body = ok_json(api.post("/chat/completions", json=CHAT))
    conforms("CreateChatCompletionResponse", body, "a chat completion")


def test_chat_completion_chunks(api, conforms):
    events = sse_events(api, "POST", "/chat/completions",
                        json={**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    streamed = chunks(events)
    assert len(streamed) >= 2
    for chunk in streamed:
        conforms("CreateChatCompletionStreamResponse", chunk, "a chat completion chunk")


def test_completion_and_chunks(api, conforms):
    body = ok_json(api.post("/completions", json=COMPLETION))
    conforms("CreateCompletionResponse", body, "a completion")
    # OpenAI streams legacy completions as CreateCompletionResponse objects, one per piece.
    streamed = chunks(sse_events(api, "POST", "/completions",
                                 json={**COMPLETION, "stream": True, "stream_options": {"include_usage": True}}))
    assert streamed[-1]["usage"]["total_tokens"] > 0
    for chunk in streamed:
        conforms("CreateCompletionResponse", nulls_as_openai_streams_them(chunk), "a completion chunk")


def nulls_as_openai_streams_them(chunk: dict) -> dict:
    """The documented exception for completion chunks: OpenAI sends `finish_reason: null` until a
    choice's last chunk and, with include_usage, `usage: null` until the usage chunk; the schema has
    no null for either. A copy without those nulls (a stand-in reason), so the rest is still checked."""
    copy = json.loads(json.dumps(chunk))
    if "usage" in copy and copy["usage"] is None:
        del copy["usage"]
    for choice in copy.get("choices", []):
        if "finish_reason" in choice and choice["finish_reason"] is None:
            choice["finish_reason"] = "length"
    return copy


# ----- embeddings -------------------------------------------------------------------------------


def test_float_embeddings(api, conforms):
    body = ok_json(api.post("/embeddings", json=EMBEDDING))
    conforms("CreateEmbeddingResponse", body, "float embeddings")


def test_base64_embeddings_are_the_documented_exception(api, conforms):
    body = ok_json(api.post("/embeddings", json={**EMBEDDING, "encoding_format": "base64"}))
    for item in body["data"]:
        raw = base64.b64decode(item["embedding"], validate=True)
        assert raw and len(raw) % 4 == 0
        item["embedding"] = list(struct.unpack(f"<{len(raw) // 4}f", raw))
    conforms("CreateEmbeddingResponse", body, "base64 embeddings, decoded")


# ----- images -----------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["dall-e-2", "gpt-image-1"])
@pytest.mark.parametrize("response_format", ["b64_json", "url"])
def test_image_generation(api, model, response_format, conforms):
    body = ok_json(api.post("/images/generations", json={**IMAGE, "model": model, "response_format": response_format}))
    conforms("ImagesResponse", body, f"{model} images ({response_format})")
    assert len(body["data"]) == 1 and response_format in body["data"][0]


def test_image_generation_1024_as_gpt_image(api, conforms):
    """A size the spec lists, from a gpt-image model: the response says size and format."""
    body = ok_json(api.post("/images/generations", json={**IMAGE, "model": "gpt-image-1", "size": "1024x1024",
                                                         "x-localai-extensions": {"steps": 1}}))
    conforms("ImagesResponse", body, "a 1024x1024 gpt-image-1 image")
    assert body["size"] == "1024x1024" and body["output_format"] == "png"


def test_image_generation_events(api, conforms):
    events = sse_events(api, "POST", "/images/generations",
                        json={**IMAGE, "model": "gpt-image-1", "stream": True, "partial_images": 1})
    assert [name for name, _ in events] == ["image_generation.partial_image", "image_generation.completed"]
    for _, data in events:
        conforms("ImageGenStreamEvent", json.loads(data), "an image generation event")


def _png(size=(64, 64), mode="RGB", color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_image_edit_and_events(api, conforms):
    form = {"prompt": "add a hat", "size": "64x64", "response_format": "b64_json",
            "x-localai-extensions": '{"steps": 2}'}
    body = ok_json(api.post("/images/edits", data=form, files={"image": ("in.png", _png(), "image/png")}))
    conforms("ImagesResponse", body, "an image edit")
    events = sse_events(api, "POST", "/images/edits", files={"image": ("in.png", _png(), "image/png")},
                        data={**form, "model": "gpt-image-1", "stream": "true", "partial_images": "1"})
    assert [name for name, _ in events] == ["image_edit.partial_image", "image_edit.completed"]
    for _, data in events:
        conforms("ImageEditStreamEvent", json.loads(data), "an image edit event")


def test_truncated_png_edit_names_the_image_param(api, conforms):
    """A PNG cut short is a 400 about `image`, with no Python object names in the message."""
    response = api.post("/images/edits", data={"prompt": "x", "size": "64x64"},
                        files={"image": ("in.png", _png()[:40], "image/png")})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "image" and "object at 0x" not in error["message"] and "_io." not in error["message"]
    conforms("ErrorResponse", response.json(), "an error")


# ----- audio ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spoken_wav(api):
    response = api.post("/audio/speech", json={"model": "tts-1", "voice": "alloy", "input": "Hello there, friend.",
                                               "response_format": "wav"})
    assert response.status_code == 200 and response.content[:4] == b"RIFF"
    return response.content


def test_speech_events(api, conforms):
    events = sse_events(api, "POST", "/audio/speech", json={"model": "tts-1", "voice": "alloy", "input": "Hi.",
                                                             "stream_format": "sse"})
    assert [name for name, _ in events][-1] == "speech.audio.done"
    for _, data in events:
        conforms("CreateSpeechResponseStreamEvent", json.loads(data), "a speech event")


@pytest.mark.parametrize("kind", ["transcriptions", "translations"])
@pytest.mark.parametrize("response_format", ["json", "verbose_json"])
def test_transcript_objects(api, spoken_wav, kind, response_format, conforms):
    form = {"model": "whisper-1", "response_format": response_format}
    if kind == "transcriptions" and response_format == "verbose_json":
        form["timestamp_granularities[]"] = ["word", "segment"]
    body = ok_json(api.post(f"/audio/{kind}", data=form, files={"file": ("a.wav", spoken_wav, "audio/wav")}))
    noun = "Transcription" if kind == "transcriptions" else "Translation"
    schema = f"Create{noun}Response" + ("VerboseJson" if response_format == "verbose_json" else "Json")
    conforms(schema, body, f"a {response_format} {kind[:-1]}")


def test_transcription_events(api, spoken_wav, conforms):
    events = sse_events(api, "POST", "/audio/transcriptions", data={"model": "whisper-1", "stream": "true"},
                        files={"file": ("a.wav", spoken_wav, "audio/wav")})
    assert events and events[-1][0] == "transcript.text.done"
    for _, data in events:
        conforms("CreateTranscriptionResponseStreamEvent", json.loads(data), "a transcription event")


# ----- models, tokenizer, jobs and workers --------------------------------------------------------


def test_models(api, conforms):
    listed = ok_json(api.get("/models"))
    conforms("ListModelsResponse", listed, "the model list")
    conforms("Model", ok_json(api.get(f"/models/{CHAT_MODEL}")), "a model")


def test_tokenize_and_detokenize(api, conforms):
    tokens = ok_json(api.post("/tokenize", json={"model": CHAT_MODEL, "content": "Hello world"}))
    conforms("LocalqTokenizeResponse", tokens, "tokenize")
    text = ok_json(api.post("/detokenize", json={"model": CHAT_MODEL, "tokens": tokens["tokens"]}))
    conforms("LocalqDetokenizeResponse", text, "detokenize")


def test_job_and_its_events(api, conforms):
    """A streamed image job's log has every kind of event a job that succeeds writes."""
    with api.stream("POST", "/images/generations", json={**IMAGE, "stream": True, "partial_images": 1}) as response:
        job_id = response.headers["x-localq-job-id"]
        response.read()
    conforms("LocalqJob", ok_json(api.get(f"/jobs/{job_id}")), "a finished job")
    events = sse_events(api, "GET", f"/jobs/{job_id}/events")
    assert {"progress", "delta", "result"} <= {name for name, _ in events} and events[-1][0] == "result"
    for name, data in events:
        conforms("LocalqJobEvent", {"type": name, "data": json.loads(data)}, f"a {name} job event")


def test_workers(api, conforms):
    listed = wait_until(lambda: (body := ok_json(api.get("/workers")))["data"] and body, 60, "a worker heartbeat")
    conforms("LocalqWorkerList", listed, "the worker list")


def test_job_list_cancel_and_queues(api, conforms):
    """A job page (items without results; an empty page), a job cancelled mid-stream and one that had
    finished, and the queue list."""
    done = api.post("/embeddings", json=EMBEDDING)
    assert done.status_code == 200, done.text
    page = ok_json(api.get("/jobs", params={"limit": 3}))
    conforms("LocalqJobList", page, "a job page")
    assert page["data"] and all("result" not in item for item in page["data"])
    conforms("LocalqJobList", ok_json(api.get("/jobs", params={"status": "expired", "type": "no.such.type"})),
             "an empty job page")
    conforms("LocalqJob", ok_json(api.post(f"/jobs/{done.headers['x-localq-job-id']}/cancel")), "a finished job")
    with api.stream("POST", "/chat/completions", json={**CHAT, "max_tokens": 1500, "stream": True,
                                                       "x-localai-extensions": {"ignore_eos": True}}) as stream:
        job_id = stream.headers["x-localq-job-id"]
        lines = stream.iter_lines()
        for line in lines:
            if line.startswith("data: {"):
                break
        cancelled = ok_json(api.post(f"/jobs/{job_id}/cancel"))
        conforms("LocalqJob", cancelled, "a cancelled job")
        assert cancelled["status"] == "cancelled", cancelled
        assert "data: [DONE]" in list(lines)
    conforms("LocalqQueueList", ok_json(api.get("/queues")), "the queue list")


# ----- files and batches ------------------------------------------------------------------------


def test_files(api, conforms):
    empty = ok_json(api.get("/files", params={"purpose": "vision"}))
    conforms("ListFilesResponse", empty, "an empty file list")
    created = ok_json(api.post("/files", data={"purpose": "user_data"}, files={"file": ("notes.txt", b"hello")}))
    conforms("OpenAIFile", created, "a new file")
    expiring = ok_json(api.post("/files", data={"purpose": "user_data", "expires_after[anchor]": "created_at",
                                                "expires_after[seconds]": "3600"},
                                files={"file": ("notes.txt", b"hello")}))
    conforms("OpenAIFile", expiring, "a file that expires")
    assert isinstance(expiring["expires_at"], int)
    conforms("OpenAIFile", ok_json(api.get(f"/files/{created['id']}")), "a retrieved file")
    conforms("ListFilesResponse", ok_json(api.get("/files")), "the file list")
    download = api.get(f"/files/{created['id']}/content")
    assert download.status_code == 200 and download.content == b"hello"
    conforms("DeleteFileResponse", ok_json(api.delete(f"/files/{created['id']}")), "a deleted file")


def _batch_input(api: httpx.Client, lines: int, text: str = "") -> str:
    text = text or "\n".join(json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/embeddings",
                                         "body": EMBEDDING}) for i in range(lines))
    created = ok_json(api.post("/files", data={"purpose": "batch"}, files={"file": ("in.jsonl", text.encode())}))
    return created["id"]


def test_batches(api, conforms):
    request = {"input_file_id": _batch_input(api, 2), "endpoint": "/v1/embeddings", "completion_window": "24h"}
    batch = ok_json(api.post("/batches", json=request))
    conforms("Batch", batch, "a new batch")
    done = wait_until(lambda: (b := ok_json(api.get(f"/batches/{batch['id']}")))["status"] in TERMINAL_BATCH and b,
                      120, "the batch to finish")
    assert done["status"] == "completed", done
    conforms("Batch", done, "a completed batch")
    conforms("OpenAIFile", ok_json(api.get(f"/files/{done['output_file_id']}")), "a batch output file")

    # chat lines that take seconds each, so the cancel surely lands before the batch could finish
    slow = "\n".join(json.dumps({"custom_id": f"chat-{i}", "method": "POST", "url": "/v1/chat/completions",
                                 "body": {"model": "gpt-4o-mini", "max_tokens": 200,
                                          "messages": [{"role": "user", "content": "Tell a long story."}]}})
                     for i in range(20))
    other = ok_json(api.post("/batches", json={"input_file_id": _batch_input(api, 0, slow),
                                               "endpoint": "/v1/chat/completions", "completion_window": "24h"}))
    cancelled = ok_json(api.post(f"/batches/{other['id']}/cancel"))
    conforms("Batch", cancelled, "a cancelled batch")
    conforms("ListBatchesResponse", ok_json(api.get("/batches", params={"limit": 1})), "a batch page")
    ended = wait_until(lambda: (b := ok_json(api.get(f"/batches/{other['id']}")))["status"] in TERMINAL_BATCH and b,
                       60, "the cancelled batch to end")
    conforms("Batch", ended, f"a {ended['status']} batch")
    after_last = ok_json(api.get("/batches", params={"after": ended["id"], "limit": 100}))
    conforms("ListBatchesResponse", after_last, "a batch page")
    invalid = ok_json(api.post("/batches", json={**request, "input_file_id": _batch_input(api, 0, "not json")}))
    failed = wait_until(lambda: (b := ok_json(api.get(f"/batches/{invalid['id']}")))["status"] in TERMINAL_BATCH
                        and b, 60, "the invalid batch to fail")
    assert failed["status"] == "failed" and failed["errors"]["data"], failed
    conforms("Batch", failed, "a batch that failed validation")
    outputs = ok_json(api.get("/files", params={"purpose": "batch_output"}))
    conforms("ListFilesResponse", outputs, "the batch output files")



# ----- admin operations ----------------------------------------------------------------------------


def test_admin_operations(service, api, conforms):
    """Projects, their keys, model permissions, rate limits and usage, with an owner key (the
    service asks for keys while one exists; it is open again at the end)."""
    client = redis.Redis.from_url(service.redis.url, decode_responses=True)
    keys = KeyStore(client)
    secret, owner = keys.create("conformance-admins", role=OWNER, name="admin")
    _, member = keys.create("conformance-team", name="ci")
    wait_until(lambda: api.get("/models").status_code == 401, 10, "keys to be asked for")
    headers = {"Authorization": f"Bearer {secret}"}
    try:
        created = ok_json(api.post("/organization/projects", json={"name": "conformance-new"}, headers=headers))
        conforms("Project", created, "a created project")
        conforms("ProjectListResponse", ok_json(api.get("/organization/projects", headers=headers)))
        conforms("Project", ok_json(api.get(f"/organization/projects/{created['id']}", headers=headers)))
        conforms("Project", ok_json(api.post(f"/organization/projects/{created['id']}", json={"name": "renamed"},
                                             headers=headers)))
        conforms("Project", ok_json(api.post(f"/organization/projects/{created['id']}/archive", headers=headers)))
        team = member.project_id
        conforms("ProjectApiKeyListResponse", ok_json(api.get(f"/organization/projects/{team}/api_keys",
                                                              headers=headers)))
        conforms("ProjectApiKey", ok_json(api.get(f"/organization/projects/{team}/api_keys/{member.id}",
                                                  headers=headers)))
        permissions = f"/organization/projects/{team}/model_permissions"
        conforms("ProjectModelPermissions", ok_json(api.get(permissions, headers=headers)))
        conforms("ProjectModelPermissions", ok_json(api.post(permissions, headers=headers, json={
            "mode": "deny_list", "model_ids": ["dall-e-2"]})))
        conforms("ProjectModelPermissionsDeleteResponse", ok_json(api.delete(permissions, headers=headers)))
        limits = ok_json(api.get(f"/organization/projects/{team}/rate_limits", headers=headers))
        conforms("ProjectRateLimitListResponse", limits)
        conforms("ProjectRateLimit", ok_json(api.post(f"/organization/projects/{team}/rate_limits/{limits['data'][0]['id']}",
                                                      json={"max_requests_per_1_minute": 1000}, headers=headers)))
        for kind in ("completions", "embeddings", "images", "audio_speeches", "audio_transcriptions", "moderations"):
            conforms("UsageResponse", ok_json(api.get(f"/organization/usage/{kind}", headers=headers,
                                                      params={"start_time": int(time.time()) - 3600})), kind)
        ok_json(api.post(f"/organization/projects/{team}/rate_limits/{limits['data'][0]['id']}",
                         json={"max_requests_per_1_minute": None}, headers=headers))  # as it was
        conforms("ProjectApiKeyDeleteResponse", ok_json(api.delete(
            f"/organization/projects/{team}/api_keys/{member.id}", headers=headers)))
    finally:
        keys.revoke(owner.id)
        keys.revoke(member.id)
        wait_until(lambda: api.get("/models").status_code == 200, 10, "the service to be open again")
        client.close()


# ----- the Responses API ---------------------------------------------------------------------------


def test_responses(api, conforms):
    made = ok_json(api.post("/responses", json={"model": CHAT_MODEL, "input": "Hi", "max_output_tokens": 16}))
    conforms("Response", made, "a response")
    conforms("Response", ok_json(api.get(f"/responses/{made['id']}")), "a stored response")
    conforms("ResponseItemList", ok_json(api.get(f"/responses/{made['id']}/input_items")), "its input items")
    events = sse_events(api, "POST", "/responses", json={"model": CHAT_MODEL, "input": "Hi", "max_output_tokens": 16,
                                                          "stream": True})
    for name, data in events:
        event = json.loads(data)
        assert event["type"] == name
        conforms("ResponseStreamEvent", event, name)
    background = ok_json(api.post("/responses", json={"model": CHAT_MODEL, "input": "Hi", "max_output_tokens": 16,
                                                      "background": True}))
    conforms("Response", ok_json(api.post(f"/responses/{background['id']}/cancel")), "a cancelled response")
    assert ok_json(api.delete(f"/responses/{made['id']}")) == {"id": made["id"], "object": "response", "deleted": True}
    conforms("TokenCountsResource", ok_json(api.post("/responses/input_tokens", json={"model": CHAT_MODEL,
                                                                                     "input": "Hi"})))
