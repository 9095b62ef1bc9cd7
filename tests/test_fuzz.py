"""Property-based fuzzing: whatever a client sends, the server answers in OpenAI's shape, never with a 5xx.

Two kinds of tests live here:

* Schemathesis over the document the server itself serves (`GET /openapi.json`), for the
  operations localq implements or scopes (chat/completions, completions, embeddings, images,
  audio speech/transcriptions/translations, models, files, batches, moderations, and localq's own
  tokenize, detokenize, jobs, queues and workers): every POST with a documented body, localq's
  POSTs without one (cancelJob) and every GET.
  Schemathesis generates both conforming and non-conforming requests from that document.
* Hypothesis alone, independent of the document: arbitrary JSON values, and JSON-ish objects whose
  keys and strings come from the real request schemas, as bodies of the main POST endpoints (with
  unknown fields rejected and ignored); arbitrary bytes sent as `application/json`; and arbitrary
  text in multipart form fields and query strings, which the server coerces before validating.

The property is the same everywhere: no status >= 500 except 501 (not implemented), and every
error answer (>= 400) is exactly `{"error": {"message", "type", "param", "code"}}`. Schemathesis
also validates each answer whose status the served document lists against that answer's schema
(its `response_schema_conformance` check): with no queue here, that covers the model routes and
the error bodies; tests/test_response_conformance.py checks the job-backed answers of a real
service. One designed 5xx is tolerated besides 501: 503 with code `queue_unavailable`, the answer
of a handler that needs the job queue when none is reachable. The apps here point at an address
where no queue listens, so fuzzing never submits jobs to a real one.

A few hand-written adversarial requests (deep nesting, a multipart part without a name) close the
file; each pins a crash the fuzzing once found (all fixed).

Runs are bounded (about 20 examples an operation, no deadline) so the file stays fast; raise
LOCALQ_FUZZ_EXAMPLES to fuzz longer locally.
"""

from __future__ import annotations

import json
import os
from io import BytesIO

import pytest
import schemathesis
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from marshmallow import fields
from schemathesis.checks import response_schema_conformance
from schemathesis.config import SchemathesisConfig
from schemathesis.generation import GenerationMode
from werkzeug.datastructures import MultiDict

from api.app import create_app
from api.settings import Settings
from schemas.codegen import in_scope
from schemas.generated import OPERATIONS, SCHEMAS, TYPES
from schemas.runtime import ListOf, MapOf, Ref, Tagged, Union

ERROR_KEYS = {"message", "type", "param", "code"}
JSON = "application/json"
MAX_EXAMPLES = int(os.environ.get("LOCALQ_FUZZ_EXAMPLES", "20"))
HEALTH_CHECKS = [HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large]
FUZZ_SETTINGS = settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=HEALTH_CHECKS)
# Designed answers >= 500 besides 501 that are not crashes: (status, error.code).
TOLERATED_5XX = {(503, "queue_unavailable")}
# Nothing listens on port 1: handlers that need the queue answer 503 instead of queueing fuzz jobs.
TEST_ENV = {
    "LOCALQ_REDIS_URL": "redis://127.0.0.1:1/0",
    # createFile writes the bytes before (failing to write) the metadata: keep them out of var/files.
    "LOCALQ_FILES_DIR": os.path.join(os.environ.get("TMPDIR") or "/tmp", f"localq-fuzz-files-{os.getpid()}"),
}

# One app for the whole module: schemathesis loads the served document from it and calls it
# in-process; the hypothesis tests below use a test client over the same app.
APP = create_app(Settings.from_env(TEST_ENV))
MODEL_NAMES = sorted({name for config in APP.extensions["localq.models"].list() for name in config.names})


# ---------------------------------------------------------------------------------------------
# The property every answer must have.
# ---------------------------------------------------------------------------------------------


def check_answer(status: int, content_type: str | None, raw: bytes, request: str) -> None:
    """No 5xx except 501 (and a queue-down 503); any error answer is OpenAI's exact error envelope."""
    where = f"{request}\n-> HTTP {status} {content_type}: {raw[:800]!r}"
    if status >= 500 and status != 501:
        code = _error_code(raw)
        assert (status, code) in TOLERATED_5XX, f"server error for\n{where}"
    if status < 400:
        return
    assert (content_type or "").split(";")[0].strip() == JSON, f"error answer is not JSON for\n{where}"
    try:
        body = json.loads(raw)
    except ValueError:
        pytest.fail(f"error answer is not valid JSON for\n{where}")
    assert isinstance(body, dict) and body.keys() == {"error"}, f"not an OpenAI error body for\n{where}"
    error = body["error"]
    assert isinstance(error, dict) and error.keys() == ERROR_KEYS, f"error keys are wrong for\n{where}"
    assert isinstance(error["message"], str) and error["message"].strip(), f"empty error message for\n{where}"
    assert isinstance(error["type"], str) and error["type"], f"error type must be a string for\n{where}"
    assert error["param"] is None or isinstance(error["param"], str), f"param not a string/null for\n{where}"
    assert error["code"] is None or isinstance(error["code"], str), f"code not a string/null for\n{where}"


def _error_code(raw: bytes) -> str | None:
    try:
        return json.loads(raw)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


def _short(value, limit: int = 1500) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


# ---------------------------------------------------------------------------------------------
# Schemathesis over the served document.
# ---------------------------------------------------------------------------------------------


def _in_scope(path: str) -> bool:
    """The operation groups whose schemas are generated (the generator's own rule), and localq's."""
    bare = path.split("?", 1)[0]
    localq = any(op["localq"] and op["path"] == bare for op in OPERATIONS)
    return localq or in_scope(bare, {})


def target_operation_ids(document: dict) -> list[str]:
    """Scoped operations: POSTs whose body is documented, localq's POSTs without a body (such as
    cancelJob), and GETs (with query, path or no parameters)."""
    found = []
    for path, item in document["paths"].items():
        if not _in_scope(path) or "?" in path:  # `/responses?beta=true`: the same operation again
            continue
        for method, operation in item.items():
            if method == "post" and operation.get("requestBody", {}).get("content"):
                found.append(operation["operationId"])
            elif method == "post" and "localq" in operation.get("tags", []):
                found.append(operation["operationId"])
            elif method == "get":
                found.append(operation["operationId"])
    return sorted(found)


SERVED_DOCUMENT = APP.test_client().get("/openapi.json").get_json()
TARGETS = target_operation_ids(SERVED_DOCUMENT)

# An explicit (default) config, so a schemathesis.toml in the working directory changes nothing.
# Cases come from `as_strategy` below, one positive and one negative strategy per operation; the
# coverage phase (every boundary case of a schema, unbounded by max_examples) is not used.
schema = schemathesis.openapi.from_wsgi("/openapi.json", APP, config=SchemathesisConfig.from_dict({})).include(
    operation_id=TARGETS
)


def test_targets_cover_the_scoped_groups():
    """A guard against the selection silently shrinking (a renamed path, a dropped body)."""
    expected = {
        "createChatCompletion",
        "listChatCompletions",
        "createCompletion",
        "createEmbedding",
        "createImage",
        "createImageEdit",
        "createImageVariation",
        "createSpeech",
        "createTranscription",
        "createTranslation",
        "listModels",
        "retrieveModel",
        "createFile",
        "listFiles",
        "createBatch",
        "listBatches",
        "createModeration",
        "tokenize",
        "detokenize",
        "getJob",
        "listJobs",
        "cancelJob",
        "listWorkers",
        "listQueues",
    }
    assert expected <= set(TARGETS), f"missing from the fuzz targets: {sorted(expected - set(TARGETS))}"
    assert len(list(schema.get_all_operations())) == len(TARGETS)


def case_strategy(operation_id: str) -> st.SearchStrategy:
    """Conforming and non-conforming requests for one operation of the served document."""
    operation = schema.find_operation_by_id(operation_id)
    return st.one_of(
        operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
        operation.as_strategy(generation_mode=GenerationMode.NEGATIVE),
    )


# Every documented answer's body must validate against its schema in the served document.
RESPONSE_CHECKS = [response_schema_conformance]


# Parametrized here rather than with `schema.parametrize()`, so each operation is its own test id
# (schemathesis' own items all share one node id under pytest 9).
@pytest.mark.parametrize("operation_id", TARGETS)
def test_served_document_fuzz(operation_id):
    @FUZZ_SETTINGS
    @given(case=case_strategy(operation_id))
    def run(case):
        # A JSON `null` body is test_json_null_body_is_400's, which pins a known bug.
        assume(not (case.media_type == JSON and case.body is None))
        response = case.call()
        request = (
            f"{case.method} {case.formatted_path} query={_short(case.query)} "
            f"media_type={case.media_type} body={_short(case.body)}"
        )
        content_type = (response.headers.get("content-type") or [None])[0]
        check_answer(response.status_code, content_type, response.content, request)
        case.validate_response(response, checks=RESPONSE_CHECKS)

    run()


# ---------------------------------------------------------------------------------------------
# Hypothesis only: arbitrary bodies for the main POST endpoints.
# ---------------------------------------------------------------------------------------------

FUZZED_POSTS = {
    "/v1/chat/completions": "createChatCompletion",
    "/v1/completions": "createCompletion",
    "/v1/embeddings": "createEmbedding",
    "/v1/images/generations": "createImage",
    "/v1/audio/speech": "createSpeech",
    "/v1/batches": "createBatch",
}
_BY_ID = {op["operation_id"]: op for op in OPERATIONS}


def _walk(field: fields.Field, keys: set[str], words: set[str], seen: set[int]) -> None:
    """Collect property names and enum/tag values reachable from one field."""
    if id(field) in seen:
        return
    seen.add(id(field))
    for validator in getattr(field, "validators", ()):
        choices = getattr(validator, "choices", None)
        if choices:
            words.update(c for c in choices if isinstance(c, str))
    if isinstance(field, Ref):
        _walk(TYPES[field.name](), keys, words, seen)
    elif isinstance(field, ListOf):
        _walk(field.inner, keys, words, seen)
    elif isinstance(field, MapOf) and field.value_field is not None:
        _walk(field.value_field, keys, words, seen)
    elif isinstance(field, Union):
        for member in field.members:
            _walk(member, keys, words, seen)
    elif isinstance(field, Tagged):
        keys.add(field.tag)
        words.update(field.members)
        for member in field.members.values():
            _walk(member, keys, words, seen)
    elif isinstance(field, fields.Nested):
        _walk_schema(field.schema, keys, words, seen)


def _walk_schema(schema, keys: set[str], words: set[str], seen: set[int]) -> None:
    if isinstance(schema, str):
        schema = SCHEMAS[schema]
    cls = schema if isinstance(schema, type) else type(schema)
    if id(cls) in seen:
        return
    seen.add(id(cls))
    for name, field in cls._declared_fields.items():
        keys.add(field.data_key or name)
        _walk(field, keys, words, seen)


def vocabulary(schema_name: str) -> tuple[list[str], list[str], list[str]]:
    """(top-level keys, every reachable key, enum and tag values) of a request schema."""
    top = sorted((f.data_key or n) for n, f in SCHEMAS[schema_name]._declared_fields.items())
    keys: set[str] = set()
    words: set[str] = set()
    _walk_schema(schema_name, keys, words, set())
    return top, sorted(keys), sorted(words)


scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)


def shaped_bodies(schema_name: str) -> st.SearchStrategy:
    """Objects whose keys and strings come from the request schema, so validation goes deep."""
    top, keys, words = vocabulary(schema_name)
    strings = st.sampled_from(sorted({*words, *MODEL_NAMES, *keys})) | st.text(max_size=12)
    key = st.sampled_from(keys) | st.text(max_size=8)
    leaf = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | strings
    values = st.recursive(
        leaf,
        lambda children: st.lists(children, max_size=4) | st.dictionaries(key, children, max_size=5),
        max_leaves=25,
    )
    return st.dictionaries(st.sampled_from(top) | key, values, max_size=8)


# A top-level `null` body is left to test_json_null_body_is_400, which pins a known bug.
json_documents = json_values.filter(lambda value: value is not None)


def body_strategy(operation_id: str) -> st.SearchStrategy:
    schema_name = _BY_ID[operation_id]["request"][JSON]
    return st.one_of(json_documents, shaped_bodies(schema_name))


@pytest.fixture(scope="module")
def fuzz_client():
    return APP.test_client()


@pytest.fixture(scope="module")
def ignore_unknown_client():
    """An app with LOCALQ_UNKNOWN_FIELDS=ignore, which drops unknown fields instead of rejecting them."""
    return create_app(Settings.from_env({**TEST_ENV, "LOCALQ_UNKNOWN_FIELDS": "ignore"})).test_client()


@pytest.mark.parametrize("unknown_fields", ["reject", "ignore"])
@pytest.mark.parametrize("path", list(FUZZED_POSTS), ids=list(FUZZED_POSTS.values()))
def test_random_json_bodies_never_500(request, path, unknown_fields):
    client = request.getfixturevalue("fuzz_client" if unknown_fields == "reject" else "ignore_unknown_client")

    @FUZZ_SETTINGS
    @given(body=body_strategy(FUZZED_POSTS[path]))
    def run(body):
        raw = json.dumps(body).encode()
        response = client.post(path, data=raw, content_type=JSON)
        sent = f"POST {path} (unknown fields: {unknown_fields}) body={_short(raw)}"
        check_answer(response.status_code, response.content_type, response.data, sent)

    run()


_UNPARSABLE = object()


def _parsed(raw: bytes):
    """What the server's JSON parser makes of these bytes (it rejects NaN and Infinity)."""

    def reject(name):
        raise ValueError(name)

    try:
        return json.loads(raw, parse_constant=reject)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return _UNPARSABLE


def _damaged_json(data) -> bytes:
    """Valid JSON text cut short or with junk spliced in: near-misses a parser must still reject."""
    raw = json.dumps(data.draw(json_documents)).encode()
    cut = data.draw(st.integers(0, len(raw)))
    junk = data.draw(st.binary(max_size=6))
    return raw[:cut] + junk + raw[cut:] if data.draw(st.booleans()) else raw[:cut]


@pytest.mark.parametrize("path", list(FUZZED_POSTS), ids=list(FUZZED_POSTS.values()))
def test_random_bytes_as_json_are_400(fuzz_client, path):
    @FUZZ_SETTINGS
    @given(data=st.data())
    def run(data):
        raw = data.draw(st.binary(max_size=200)) if data.draw(st.booleans()) else _damaged_json(data)
        parsed = _parsed(raw)
        assume(parsed is not None)  # a JSON `null` is test_json_null_body_is_400's (a known bug)
        response = fuzz_client.post(path, data=raw, content_type=JSON)
        request = f"POST {path} content-type=application/json body={_short(raw)}"
        check_answer(response.status_code, response.content_type, response.data, request)
        if parsed is not _UNPARSABLE:
            return  # valid JSON after all: any well-formed answer below 500 (or a 501) is fine
        assert response.status_code == 400, f"unparsable JSON must be a 400:\n{request} -> {response.status_code}"
        if raw:
            code = response.get_json()["error"]["code"]
            assert code == "invalid_json", f"unparsable JSON answered with code {code!r}:\n{request}"

    run()


# ---------------------------------------------------------------------------------------------
# Hypothesis only: text-typed inputs (multipart forms and query strings), which the server
# coerces to JSON types before validating.
# ---------------------------------------------------------------------------------------------

FORM_OPERATIONS = sorted(
    op["operation_id"]
    for op in OPERATIONS
    if _in_scope(op["path"]) and (op["request"].get("multipart/form-data") or op["query_schema"])
)

# What a client may put in a text field: plain text, numbers and JSON of any (shallow) shape.
text_values = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["", "null", "true", "false", "0", "-1", "1e400", "nan", "inf", "[", "{", "[]", "{}"]),
    st.integers().map(str),
    st.floats().map(str),
    json_values.map(json.dumps),
)


def form_strategy(operation_id: str) -> st.SearchStrategy:
    op = _BY_ID[operation_id]
    schema_name = op["request"].get("multipart/form-data") or op["query_schema"]
    top, keys, _ = vocabulary(schema_name)
    # Control characters, `"` and `\` are left out of names: the test client writes them into the
    # part's header unescaped, which the server then parses as a part without a name (a known bug,
    # pinned by test_multipart_part_without_name).
    other = st.text(st.characters(exclude_categories=("Cc", "Cs"), exclude_characters='"\\'), min_size=1, max_size=8)
    names = st.sampled_from(top) | st.sampled_from(top).map(lambda n: n + "[]") | other
    return st.lists(st.tuples(names, text_values), max_size=8)


@pytest.mark.parametrize("operation_id", FORM_OPERATIONS)
def test_random_form_and_query_values_never_500(fuzz_client, operation_id):
    op = _BY_ID[operation_id]
    path = "/v1" + op["path"].replace("{", "").replace("}", "")
    multipart = bool(op["request"].get("multipart/form-data"))

    @FUZZ_SETTINGS
    @given(pairs=form_strategy(operation_id), with_file=st.booleans())
    def run(pairs, with_file):
        if multipart:
            form = MultiDict(pairs)
            if with_file:
                for name in ("file", "image", "mask"):
                    form.add(name, (BytesIO(b"\x00\x01fuzz"), f"{name}.bin"))
            response = fuzz_client.post(path, data=form, content_type="multipart/form-data")
            sent = f"POST {path} multipart={_short(pairs)} with_file={with_file}"
        else:
            response = fuzz_client.get(path, query_string=pairs)
            sent = f"GET {path} query={_short(pairs)}"
        check_answer(response.status_code, response.content_type, response.data, sent)

    run()


# ---------------------------------------------------------------------------------------------
# Deep nesting: a parser or a copy that recurses must answer 400, not crash with a RecursionError.
# ---------------------------------------------------------------------------------------------

DEPTH = 1500  # deeper than Python's default recursion limit (1000); ~1.5 KB, fits any request line


def _nested_list(depth: int) -> list:
    root: list = []
    current = root
    for _ in range(depth):
        child: list = []
        current.append(child)
        current = child
    return root


CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
def test_deeply_nested_json_body_is_400(fuzz_client):
    response = fuzz_client.post("/v1/chat/completions", data="[" * DEPTH + "]" * DEPTH, content_type=JSON)
    check_answer(response.status_code, response.content_type, response.data, "POST deep JSON body")
    assert response.status_code == 400


def test_deeply_nested_query_value_is_not_500(fuzz_client):
    # metadata is an object-typed query parameter, so its text is parsed as JSON.
    response = fuzz_client.get("/v1/chat/completions", query_string={"metadata": "[" * DEPTH})
    check_answer(response.status_code, response.content_type, response.data, "GET ?metadata=[[[...")


@pytest.mark.parametrize(
    "field",
    [
        "chunking_strategy",
        "timestamp_granularities[]",
    ],
)
def test_deeply_nested_form_field_is_not_500(fuzz_client, field):
    form = {"file": (BytesIO(b"RIFF"), "a.wav"), "model": "whisper-1", field: "[" * DEPTH}
    response = fuzz_client.post("/v1/audio/transcriptions", data=form, content_type="multipart/form-data")
    check_answer(response.status_code, response.content_type, response.data, f"POST transcriptions {field}=[[[...")


def test_ignore_mode_deeply_nested_unknown_field_is_not_500():
    client = create_app(Settings.from_env({**TEST_ENV, "LOCALQ_UNKNOWN_FIELDS": "ignore"})).test_client()
    body = json.dumps({**CHAT, "junk": _nested_list(600)})  # parses (json allows ~1000 levels)
    response = client.post("/v1/chat/completions", data=body, content_type=JSON)
    check_answer(response.status_code, response.content_type, response.data, "POST ignore-mode deep unknown field")


@pytest.mark.parametrize("path", ["/v1/files", "/v1/audio/transcriptions"])
def test_multipart_part_without_name(fuzz_client, path):
    body = b"--b\r\nContent-Disposition: form-data\r\n\r\nvalue\r\n--b--\r\n"
    response = fuzz_client.post(path, data=body, content_type="multipart/form-data; boundary=b")
    check_answer(response.status_code, response.content_type, response.data, f"POST {path} nameless part")
    assert response.status_code == 400


GET_URLS = sorted(
    {"/v1" + op["path"].replace("{", "").replace("}", "") for op in OPERATIONS if op["method"] == "GET"}
)


def test_head_on_get_routes_is_not_500(fuzz_client):
    """Flask answers HEAD for every GET rule by calling its view; that must not crash."""
    allowed = {*range(200, 500), 501, 503}  # 503: the jobs routes without a reachable queue (no body on HEAD)
    crashed = [url for url in GET_URLS if fuzz_client.head(url).status_code not in allowed]
    assert crashed == [], f"HEAD answered >= 500 for {len(crashed)} of {len(GET_URLS)} GET routes, e.g. {crashed[:5]}"


JSON_POSTS = sorted(
    op["operation_id"]
    for op in OPERATIONS
    if op["method"] == "POST" and op["request"].get(JSON) and op["request_required"] and _in_scope(op["path"])
)


@pytest.mark.parametrize("operation_id", JSON_POSTS)
def test_json_null_body_is_400(fuzz_client, operation_id):
    path = "/v1" + _BY_ID[operation_id]["path"].replace("{", "").replace("}", "")
    response = fuzz_client.post(path, data=b"null", content_type=JSON)
    check_answer(response.status_code, response.content_type, response.data, f"POST {path} body=null")
    assert response.status_code == 400, f"POST {path} body=null -> {response.status_code}: {response.data!r}"
