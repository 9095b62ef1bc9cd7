"""Files made for `url` responses: the bytes in the file store's folder, not in Redis; Redis keeps only
their type and owner, with the expiry; the sweep deletes the bytes of expired ones."""

from __future__ import annotations

import os
import time

import pytest
import redis

from ops.redis_server import RedisServer
from store.files import GENERATED_PREFIX, generated_file, publish_outputs
from store.spill import purge_older
from workers.files import FileOutput


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with RedisServer(tmp_path_factory.mktemp("generated"), appendonly=False) as server:
        yield redis.Redis.from_url(server.url, decode_responses=True)


def test_a_generated_file_lives_on_disk_and_redis_keeps_only_its_record(client, tmp_path):
    picture = os.urandom(300_000)  # a picture's worth of bytes
    result = {"created": 1, "data": [{"url": FileOutput(picture, "image/png", "png")}]}
    published = publish_outputs(client, result, lambda name: f"http://h/generated/{name}", 60, "proj_a",
                                folder=tmp_path)
    url = published["data"][0]["url"]
    name = url.rsplit("/", 1)[1]
    assert url.startswith("http://h/generated/") and name.endswith(".png")
    assert (tmp_path / name).read_bytes() == picture and not list(tmp_path.glob(".*.part"))
    assert client.memory_usage(GENERATED_PREFIX + name) < 1024, "the bytes are not in Redis"
    assert 0 < client.ttl(GENERATED_PREFIX + name) <= 60
    assert generated_file(client, name, tmp_path) == (picture, "image/png", "proj_a")
    client.delete(GENERATED_PREFIX + name)  # expired
    assert generated_file(client, name, tmp_path) is None
    assert generated_file(client, "missing.png", tmp_path) is None


def test_the_bytes_of_expired_files_are_deleted(tmp_path):
    (tmp_path / "old.png").write_bytes(b"x")
    (tmp_path / "new.png").write_bytes(b"y")
    past = time.time() - 7200
    os.utime(tmp_path / "old.png", (past, past))
    assert purge_older(tmp_path, 3600) == 1
    assert [path.name for path in tmp_path.iterdir()] == ["new.png"]
    assert purge_older(tmp_path / "nothing-yet", 3600) == 0
