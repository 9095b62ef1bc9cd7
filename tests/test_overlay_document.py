"""Checks on schemas/overlay.yaml, localq's OpenAPI Overlay over the upstream OpenAI document.

The overlay is applied here with a small local helper (the generator has its own) that uses the
same rules: targets are jsonpath-ng (`jsonpath_ng.ext`) expressions that must each select at
least one node; `remove: true` deletes the selected nodes; `update` is merged into them (objects
recursively, scalars replaced, lists appended to).

The upstream document is not part of the repository (`tests.upstream` finds it): the tests that
need it skip when it is missing, and fail under CI.
"""

from __future__ import annotations

import copy
import json
import re
from collections import Counter
from pathlib import Path

import pytest
import yaml
from jsonpath_ng import Fields, Index, Root
from jsonpath_ng.ext import parse as jsonpath_parse

from tests.upstream import require_spec

REPO = Path(__file__).resolve().parents[1]
OVERLAY_PATH = REPO / "schemas" / "overlay.yaml"

EXT_PROP = "x-localai-extensions"
MARKER = "x-localq-extensions-property"
SCHEMA_PREFIX = "#/components/schemas/"

# request schema -> extension schema it must carry
EXPECTED_EXTENSIONS = {
    "CreateChatCompletionRequest": "LocalqTextExtensions",
    "CreateCompletionRequest": "LocalqTextExtensions",
    "CreateEmbeddingRequest": "LocalqCommonExtensions",
    "CreateImageRequest": "LocalqImageExtensions",
    "CreateImageEditRequest": "LocalqImageExtensions",
    "EditImageBodyJsonParam": "LocalqImageExtensions",
    "CreateSpeechRequest": "LocalqSpeechExtensions",
    "CreateTranscriptionRequest": "LocalqTranscriptionExtensions",
    "CreateTranslationRequest": "LocalqTranscriptionExtensions",
}
# the endpoints whose request bodies must end up carrying extensions
EXTENDED_PATHS = [
    "/chat/completions",
    "/completions",
    "/embeddings",
    "/images/generations",
    "/images/edits",
    "/audio/speech",
    "/audio/transcriptions",
    "/audio/translations",
]
NEW_OPERATIONS = {
    ("/jobs", "get"): "listJobs",
    ("/jobs/{job_id}", "get"): "getJob",
    ("/jobs/{job_id}/cancel", "post"): "cancelJob",
    ("/jobs/{job_id}/events", "get"): "streamJobEvents",
    ("/tokenize", "post"): "tokenize",
    ("/detokenize", "post"): "detokenize",
    ("/workers", "get"): "listWorkers",
    ("/queues", "get"): "listQueues",
}
COMMON_KNOBS = {"priority", "timeout"}


# --------------------------------------------------------------------------------------------
# Overlay application (local reference implementation)
# --------------------------------------------------------------------------------------------


def _merge(node, update):
    """Merge `update` into `node` in place and return the result."""
    if isinstance(node, dict) and isinstance(update, dict):
        for key, value in update.items():
            if key in node:
                node[key] = _merge(node[key], value)
            else:
                node[key] = copy.deepcopy(value)
        return node
    if isinstance(node, list) and isinstance(update, list):
        node.extend(copy.deepcopy(update))
        return node
    return copy.deepcopy(update)


def _remove(match) -> None:
    path, parent = match.path, match.context
    if parent is None or isinstance(path, Root):
        raise ValueError("an overlay cannot remove the document root")
    container = parent.value
    if isinstance(path, Fields):
        for field in path.fields:
            container.pop(field, None)
    elif isinstance(path, Index):
        del container[path.index]
    else:  # pragma: no cover - not produced by the expressions the overlay uses
        raise ValueError(f"cannot remove a node reached through {type(path).__name__}")


def apply_overlay(document: dict, overlay: dict) -> dict:
    document = copy.deepcopy(document)
    for number, action in enumerate(overlay["actions"]):
        target = action["target"]
        matches = jsonpath_parse(target).find(document)
        assert matches, f"action {number} ({target}) selects nothing"
        if action.get("remove"):
            # remove list entries from the back so earlier indexes stay valid
            for match in sorted(matches, key=lambda m: getattr(m.path, "index", 0), reverse=True):
                _remove(match)
            continue
        update = action["update"]
        for match in matches:
            value = match.value
            if isinstance(value, list) and not isinstance(update, list):
                value.append(copy.deepcopy(update))
            elif isinstance(value, dict) and isinstance(update, dict) or isinstance(value, list):
                _merge(value, update)
            else:
                raise AssertionError(f"action {number} ({target}) updates a {type(value).__name__}")
    return document


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _schema_name(ref: str) -> str:
    assert ref.startswith(SCHEMA_PREFIX), ref
    return ref[len(SCHEMA_PREFIX) :]


def _top_level_properties(schemas: dict, schema: dict, seen=frozenset()) -> set[str]:
    """Names a request body may carry at its top level, following $ref and compositions."""
    if "$ref" in schema:
        name = _schema_name(schema["$ref"])
        if name in seen:
            return set()
        seen = seen | {name}
        schema = schemas[name]
    names = set(schema.get("properties", {}))
    for keyword in ("allOf", "anyOf", "oneOf"):
        for part in schema.get(keyword, []):
            names |= _top_level_properties(schemas, part, seen)
    return names


def _extension_property_schema(schema: dict) -> dict | None:
    if EXT_PROP in schema.get("properties", {}):
        return schema["properties"][EXT_PROP]
    for part in schema.get("allOf", []):
        if EXT_PROP in part.get("properties", {}):
            return part["properties"][EXT_PROP]
    return None


def _walk(node, path=()):
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, path + (key,))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _walk(value, path + (index,))


def _validation_errors(document: dict) -> Counter:
    from openapi_spec_validator import OpenAPIV31SpecValidator

    signatures = Counter()
    try:
        for error in OpenAPIV31SpecValidator(document).iter_errors():
            signatures[
                (
                    getattr(error, "message", str(error)),
                    tuple(getattr(error, "path", ())),
                    tuple(getattr(error, "schema_path", ())),
                )
            ] += 1
    except Exception as exc:  # e.g. a $ref to nowhere aborts the validator; keep the message short
        pytest.fail(f"openapi-spec-validator stopped: {type(exc).__name__}: {str(exc)[:300]}")
    return signatures


def _validator_for(document: dict, schema_name: str):
    from jsonschema import Draft202012Validator
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    registry = Registry().with_resource(
        "urn:localq:openapi", Resource.from_contents(document, default_specification=DRAFT202012)
    )
    return Draft202012Validator(
        {"$ref": f"urn:localq:openapi#/components/schemas/{schema_name}"}, registry=registry
    )


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def overlay() -> dict:
    with OVERLAY_PATH.open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)


@pytest.fixture(scope="module")
def spec() -> dict:
    with require_spec().open(encoding="utf-8") as handle:
        return json.load(handle)


@pytest.fixture(scope="module")
def merged(spec, overlay) -> dict:
    return apply_overlay(spec, overlay)


# --------------------------------------------------------------------------------------------
# The overlay document on its own
# --------------------------------------------------------------------------------------------


def test_overlay_header(overlay):
    assert str(overlay["overlay"]) == "1.0.0"
    assert overlay["info"]["title"] and overlay["info"]["version"]
    assert isinstance(overlay["actions"], list) and overlay["actions"]


def test_every_action_has_a_target_and_exactly_one_operation(overlay):
    for number, action in enumerate(overlay["actions"]):
        assert isinstance(action.get("target"), str) and action["target"].startswith("$"), number
        assert set(action) <= {"target", "description", "update", "remove"}, (number, set(action))
        assert ("update" in action) != ("remove" in action), f"action {number} needs exactly one of update/remove"
        if "remove" in action:
            assert action["remove"] is True, number
        jsonpath_parse(action["target"])  # must parse with the generator's parser


def test_extension_schemas_are_closed_and_share_the_common_knobs(overlay):
    schemas = next(
        a["update"] for a in overlay["actions"] if a["target"] == "$.components.schemas" and "update" in a
    )
    for name in set(EXPECTED_EXTENSIONS.values()):
        schema = schemas[name]
        assert schema["type"] == "object" and schema["additionalProperties"] is False, name
        for knob in COMMON_KNOBS:
            assert schema["properties"][knob] == schemas["LocalqCommonExtensions"]["properties"][knob], (name, knob)
        assert "required" not in schema, name
    for name, schema in schemas.items():
        assert name.startswith("Localq"), name


def test_descriptions_are_not_copied_from_upstream(overlay, spec):
    upstream_text = json.dumps(spec)
    # strings only: a schema may also have a *property* named description
    ours = [node for path, node in _walk(overlay) if path and path[-1] in ("description", "summary")
            and isinstance(node, str)]
    assert ours
    for text in ours:
        for sentence in re.split(r"(?<=[.;:])\s+", " ".join(text.split())):
            if len(sentence) >= 30:
                assert json.dumps(sentence)[1:-1] not in upstream_text, sentence


# --------------------------------------------------------------------------------------------
# The overlay applied to the upstream document
# --------------------------------------------------------------------------------------------


def test_upstream_names_the_overlay_relies_on(spec):
    schemas = spec["components"]["schemas"]
    for name in EXPECTED_EXTENSIONS:
        assert name in schemas, name
    assert "ErrorResponse" in schemas
    referenced = set()
    for path in EXTENDED_PATHS:
        for media in spec["paths"][path]["post"]["requestBody"]["content"].values():
            referenced.add(_schema_name(media["schema"]["$ref"]))
    assert referenced == set(EXPECTED_EXTENSIONS)
    for path, _method in NEW_OPERATIONS:
        assert path not in spec["paths"], path


def test_actions_apply_and_every_target_matches(merged):
    # apply_overlay asserts that each target selects something; reaching here means they all did
    assert merged["servers"] == [
        {"url": "http://127.0.0.1:8080/v1", "description": merged["servers"][0]["description"]}
    ]
    assert merged["security"] == [{"bearerAuth": []}]
    assert merged["components"]["securitySchemes"] == {
        "bearerAuth": {
            "type": "http",
            "scheme": "bearer",
            "description": merged["components"]["securitySchemes"]["bearerAuth"]["description"],
        }
    }
    assert "localq" in merged["info"]["title"]
    assert "localq" in merged["info"]["description"]
    assert "localq" in {tag["name"] for tag in merged["tags"]}
    # no operation may name a scheme that no longer exists
    for path, item in merged["paths"].items():
        for method, operation in item.items():
            for requirement in operation.get("security", []) if isinstance(operation, dict) else []:
                assert set(requirement) <= set(merged["components"]["securitySchemes"]), (path, method)


def test_all_request_schemas_carry_extensions(merged):
    schemas = merged["components"]["schemas"]
    for name, extension in EXPECTED_EXTENSIONS.items():
        schema = schemas[name]
        assert schema.get(MARKER) == EXT_PROP, name
        prop = _extension_property_schema(schema)
        assert prop == {"$ref": SCHEMA_PREFIX + extension}, name
        assert EXT_PROP not in schema.get("required", []), name
    # the chat request keeps its upstream parts untouched and gains one more
    assert schemas["CreateChatCompletionRequest"]["allOf"][-1]["properties"] == {
        EXT_PROP: {"$ref": SCHEMA_PREFIX + "LocalqTextExtensions"}
    }
    for path in EXTENDED_PATHS:
        for media in merged["paths"][path]["post"]["requestBody"]["content"].values():
            name = _schema_name(media["schema"]["$ref"])
            assert _extension_property_schema(schemas[name]) is not None, (path, name)


def test_extension_names_do_not_collide_with_upstream_properties(spec, merged):
    upstream = spec["components"]["schemas"]
    ours = merged["components"]["schemas"]
    for name, extension in EXPECTED_EXTENSIONS.items():
        upstream_names = _top_level_properties(upstream, upstream[name])
        assert EXT_PROP not in upstream_names, name
        extension_names = set(ours[extension]["properties"])
        clash = extension_names & upstream_names
        assert not clash, f"{extension} on {name} reuses upstream names {sorted(clash)}"


def test_new_operations(merged):
    for (path, method), operation_id in NEW_OPERATIONS.items():
        operation = merged["paths"][path][method]
        assert operation["operationId"] == operation_id
        assert operation["tags"] == ["localq"]
        assert operation["summary"]
        assert "200" in operation["responses"]
        assert any(code.startswith(("4", "5")) for code in operation["responses"])
        if "{job_id}" in path:
            assert {"name": "job_id", "in": "path"}.items() <= operation["parameters"][0].items()
    operation_ids = [
        op["operationId"]
        for item in merged["paths"].values()
        for op in item.values()
        if isinstance(op, dict) and "operationId" in op
    ]
    assert len(operation_ids) == len(set(operation_ids))
    events = merged["paths"]["/jobs/{job_id}/events"]["get"]
    assert "text/event-stream" in events["responses"]["200"]["content"]
    header = next(p for p in events["parameters"] if p["in"] == "header")
    assert header["name"] == "Last-Event-ID" and header["required"] is False
    # every reference the overlay introduces resolves
    for path, node in _walk(merged):
        if isinstance(node, dict) and isinstance(node.get("$ref"), str) and "Localq" in node["$ref"]:
            kind, name = node["$ref"].split("/")[-2:]
            assert name in merged["components"][kind], (path, node["$ref"])
    for name in ("LocalqBadRequest", "LocalqUnauthorized", "LocalqNotFound", "LocalqServerError"):
        schema = merged["components"]["responses"][name]["content"]["application/json"]["schema"]
        assert schema == {"$ref": SCHEMA_PREFIX + "ErrorResponse"}


def test_merged_document_adds_no_validation_errors(spec, merged):
    # The upstream document already fails a few checks of openapi-spec-validator (duplicate
    # `required` entries, a boolean `exclusiveMinimum`, ...), so validate() on it raises before
    # reaching our additions. Instead compare every error reported for the merged document with
    # those reported for the untouched one: the overlay must not add any.
    before = _validation_errors(spec)
    after = _validation_errors(merged)
    added = after - before
    assert not added, "\n".join(f"{message} at {path}" for message, path, _ in added)


def test_new_component_schemas_are_valid_json_schema(merged):
    from jsonschema import Draft202012Validator

    for name, schema in merged["components"]["schemas"].items():
        if name.startswith("Localq"):
            Draft202012Validator.check_schema(schema)


def test_extensions_validate_as_intended(merged):
    chat = _validator_for(merged, "CreateChatCompletionRequest")
    base = {"model": "llama", "messages": [{"role": "user", "content": "hi"}]}
    good = {"priority": "batch", "timeout": 30, "top_k": 40, "min_p": 0.05, "mirostat": 2, "grammar": 'root ::= "x"'}
    assert not list(chat.iter_errors({**base, EXT_PROP: good}))
    assert not list(chat.iter_errors(base))
    for bad in ({"unknown": 1}, {"timeout": 0}, {"timeout": 86401}, {"priority": "urgent"}, {"mirostat": 3}, {"top_k": -1}):
        assert list(chat.iter_errors({**base, EXT_PROP: bad})), bad

    embeddings = _validator_for(merged, "CreateEmbeddingRequest")
    base = {"model": "nomic", "input": "hello"}
    assert not list(embeddings.iter_errors({**base, EXT_PROP: {"priority": "batch"}}))
    assert list(embeddings.iter_errors({**base, EXT_PROP: {"top_k": 4}}))

    images = _validator_for(merged, "LocalqImageExtensions")
    assert not list(images.iter_errors({"steps": 30, "scheduler": "whatever_new", "seed": 7, "strength": 0.5}))
    assert list(images.iter_errors({"steps": 0}))

    speech = _validator_for(merged, "LocalqSpeechExtensions")
    assert not list(speech.iter_errors({"speaker_id": 3, "length_scale": 1.2, "voice_language": "en_US"}))
    assert list(speech.iter_errors({"length_scale": 0}))

    whisper = _validator_for(merged, "LocalqTranscriptionExtensions")
    assert not list(whisper.iter_errors({"beam_size": 5, "vad_filter": True, "no_speech_threshold": 0.6}))
    assert list(whisper.iter_errors({"beam_size": 21}))


def test_localq_response_shapes(merged):
    job = _validator_for(merged, "LocalqJob")
    sample = {
        "id": "job_1",
        "object": "job",
        "status": "succeeded",
        "type": "chat.completion",
        "model": "llama",
        "created_at": 1,
        "started_at": 2,
        "finished_at": 3,
        "queue": "cpu",
        "error": None,
        "result": {"anything": [1, 2]},
    }
    assert not list(job.iter_errors(sample))
    assert not list(job.iter_errors({**sample, "status": "queued", "started_at": None, "finished_at": None, "result": None}))
    failed = {**sample, "status": "failed", "error": {"message": "boom", "type": "timeout_error", "code": None}}
    assert not list(job.iter_errors(failed))
    assert list(job.iter_errors({**sample, "status": "done"}))

    assert not list(_validator_for(merged, "LocalqJobEvent").iter_errors({"type": "delta", "data": "tok"}))
    tokenize = _validator_for(merged, "LocalqTokenizeRequest")
    assert not list(tokenize.iter_errors({"model": "m", "content": "hi"}))
    assert list(tokenize.iter_errors({"model": "m", "content": "hi", EXT_PROP: {}}))
    detokenize = _validator_for(merged, "LocalqDetokenizeRequest")
    assert not list(detokenize.iter_errors({"model": "m", "tokens": [1, 2]}))
    assert list(detokenize.iter_errors({"model": "m", "tokens": [-1]}))
    workers = _validator_for(merged, "LocalqWorkerList")
    worker = {
        "id": "w1",
        "hostname": "box",
        "device": "gpu",
        "queues": ["gpu"],
        "memory_budget_bytes": 10,
        "memory_used_bytes": 5,
        "loaded_models": ["llama"],
        "current_job": None,
        "last_heartbeat": 1,
        "slots": 1,
        "slots_busy": 0,
        "running_jobs": [],
        "engines": {},
    }
    engine = {"parallel": 4, "running": 1, "waiting": 0, "steps": 9, "prompt_tokens": 30, "cached_tokens": 12,
              "generated_tokens": 8, "tokens_per_second": 2.5}
    busy = {**worker, "current_job": "j1", "slots": 4, "slots_busy": 1,
            "running_jobs": [{"id": "j1", "model": "llama"}], "engines": {"llama": engine}}
    assert not list(workers.iter_errors({"object": "list", "data": [worker, busy]}))
    assert list(workers.iter_errors({"object": "list", "data": [{**worker, "device": "tpu"}]}))
    assert list(workers.iter_errors({"object": "list", "data": [{**worker, "slots": 0}]}))
    odd_engine = {"llama": {**engine, "waiting": -1}}
    assert list(workers.iter_errors({"object": "list", "data": [{**busy, "engines": odd_engine}]}))
    assert list(workers.iter_errors({"object": "list", "data": [{**busy, "running_jobs": [{"model": "llama"}]}]}))


def test_job_list_and_queue_shapes(merged):
    jobs = _validator_for(merged, "LocalqJobList")
    item = {"id": "job_1", "object": "job", "status": "queued", "type": "embedding", "model": "m", "created_at": 1,
            "started_at": None, "finished_at": None, "queue": "cpu", "worker": None, "error": None}
    page = {"object": "list", "data": [item], "first_id": "job_1", "last_id": "job_1", "has_more": False}
    assert not list(jobs.iter_errors(page)), "list items have no result"
    assert not list(jobs.iter_errors({**page, "data": [], "first_id": None, "last_id": None}))
    assert not list(jobs.iter_errors({**page, "data": [], "first_id": None, "last_id": "job_9", "has_more": True}))
    assert list(jobs.iter_errors({key: value for key, value in page.items() if key != "has_more"}))
    params = {p["name"]: p["schema"] for p in merged["paths"]["/jobs"]["get"]["parameters"]}
    assert params["limit"] == {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}
    assert params["status"]["enum"] == ["queued", "running", "succeeded", "failed", "cancelled", "expired"]
    assert all(params[name]["maxLength"] for name in ("after", "type", "model")), "bounded inputs"
    queues = _validator_for(merged, "LocalqQueueList")
    queue = {"object": "queue", "name": "cpu", "waiting": 3, "waiting_interactive": 2, "waiting_batch": 1,
             "workers": 1}
    assert not list(queues.iter_errors({"object": "list", "data": [queue], "jobs_done": 7}))
    assert list(queues.iter_errors({"object": "list", "data": [{**queue, "waiting": -1}], "jobs_done": 7}))
    assert list(queues.iter_errors({"object": "list", "data": [queue]}))
