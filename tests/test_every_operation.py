"""Every operation of OpenAI's upstream document is routed under `/v1` and answers in OpenAI's shape.

This walks the upstream spec file itself, not the generated operation table, so an operation the
generator dropped (or a path the router spells differently) shows up as a failure here. Each
operation gets one request with its path parameters filled with a dummy value (`x1`), the
`?beta=true` style query of its path kept, and the smallest body its document allows: `{}` for a
JSON body, an empty form for a multipart-only one, nothing otherwise. The answer must come from
the operation, not the router: never the router's 404 (`unknown_url`) or a 405, never a 5xx other
than 501, and every non-2xx answer must be exactly `{"error": {message, type, param, code}}`.
The one designed 5xx besides 501 is tolerated: 503 `queue_unavailable`, from a handler that needs
the job queue; the app here points at an address where no queue listens.

The upstream document is not part of the repository (`tests.upstream` finds it): these tests skip
when it is missing, and fail under CI.
"""

from __future__ import annotations

import json
import re
from urllib.parse import urlencode

import pytest

from api.app import create_app
from api.settings import Settings
from schemas.generate import default_spec_path
from schemas.generated import OPERATIONS
from tests.upstream import require_spec

HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
JSON = "application/json"
MULTIPART = "multipart/form-data"
ERROR_KEYS = {"message", "type", "param", "code"}
DUMMY = "x1"
# Nothing listens on port 1: a handler that needs the job queue answers 503 instead of queueing.
TEST_ENV = {"LOCALQ_REDIS_URL": "redis://127.0.0.1:1/0"}
TOLERATED_5XX = {(503, "queue_unavailable")}


def _load_spec() -> dict | None:
    path = default_spec_path()
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


SPEC = _load_spec()


def _spec_operations(spec: dict | None) -> list[dict]:
    """One entry per (path, method) of the upstream document, in document order."""
    if spec is None:
        return []
    found = []
    for raw_path, item in spec.get("paths", {}).items():
        path, _, query = raw_path.partition("?")
        for method in HTTP_METHODS:
            operation = item.get(method)
            if operation is None:
                continue
            body = operation.get("requestBody") or {}
            if "$ref" in body:  # a shared request body under components/requestBodies
                name = body["$ref"].rsplit("/", 1)[-1]
                body = spec.get("components", {}).get("requestBodies", {}).get(name, {})
            found.append(
                {
                    "id": operation.get("operationId") or f"{method.upper()} {raw_path}",
                    "method": method.upper(),
                    "raw_path": raw_path,
                    "path": path,
                    "query": query,
                    "content": list((body.get("content") or {}).keys()),
                }
            )
    return found


SPEC_OPERATIONS = _spec_operations(SPEC)
# Without the spec, one placeholder case that `require_spec` skips or fails: an empty parametrization
# would be skipped by pytest whatever CI says.
OPERATION_CASES = SPEC_OPERATIONS or [pytest.param(None, id="upstream-spec-missing")]


@pytest.fixture(scope="module")
def shared_client():
    """One app for the whole module; nothing here changes its state."""
    return create_app(Settings.from_env(TEST_ENV)).test_client()


def _url(op: dict) -> str:
    url = "/v1" + re.sub(r"\{[^}]+\}", DUMMY, op["path"])
    return f"{url}?{op['query']}" if op["query"] else url


def _send(client, op: dict):
    url = _url(op)
    method = op["method"]
    content = op["content"]
    if method != "POST" or not content:
        return client.open(url, method=method)
    if JSON in content:
        return client.open(url, method=method, data=b"{}", content_type=JSON)
    # Multipart-only (possibly beside another non-JSON type, as application/sdp): an empty form.
    return client.open(url, method=method, data={}, content_type=MULTIPART)


def assert_error_shape(response) -> dict:
    """The exact OpenAI error envelope; returns its `error` object."""
    assert response.mimetype == JSON, f"error answer is {response.mimetype!r}, not JSON: {response.data[:300]!r}"
    body = response.get_json(silent=True)
    assert isinstance(body, dict) and body.keys() == {"error"}, f"not an OpenAI error body: {body!r}"
    error = body["error"]
    assert isinstance(error, dict) and error.keys() == ERROR_KEYS, f"error keys are wrong: {error!r}"
    assert isinstance(error["message"], str) and error["message"].strip(), f"empty error message: {error!r}"
    assert isinstance(error["type"], str) and error["type"], f"error type must be a non-empty string: {error!r}"
    assert error["param"] is None or isinstance(error["param"], str), f"param must be a string or null: {error!r}"
    assert error["code"] is None or isinstance(error["code"], str), f"code must be a string or null: {error!r}"
    return error


@pytest.mark.parametrize("op", OPERATION_CASES, ids=[op["id"] for op in SPEC_OPERATIONS] or None)
def test_operation_is_routed_and_answers_openai_shaped(shared_client, op):
    require_spec()
    assert_answered_by_the_operation(shared_client, op)


# localq's own operations (the overlay's, tagged `localq`), from the generated table: no spec needed.
LOCALQ_OPERATIONS = [{"id": op["operation_id"], "method": op["method"], "path": op["path"], "query": "",
                      "content": list(op["request"])} for op in OPERATIONS if op["localq"]]


@pytest.mark.parametrize("op", LOCALQ_OPERATIONS, ids=[op["id"] for op in LOCALQ_OPERATIONS])
def test_localq_operation_is_routed_and_answers_openai_shaped(shared_client, op):
    assert_answered_by_the_operation(shared_client, op)


def test_localq_operations_include_the_jobs_and_queues_ones():
    assert {"listJobs", "getJob", "cancelJob", "streamJobEvents", "listQueues", "listWorkers", "tokenize",
            "detokenize"} <= {op["id"] for op in LOCALQ_OPERATIONS}


def assert_answered_by_the_operation(client, op: dict) -> None:
    response = _send(client, op)
    status = response.status_code
    where = f"{op['method']} {_url(op)} -> {status}: {response.data[:500]!r}"
    assert status != 405, f"the router does not accept this method: {where}"
    if 200 <= status < 300:
        return
    error = assert_error_shape(response)
    if status >= 500 and status != 501:
        assert (status, error["code"]) in TOLERATED_5XX, f"server error: {where}"
    if status == 404:
        assert error["code"] != "unknown_url", f"the router does not know this path: {where}"


def test_spec_operations_match_generated_table():
    require_spec()

    def key(method: str, path: str, query: dict | str) -> tuple[str, str]:
        query = urlencode(query) if isinstance(query, dict) else query
        return method.upper(), f"{path}?{query}" if query else path

    in_spec = {key(op["method"], op["path"], op["query"]) for op in SPEC_OPERATIONS}
    in_table = {key(op["method"], op["path"], op["query"]) for op in OPERATIONS if not op["localq"]}
    assert len(SPEC_OPERATIONS) == len(in_spec), "the upstream document lists an operation twice"
    assert sorted(in_spec - in_table) == [], "upstream operations missing from schemas.generated.OPERATIONS"
    assert sorted(in_table - in_spec) == [], "operations in schemas.generated.OPERATIONS the upstream lacks"


def test_spec_is_present_and_lists_operations():
    """Guard against a silently empty parametrization: if the file is there, it has operations."""
    path = require_spec()
    assert len(SPEC_OPERATIONS) > 100, f"only {len(SPEC_OPERATIONS)} operations found in {path}"
