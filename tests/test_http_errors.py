"""What the HTTP server itself answers, over raw sockets against the real `localq api` (gunicorn):
malformed request lines, headers and chunked bodies, and chunked bodies over the size limit,
all with OpenAI's error envelope as JSON, never an HTML page or a 500.
"""

from __future__ import annotations

import json

import pytest
from gunicorn.http import errors as http_errors
from gunicorn.workers.ggevent import GeventWorker

from ops import api_server
from tests.raw_http import assert_openai_error, connect, exchange, read_reply, request_head
from tests.service import running_service

LIMIT = 64 * 1024  # LOCALQ_MAX_REQUEST_BYTES of this module's API
FILE_LIMIT = 1024  # LOCALQ_MAX_FILE_BYTES: `POST /v1/files` takes this plus 1 MiB of multipart room


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    env = {"LOCALQ_MAX_REQUEST_BYTES": str(LIMIT), "LOCALQ_MAX_FILE_BYTES": str(FILE_LIMIT)}
    with running_service(tmp_path_factory.mktemp("http-errors"), env, workers=()) as service:
        yield service.base_url


def chunked_head(path: str, content_type: str = "application/json") -> bytes:
    return request_head("POST", path, {"Content-Type": content_type, "Transfer-Encoding": "chunked"})


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def test_a_bad_chunk_size_is_a_400(base_url):
    raw = chunked_head("/v1/embeddings") + b"zz\r\n{}\r\n0\r\n\r\n"
    assert_openai_error(exchange(base_url, raw), 400, "invalid_body")


def test_a_chunk_without_its_terminator_is_a_400(base_url):
    raw = chunked_head("/v1/embeddings") + b"2\r\n{}XX0\r\n\r\n"
    assert_openai_error(exchange(base_url, raw), 400, "invalid_body")


def test_a_chunked_body_at_the_limit_is_read(base_url):
    # Exactly LIMIT bytes of JSON: parsed and validated (the unknown field is named), not refused as too large.
    prefix, suffix = b'{"model": "m", "input": "x", "pad": "', b'"}'
    body = prefix + b"a" * (LIMIT - len(prefix) - len(suffix)) + suffix
    assert len(body) == LIMIT
    raw = chunked_head("/v1/embeddings") + chunk(body[:1000]) + chunk(body[1000:]) + b"0\r\n\r\n"
    error = assert_openai_error(exchange(base_url, raw), 400)
    assert error["param"] == "pad", error


def test_a_chunked_json_body_over_the_limit_is_413_before_its_end(base_url):
    # More than the limit, and the body never ends: the answer must come at the limit.
    body = b'{"input": "' + b"a" * (2 * LIMIT)
    with connect(base_url) as sock:
        sock.sendall(chunked_head("/v1/embeddings") + chunk(body))
        assert_openai_error(read_reply(sock), 413, "request_too_large")


def test_a_chunked_json_body_one_byte_over_the_limit_is_413(base_url):
    body = json.dumps({"model": "m", "input": "x" * LIMIT}).encode()[: LIMIT + 1]
    raw = chunked_head("/v1/embeddings") + chunk(body) + b"0\r\n\r\n"
    assert_openai_error(exchange(base_url, raw), 413, "request_too_large")


def test_a_chunked_upload_over_the_file_limit_is_413_before_its_end(base_url):
    boundary = "b0undary"
    head = chunked_head("/v1/files", f"multipart/form-data; boundary={boundary}")
    part = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jsonl\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    with connect(base_url) as sock:
        sock.sendall(head + chunk(part))
        for _ in range(3):  # 3 MiB of file, over 1 MiB + FILE_LIMIT, and no end
            sock.sendall(chunk(b"x" * (1024 * 1024)))
        assert_openai_error(read_reply(sock), 413, "request_too_large")


def test_a_request_line_too_long_is_414(base_url):
    raw = request_head("GET", "/v1/models?q=" + "a" * 20_000, {})
    assert_openai_error(exchange(base_url, raw, method="GET"), 414, "uri_too_long")


@pytest.mark.parametrize("headers", [
    {"X-Big": "a" * 20_000},
    {f"X-Many-{i}": "a" for i in range(200)},
], ids=["one-huge-header", "too-many-headers"])
def test_headers_too_large_are_431(base_url, headers):
    raw = request_head("GET", "/v1/models", headers)
    assert_openai_error(exchange(base_url, raw, method="GET"), 431, "headers_too_large")


@pytest.mark.parametrize("raw", [
    b"NOT A REQUEST\r\n\r\n",
    b"GET /v1/models HTTP/9.9\r\nHost: x\r\n\r\n",
    b"GET /v1/models HTTP/1.1\r\nBad Header: x\r\n\r\n",
    b"GET /v1/models HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
], ids=["request-line", "http-version", "header-name", "two-lengths"])
def test_malformed_requests_are_400(base_url, raw):
    assert_openai_error(exchange(base_url, raw, method="GET"), 400, "bad_request")


def test_an_unknown_transfer_coding_is_501(base_url):
    raw = request_head("POST", "/v1/embeddings", {"Content-Type": "application/json", "Transfer-Encoding": "x-custom"})
    assert_openai_error(exchange(base_url, raw), 501, "unsupported_transfer_encoding")


# --- the pieces, without a server ------------------------------------------------------------


def test_gunicorn_runs_the_gevent_api_worker():
    from gunicorn.util import load_class

    options = api_server.gunicorn_options("::1", 8080, workers=2, connections=500)
    assert load_class(options["worker_class"]) is api_server.ApiWorker
    assert issubclass(api_server.ApiWorker, GeventWorker)
    assert (options["bind"], options["workers"], options["worker_connections"]) == ("[::1]:8080", 2, 500)
    assert options["keepalive"] > 2 and options["timeout"] >= 300


@pytest.mark.parametrize("exc, status, code", [
    (http_errors.LimitRequestLine(9000, 4094), 414, "uri_too_long"),
    (http_errors.LimitRequestHeaders("too many"), 431, "headers_too_large"),
    (http_errors.InvalidRequestLine("x"), 400, "bad_request"),
    (http_errors.InvalidRequestMethod("x"), 400, "bad_request"),
    (http_errors.InvalidHTTPVersion("x"), 400, "bad_request"),
    (http_errors.InvalidHeader("x"), 400, "bad_request"),
    (http_errors.InvalidHeaderName("x"), 400, "bad_request"),
    (http_errors.ObsoleteFolding("x"), 400, "bad_request"),
    (http_errors.InvalidProxyLine("x"), 400, "bad_request"),
    (http_errors.InvalidSchemeHeaders(), 400, "bad_request"),
    (http_errors.InvalidChunkSize("zz"), 400, "invalid_body"),
    (http_errors.ChunkMissingTerminator(b"xx"), 400, "invalid_body"),
    (http_errors.UnsupportedTransferCoding("br"), 501, "unsupported_transfer_encoding"),
    (http_errors.ExpectationFailed("x"), 417, "expectation_failed"),
    (http_errors.ForbiddenProxyRequest("1.2.3.4"), 403, "forbidden"),
])
def test_each_gunicorn_refusal_has_an_openai_answer(exc, status, code):
    err = api_server.server_error(exc)
    assert (err.status, err.code) == (status, code)
    raw = api_server.error_bytes(err)
    head, body = raw.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 %d " % status) and b"Content-Type: application/json" in head
    assert f"Content-Length: {len(body)}".encode() in head and b"Connection: close" in head
    assert json.loads(body) == err.body()


def test_the_apps_own_faults_are_not_the_clients():
    assert api_server.server_error(http_errors.InvalidResponseHeader("X-Bad")) is None
    assert api_server.server_error(http_errors.ConfigurationProblem("x")) is None
    assert api_server.server_error(RuntimeError("boom")) is None
