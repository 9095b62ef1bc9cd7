"""`/v1/files` over a real Redis: upload, list, retrieve, download, delete, limits, and durability.

Most tests use the Flask test client over an app whose Redis and files folder live in a tmp dir;
one runs the API as a real process and talks to it with the official `openai` SDK.
"""

from __future__ import annotations

import io
import os
import socket
import time

import pytest
import redis

from api.app import create_app
from api.settings import Settings
from ops.redis_server import RedisServer
from store.filestore import (
    EXPIRING_KEY,
    INDEX_KEY,
    TMP_PREFIX,
    FileStore,
    FileTooLarge,
    file_key,
    purpose_key,
    valid_file_id,
)
from tests.service import running_service

MiB = 1024 * 1024
MULTIPART = "multipart/form-data"


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def rclient(redis_server):
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    client.flushall()
    return client


@pytest.fixture
def make_app(redis_server, rclient, tmp_path):
    def make(**env):
        base = {"LOCALQ_REDIS_URL": redis_server.url, "LOCALQ_FILES_DIR": str(tmp_path / "files")}
        return create_app(Settings.from_env({**base, **env}))

    return make


@pytest.fixture
def client(make_app):
    return make_app().test_client()


@pytest.fixture
def files_dir(tmp_path):
    return tmp_path / "files"


def upload(client, content: bytes = b"hello", filename: str = "a.txt", purpose: str = "user_data", **fields):
    data = {"purpose": purpose, "file": (io.BytesIO(content), filename), **fields}
    return client.post("/v1/files", data=data, content_type=MULTIPART)


def uploaded(client, *args, **kwargs) -> dict:
    response = upload(client, *args, **kwargs)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def assert_error(response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert response.status_code == status, response.data[:500]
    error = response.get_json()["error"]
    assert error.keys() == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error


def leftovers(files_dir) -> list[str]:
    return sorted(p.name for p in files_dir.iterdir()) if files_dir.exists() else []


# ---------------------------------------------------------------------------------------------
# Round trip.
# ---------------------------------------------------------------------------------------------


def test_upload_download_delete_round_trip(client, rclient, files_dir):
    content = os.urandom(3 * MiB + 17)
    created = uploaded(client, content, "data.bin", "assistants")
    assert valid_file_id(created["id"]) and len(created["id"]) >= 5 + 24
    assert created == {
        "id": created["id"], "object": "file", "bytes": len(content), "created_at": created["created_at"],
        "filename": "data.bin", "purpose": "assistants", "status": "processed",
    }  # no expires_at or status_details: unset, and OpenAI's schema has no null for them
    assert abs(created["created_at"] - time.time()) < 10
    assert client.get(f"/v1/files/{created['id']}").get_json() == created

    download = client.get(f"/v1/files/{created['id']}/content")
    assert download.status_code == 200 and download.mimetype == "application/octet-stream"
    assert download.is_streamed and download.content_length == len(content)
    assert download.data == content
    assert "attachment" in download.headers["Content-Disposition"]

    # Persistent metadata: no TTL on the record or the indexes.
    assert rclient.ttl(file_key(created["id"])) == -1 and rclient.ttl(INDEX_KEY) == -1
    assert leftovers(files_dir) == [created["id"]]

    deleted = client.delete(f"/v1/files/{created['id']}")
    assert deleted.status_code == 200
    assert deleted.get_json() == {"id": created["id"], "object": "file", "deleted": True}
    assert leftovers(files_dir) == []
    assert not rclient.exists(file_key(created["id"]))
    assert rclient.zscore(INDEX_KEY, created["id"]) is None
    assert rclient.zscore(purpose_key("assistants"), created["id"]) is None
    for method, url in (("GET", ""), ("GET", "/content"), ("DELETE", "")):
        assert_error(client.open(f"/v1/files/{created['id']}{url}", method=method), 404, "file_not_found", "id")


def test_unicode_filename_is_kept_and_served(client):
    created = uploaded(client, b"x", "résumé 東京.txt")
    assert created["filename"] == "résumé 東京.txt"
    download = client.get(f"/v1/files/{created['id']}/content")
    assert "filename*=UTF-8''r%C3%A9sum%C3%A9%20%E6%9D%B1%E4%BA%AC.txt" in download.headers["Content-Disposition"]


def test_empty_file_is_400(client, files_dir):
    assert_error(upload(client, b""), 400, "empty_file", "file")
    assert leftovers(files_dir) == []


def test_unknown_purpose_is_400(client):
    assert_error(upload(client, purpose="batch_output"), 400, param="purpose")
    assert_error(upload(client, purpose="nope"), 400, param="purpose")


# ---------------------------------------------------------------------------------------------
# Listing.
# ---------------------------------------------------------------------------------------------


def test_list_orders_paginates_and_filters(client):
    ids = [uploaded(client, f"{i}".encode(), f"{i}.txt", "user_data" if i % 2 else "assistants")["id"]
           for i in range(7)]
    newest_first = list(reversed(ids))

    everything = client.get("/v1/files").get_json()
    assert [f["id"] for f in everything["data"]] == newest_first
    assert everything["object"] == "list" and everything["has_more"] is False
    assert everything["first_id"] == newest_first[0] and everything["last_id"] == newest_first[-1]

    # Walk desc pages of 3 with `after`.
    seen, after = [], None
    pages = 0
    while True:
        query = {"limit": 3, **({"after": after} if after else {})}
        page = client.get("/v1/files", query_string=query).get_json()
        pages += 1
        seen += [f["id"] for f in page["data"]]
        assert page["first_id"] == page["data"][0]["id"] and page["last_id"] == page["data"][-1]["id"]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert seen == newest_first and pages == 3

    asc = client.get("/v1/files", query_string={"order": "asc", "limit": 4}).get_json()
    assert [f["id"] for f in asc["data"]] == ids[:4] and asc["has_more"] is True
    rest = client.get("/v1/files", query_string={"order": "asc", "after": asc["last_id"]}).get_json()
    assert [f["id"] for f in rest["data"]] == ids[4:] and rest["has_more"] is False

    odd = client.get("/v1/files", query_string={"purpose": "user_data"}).get_json()
    assert [f["id"] for f in odd["data"]] == [ids[5], ids[3], ids[1]]
    assert all(f["purpose"] == "user_data" for f in odd["data"])
    page = client.get("/v1/files", query_string={"purpose": "assistants", "limit": 2, "after": ids[4]}).get_json()
    assert [f["id"] for f in page["data"]] == [ids[2], ids[0]] and page["has_more"] is False
    assert client.get("/v1/files", query_string={"purpose": "vision"}).get_json() == {
        "object": "list", "data": [], "first_id": "", "last_id": "", "has_more": False}  # the schema requires strings


def test_list_bad_arguments(client):
    for limit in (0, 10001, -1):
        assert_error(client.get("/v1/files", query_string={"limit": limit}), 400, param="limit")
    assert_error(client.get("/v1/files", query_string={"order": "sideways"}), 400, param="order")
    assert_error(client.get("/v1/files", query_string={"after": "file-" + "A" * 24}), 404, "file_not_found", "after")
    assert_error(client.get("/v1/files", query_string={"after": "../../etc"}), 404, "file_not_found", "after")


# ---------------------------------------------------------------------------------------------
# Batch rules and size limits.
# ---------------------------------------------------------------------------------------------


def test_batch_purpose_needs_jsonl(client, files_dir):
    assert_error(upload(client, b"{}\n", "input.json", "batch"), 400, "invalid_file_format", "file")
    assert_error(upload(client, b"{}\n", "input", "batch"), 400, "invalid_file_format", "file")
    assert leftovers(files_dir) == []
    assert uploaded(client, b"{}\n", "input.JSONL", "batch")["purpose"] == "batch"


def test_batch_limit_is_checked_while_copying(make_app, files_dir):
    client = make_app(LOCALQ_MAX_BATCH_FILE_BYTES="1000").test_client()
    error = assert_error(upload(client, b"x" * 1001, "big.jsonl", "batch"), 413, "file_too_large", "file")
    assert "1000" in error["message"]
    assert leftovers(files_dir) == []  # no temp file, no half file
    assert uploaded(client, b"x" * 1000, "ok.jsonl", "batch")["bytes"] == 1000
    assert uploaded(client, b"x" * 1001, "ok.txt", "user_data")["bytes"] == 1001  # only batch is capped


class ExplodingStream(io.BytesIO):
    """A request body that fails the test if anyone reads it."""

    def read(self, *args):
        raise AssertionError("the body was read")

    read1 = readline = readinto = read


def test_content_length_over_the_file_limit_is_413_before_reading(client):
    response = client.post(
        "/v1/files", input_stream=ExplodingStream(), content_type=MULTIPART + "; boundary=x",
        environ_overrides={"CONTENT_LENGTH": str(600 * MiB)},
    )
    assert_error(response, 413, "request_too_large")


def test_file_limit_replaces_the_app_wide_request_limit(make_app, files_dir):
    client = make_app(LOCALQ_MAX_REQUEST_BYTES=str(64 * 1024), LOCALQ_MAX_FILE_BYTES=str(MiB)).test_client()
    # Over the app-wide limit, under the file limit: accepted.
    assert uploaded(client, b"y" * (512 * 1024), "half.bin")["bytes"] == 512 * 1024
    # Other operations keep the app-wide limit.
    chat = client.post("/v1/chat/completions", data=b"{" + b" " * (128 * 1024) + b"}", content_type="application/json")
    assert_error(chat, 413, "request_too_large")
    # Over the file limit, within the multipart allowance: rejected by the copy.
    assert_error(upload(client, b"z" * (MiB + 1), "over.bin"), 413, "file_too_large", "file")
    # Over the file limit plus the allowance: rejected by Content-Length.
    assert_error(upload(client, b"z" * (2 * MiB + 10), "way-over.bin"), 413, "request_too_large")
    assert len(leftovers(files_dir)) == 1


# ---------------------------------------------------------------------------------------------
# Ids from clients.
# ---------------------------------------------------------------------------------------------

BAD_IDS = ["file-..", "file-..%2F..%2Fetc", "file-../../etc/passwd", "..", "file-", "file-short",
           "file-" + "A" * 23, "file-" + "A" * 23 + ".", "file-" + "A" * 24 + "%00", "file-%2e%2e%2f%2e%2e",
           "file-" + "A" * 24 + "/..", "x1"]


@pytest.mark.parametrize("file_id", BAD_IDS)
def test_malformed_or_traversing_ids_are_404(client, file_id):
    for method, suffix in (("GET", ""), ("GET", "/content"), ("DELETE", "")):
        response = client.open(f"/v1/files/{file_id}{suffix}", method=method)
        assert response.status_code == 404, (method, file_id, response.data)
        assert response.get_json()["error"]["type"] == "invalid_request_error"


def test_store_never_touches_a_path_for_a_bad_id(rclient, tmp_path):
    store = FileStore(rclient, tmp_path / "files")
    (tmp_path / "secret").write_text("no")
    for bad in ("../secret", "file-../../secret", "file-" + "A" * 24 + "/../../secret", None, 42):
        assert store.get(bad) is None and store.delete(bad) is False
        with pytest.raises(LookupError):
            store.path(bad)
    assert (tmp_path / "secret").exists()


# ---------------------------------------------------------------------------------------------
# Expiry.
# ---------------------------------------------------------------------------------------------


def test_expires_after_sets_expires_at_and_expired_files_are_gone(client, rclient, files_dir):
    policy = '{"anchor": "created_at", "seconds": 3600}'
    created = uploaded(client, b"{}\n", "in.jsonl", "batch", expires_after=policy)
    assert created["expires_at"] == created["created_at"] + 3600
    keep = uploaded(client, b"keep")
    assert_error(upload(client, expires_after='{"anchor": "created_at", "seconds": 10}'), 400)

    rclient.hset(file_key(created["id"]), "expires_at", int(time.time()) - 1)  # as if an hour passed
    rclient.zadd(EXPIRING_KEY, {created["id"]: int(time.time()) - 1})
    assert_error(client.get(f"/v1/files/{created['id']}"), 404, "file_not_found")
    assert_error(client.get(f"/v1/files/{created['id']}/content"), 404, "file_not_found")
    assert [f["id"] for f in client.get("/v1/files").get_json()["data"]] == [keep["id"]]
    assert leftovers(files_dir) == [keep["id"]] and not rclient.exists(file_key(created["id"]))


def test_expires_after_as_form_encoders_send_it(client):
    """The openai SDK writes nested form fields as `expires_after[anchor]`, `expires_after[seconds]`."""
    created = uploaded(client, b"{}\n", "in.jsonl", "batch",
                       **{"expires_after[anchor]": "created_at", "expires_after[seconds]": "7200"})
    assert created["expires_at"] == created["created_at"] + 7200


def test_list_purges_expired_files(rclient, tmp_path):
    store = FileStore(rclient, tmp_path / "files")
    short = store.create(purpose="user_data", filename="s", source=b"s", expires_after=3600)
    store.create(purpose="user_data", filename="l", source=b"l")
    assert store.purge_expired(now=time.time() + 3601) == 1
    assert store.get(short["id"]) is None and not (tmp_path / "files" / short["id"]).exists()
    assert [f["filename"] for f in store.list()[0]] == ["l"]


# ---------------------------------------------------------------------------------------------
# The store on its own (as a batch worker uses it).
# ---------------------------------------------------------------------------------------------


def test_store_writes_from_chunks_files_and_bytes(rclient, tmp_path):
    store = FileStore(rclient, tmp_path / "files")
    lines = [b'{"id": %d}\n' % i for i in range(1000)]
    from_chunks = store.create(purpose="batch_output", filename="out.jsonl", source=iter(lines))
    assert from_chunks["bytes"] == sum(map(len, lines)) and from_chunks["purpose"] == "batch_output"
    assert store.path(from_chunks["id"]).read_bytes() == b"".join(lines)
    from_file = store.create(purpose="user_data", filename="f", source=io.BytesIO(b"abc" * MiB))
    with store.open(from_file["id"]) as handle:
        assert handle.read() == b"abc" * MiB
    with pytest.raises(FileTooLarge):
        store.create(purpose="user_data", filename="g", source=iter([b"a" * 600, b"b" * 600]), max_bytes=1000)
    with pytest.raises(ValueError):
        store.create(purpose="nope", filename="h", source=b"x")
    assert not [p for p in (tmp_path / "files").iterdir() if p.name.startswith(TMP_PREFIX)]
    assert len(list((tmp_path / "files").iterdir())) == 2
    assert store.list(limit=1) == ([store.get(from_file["id"])], True)


def test_metadata_failure_removes_the_bytes(tmp_path):
    dead = redis.Redis(port=1, decode_responses=True)  # nothing listens there
    store = FileStore(dead, tmp_path / "files")
    with pytest.raises(redis.ConnectionError):
        store.create(purpose="user_data", filename="x", source=b"x")
    assert list((tmp_path / "files").iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Durability: a Redis restart (AOF) keeps every file.
# ---------------------------------------------------------------------------------------------


def test_files_survive_a_redis_restart(tmp_path):
    with RedisServer(tmp_path / "redis") as server:
        env = {"LOCALQ_REDIS_URL": server.url, "LOCALQ_FILES_DIR": str(tmp_path / "files")}
        client = create_app(Settings.from_env(env)).test_client()
        content = os.urandom(100_000)
        created = uploaded(client, content, "keep.bin")
        server.restart()
        client = create_app(Settings.from_env(env)).test_client()  # a fresh process's view
        assert client.get(f"/v1/files/{created['id']}").get_json() == created
        assert client.get(f"/v1/files/{created['id']}/content").data == content
        assert [f["id"] for f in client.get("/v1/files").get_json()["data"]] == [created["id"]]


# ---------------------------------------------------------------------------------------------
# End to end: the official SDK against a real API process.
# ---------------------------------------------------------------------------------------------


def test_openai_sdk_end_to_end(tmp_path):
    from openai import NotFoundError, OpenAI

    files_dir = tmp_path / "files"
    with running_service(tmp_path, {"LOCALQ_FILES_DIR": str(files_dir)}, workers=()) as svc:
        sdk = OpenAI(base_url=svc.base_url + "/v1", api_key="unused", max_retries=0)
        content = os.urandom(2 * MiB)
        first = sdk.files.create(file=("one.bin", content), purpose="user_data")
        batch = sdk.files.create(file=("requests.jsonl", b'{"custom_id": "a"}\n'), purpose="batch")
        assert first.bytes == len(content) and first.filename == "one.bin" and first.status == "processed"
        assert sdk.files.retrieve(first.id) == first

        listed = sdk.files.list()
        assert [f.id for f in listed.data] == [batch.id, first.id]
        assert [f.id for f in sdk.files.list(purpose="batch")] == [batch.id]
        assert [f.id for f in sdk.files.list(limit=1, order="asc")] == [first.id, batch.id]  # auto-pagination

        assert sdk.files.content(first.id).read() == content
        with sdk.files.with_streaming_response.content(first.id) as response:
            assert b"".join(response.iter_bytes(64 * 1024)) == content

        gone = sdk.files.delete(first.id)
        assert gone.deleted is True and gone.id == first.id
        with pytest.raises(NotFoundError):
            sdk.files.retrieve(first.id)
        with pytest.raises(NotFoundError):
            sdk.files.content("file-../../etc/passwd")
        assert sorted(p.name for p in files_dir.iterdir()) == [batch.id]

        # A Content-Length over the limit is refused without the body being sent.
        host, port = svc.base_url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (600 * MiB))
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 413") and b"request_too_large" in reply
