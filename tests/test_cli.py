"""The `localq` command: models table, bind guard, `api`, `worker`, and `up` (with stand-ins and for real)."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from ops import cli
from ops.api_server import host_port
from ops.cli import main
from ops.commands import worker as worker_command
from ops.common import bind_refusal, is_loopback, redact_url, worker_argv

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    """Rich wraps tables to the terminal width; keep rows on one line."""
    monkeypatch.setenv("COLUMNS", "200")


def test_models_prints_table_of_default_configs(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for text in ("smollm2-135m-instruct", "gpt-4o-mini, gpt-3.5-turbo", "llama-cpp", "cpu"):
        assert text in out
    assert "all-minilm-l6-v2" in out
    assert "sentence-transformers" in out


def test_models_reports_bad_config(models_dir, write_model, capsys):
    path = write_model("chat.yaml", {"name": "chat", "device": "tpu"})
    assert main(["--models-dir", str(models_dir), "models"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err
    assert "device" in err


def test_up_refuses_public_bind_without_force(monkeypatch, capsys):
    monkeypatch.delenv("LOCALQ_API_KEYS", raising=False)
    monkeypatch.delenv("LOCALQ_API_KEYS_FILE", raising=False)
    assert main(["up", "--host", "0.0.0.0"]) != 0
    err = capsys.readouterr().err
    assert "refusing to bind 0.0.0.0" in err
    assert "--force-public" in err
    assert "LOCALQ_API_KEYS" in err


@pytest.mark.parametrize(
    ("host", "keys", "force", "refused"),
    [("127.0.0.1", False, False, False), ("localhost", False, False, False), ("::1", False, False, False),
     ("0.0.0.0", False, False, True), ("192.168.1.5", False, False, True), ("::", False, False, True),
     ("0.0.0.0", True, False, False), ("0.0.0.0", False, True, False)],
)
def test_bind_guard(host, keys, force, refused):
    assert (bind_refusal(host, keys, force) is not None) is refused


def test_bad_environment_setting_is_reported(monkeypatch, capsys):
    monkeypatch.setenv("LOCALQ_UNKNOWN_FIELDS", "sometimes")
    assert main(["models"]) == 2
    assert "LOCALQ_UNKNOWN_FIELDS" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.0.0.2", True), ("localhost", True), ("::1", True),
     ("[::1]", True), ("0.0.0.0", False), ("::", False), ("192.168.1.5", False),
     ("example.com", False)],
)
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


@pytest.mark.parametrize(
    ("host", "expected"),
    [("127.0.0.1", "127.0.0.1:8080"), ("::1", "[::1]:8080"), ("[::1]", "[::1]:8080")],
)
def test_host_port_brackets_ipv6(host, expected):
    assert host_port(host, 8080) == expected


# --- localq api -----------------------------------------------------------------------------


def test_api_defaults():
    args = cli._parser().parse_args(["api"])
    assert (args.workers, args.connections) == (1, 1000)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Lines:
    """Collect a pipe's lines on a thread, so a test can wait for one without blocking forever."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream):
        for line in stream:
            self._queue.put(line)
        self._queue.put(None)

    def _read(self, timeout: float):
        """Yield each new line (also kept in `lines`) until the stream ends or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            if line is None:
                return
            self.lines.append(line)
            yield line

    def wait_for(self, text: str, timeout: float) -> str:
        for line in self._read(timeout):
            if text in line:
                return line
        raise AssertionError(f"{text!r} not seen; got:\n{''.join(self.lines)}")

    def rest(self, timeout: float = 5) -> str:
        """Everything so far, reading on until the stream ends or `timeout` passes."""
        for _ in self._read(timeout):
            pass
        return "".join(self.lines)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def _wait_healthy(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            assert _get_json(f"http://127.0.0.1:{port}/healthz") == {"status": "ok"}
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_api_serves_until_ctrl_c():
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "ops.cli", "api", "--port", str(port), "--connections", "50"],
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        _wait_healthy(port)
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=30) == 0
    finally:
        _stop(server)


# --- localq worker --------------------------------------------------------------------------


def test_worker_argv():
    argv = worker_argv()
    assert argv[:6] == [sys.executable, "-m", "celery", "-A", "tasks.celery_app:app", "worker"]
    joined = " ".join(argv)
    for part in ("--pool prefork", "--concurrency 1", "--queues cpu", "--prefetch-multiplier 1",
                 "--hostname cpu@%h", "--without-gossip", "--without-mingle", "--loglevel WARNING"):
        assert part in joined
    gpu = " ".join(worker_argv("gpu, cpu", concurrency=2, name="big@%h", pool="solo", loglevel="debug"))
    for part in ("--queues gpu,cpu", "--concurrency 2", "--hostname big@%h", "--pool solo", "--loglevel DEBUG"):
        assert part in gpu
    assert "--hostname gpu@%h" in " ".join(worker_argv("gpu"))
    with pytest.raises(ValueError):
        worker_argv(" , ")


def test_worker_execs_celery(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(worker_command.os, "execv", lambda path, argv: calls.append((path, argv)))
    monkeypatch.setenv("LOCALQ_MODELS_DIR", str(REPO_ROOT / "models"))  # restored afterwards
    assert main(["--models-dir", str(tmp_path), "worker", "-Q", "gpu", "-c", "2"]) == 0
    [(path, argv)] = calls
    assert path == sys.executable
    assert argv == worker_argv("gpu", 2)
    assert os.environ["LOCALQ_MODELS_DIR"] == str(tmp_path.resolve())


def test_importing_the_cli_does_not_load_celery():
    code = "import sys, ops.cli; assert not {'celery', 'tasks.celery_app'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)


def test_importing_the_cli_loads_no_subcommand():
    """A subcommand's module (gunicorn's server, the launcher, `up`'s supervisor) loads when it runs."""
    late = {"ops.commands.api", "ops.commands.worker", "ops.commands.workers", "ops.commands.dead_letters",
            "ops.commands.models", "ops.up", "ops.launcher", "ops.api_server", "ops.tiny_models",
            "gunicorn.app.base", "openai"}
    code = f"import sys, ops.cli; loaded = set({sorted(late)!r}) & set(sys.modules); assert not loaded, loaded"
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)


# --- localq up, with stand-ins for the worker and the API ------------------------------------
# The stand-ins log what they saw to STANDIN_LOG: the Redis URL they were handed, and when
# they were asked to stop (the worker also checks that Redis was still up at that moment).

WORKER_STANDIN = r'''
import os, signal, socket, sys, time
from urllib.parse import urlsplit

LOG, URL = os.environ["STANDIN_LOG"], os.environ["LOCALQ_REDIS_URL"]

def log(line):
    with open(LOG, "a") as f:
        f.write(line + "\n")

def on_term(signum, frame):
    try:
        with socket.create_connection(("127.0.0.1", urlsplit(URL).port), timeout=2) as s:
            s.sendall(b"PING\r\n")
            alive = s.recv(16)[:1] in (b"+", b"-")  # PONG, or NOAUTH from a Redis asking for its password
    except OSError:
        alive = False
    log(f"worker-stop redis-alive={alive}")
    sys.exit(0)

signal.signal(signal.SIGTERM, on_term)
log("worker-env " + URL)
if os.environ.get("STANDIN_WORKER_EXIT"):
    time.sleep(float(os.environ["STANDIN_WORKER_EXIT"]))
    sys.exit(3)
while True:
    time.sleep(0.1)
'''

API_STANDIN = r'''
import os, signal, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"status": "ok"}')

    def log_message(self, *args):
        pass

def on_term(signum, frame):
    with open(os.environ["STANDIN_LOG"], "a") as f:
        f.write("api-stop\n")
    sys.exit(0)

signal.signal(signal.SIGTERM, on_term)
if os.environ.get("STANDIN_API_EXIT"):
    import threading
    threading.Timer(float(os.environ["STANDIN_API_EXIT"]), os._exit, (3,)).start()
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
'''

# `localq up` with its two child commands and the worker ping replaced (ops/up.py).
UP_WITH_STANDINS = r'''
import sys
import ops.cli as cli
import ops.up as up
from tests.test_cli import API_STANDIN, WORKER_STANDIN

up.worker_command = lambda: [sys.executable, "-c", WORKER_STANDIN]
up.api_command = lambda args, settings: [sys.executable, "-c", API_STANDIN, str(settings.port)]
up.ping_worker = lambda name, timeout=1.0: True
up.worker_preloaded = lambda name: True
sys.exit(cli.main(sys.argv[1:]))
'''


def _up(tmp_path, *flags, standins=True, redis_url=None, env_extra=None):
    """Start `localq up` on a free API port; returns (process, api port, stdout lines, stderr lines)."""
    port = _free_port()
    env = {**os.environ, "STANDIN_LOG": str(tmp_path / "standin.log"), "COLUMNS": "200", **(env_extra or {})}
    env.pop("LOCALQ_REDIS_URL", None)
    if redis_url:
        env["LOCALQ_REDIS_URL"] = redis_url
    argv = ["up", "--port", str(port), "--data-dir", str(tmp_path / "redis"), *flags]
    if "--redis-port" not in flags:
        argv += ["--redis-port", "0"]
    command = [sys.executable, "-c", UP_WITH_STANDINS] if standins else [sys.executable, "-m", "ops.cli"]
    process = subprocess.Popen(
        command + argv, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    return process, port, Lines(process.stdout), Lines(process.stderr)


def _standin_log(tmp_path) -> list[str]:
    return (tmp_path / "standin.log").read_text().splitlines()


def _redis_url_seen_by_worker(tmp_path) -> str:
    return next(line.split()[1] for line in _standin_log(tmp_path) if line.startswith("worker-env "))


def _port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_up_starts_redis_worker_api_and_stops_them_in_order(tmp_path, stop_signal):
    import redis

    from ops.redis_server import port_is_free

    up, port, out, err = _up(tmp_path)
    try:
        assert out.wait_for("localq ready on", timeout=60).strip() == f"localq ready on http://127.0.0.1:{port}"
        summary = "".join(out.lines)
        assert "(embedded, password in" in summary
        assert "smollm2-135m-instruct" in summary  # the models table
        assert "open (no API keys)" in summary
        assert _get_json(f"http://127.0.0.1:{port}/healthz") == {"status": "ok"}
        url = _redis_url_seen_by_worker(tmp_path)
        password = (tmp_path / "redis" / "password").read_text().strip()
        assert url == f"redis://:{password}@127.0.0.1:{_port_of(url)}/0"  # the worker was handed it
        assert redact_url(url) in summary and password not in summary + err.rest()  # never printed
        assert (tmp_path / "redis" / "password").stat().st_mode & 0o777 == 0o600
        assert redis.Redis.from_url(url).ping()  # the worker was handed the embedded Redis
        with pytest.raises(redis.AuthenticationError):  # and no one without the password gets in
            redis.Redis(port=_port_of(url)).ping()
        assert (tmp_path / "redis" / "redis.log").exists()

        up.send_signal(stop_signal)
        assert up.wait(timeout=60) == 0
        events = [line for line in _standin_log(tmp_path) if not line.startswith("worker-env")]
        assert events == ["api-stop", "worker-stop redis-alive=True"]  # API, worker, then Redis
        assert port_is_free(_port_of(url))
        assert port_is_free(port)
    finally:
        _stop(up)


def test_up_restarts_a_worker_that_exits_and_keeps_serving(tmp_path):
    up, port, out, err = _up(tmp_path, env_extra={"STANDIN_WORKER_EXIT": "0.5"})  # each start exits (3) soon
    try:
        out.wait_for("localq ready on", timeout=60)
        # started again after 1 s, then 2 s (ops.launcher.Backoff): three starts within a few seconds
        err.wait_for("restarted cpu@", timeout=30)
        err.wait_for("restarted cpu@", timeout=30)
        from ops.stack import wait_until

        wait_until(lambda: sum(line.startswith("worker-env") for line in _standin_log(tmp_path)) >= 3, 10,
                   "the third start of the worker")
        assert "exited with status 3" in "".join(err.lines)
        assert up.poll() is None
        assert _get_json(f"http://127.0.0.1:{port}/healthz") == {"status": "ok"}
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=60) == 0
        assert "api-stop" in _standin_log(tmp_path)
    finally:
        _stop(up)


def test_up_stops_everything_when_the_api_dies(tmp_path):
    from ops.redis_server import port_is_free

    up, port, out, err = _up(tmp_path, env_extra={"STANDIN_API_EXIT": "3"})
    try:
        assert up.wait(timeout=60) == 1
        assert "API exited unexpectedly (status 3)" in err.rest()
        assert "worker-stop redis-alive=True" in _standin_log(tmp_path)  # the worker, then Redis
        assert port_is_free(_port_of(_redis_url_seen_by_worker(tmp_path)))
        assert port_is_free(port)
    finally:
        _stop(up)


def test_up_uses_an_external_redis_without_starting_one(tmp_path):
    from ops.redis_server import RedisServer

    with RedisServer(tmp_path / "external") as external:
        up, port, out, err = _up(tmp_path, redis_url=external.url)
        try:
            out.wait_for("localq ready on", timeout=60)
            assert f"{redact_url(external.url)} (LOCALQ_REDIS_URL)" in "".join(out.lines)
            assert external.password not in "".join(out.lines)
            assert _redis_url_seen_by_worker(tmp_path) == external.url
            assert not (tmp_path / "redis").exists()
            up.send_signal(signal.SIGINT)
            assert up.wait(timeout=60) == 0
            assert external.ping()  # not ours to stop
        finally:
            _stop(up)


def test_up_reports_unreachable_external_redis(monkeypatch, capsys):
    monkeypatch.setenv("LOCALQ_REDIS_URL", f"redis://127.0.0.1:{_free_port()}/0")
    assert main(["up", "--port", str(_free_port())]) == 2
    assert "cannot reach Redis" in capsys.readouterr().err


def test_up_picks_another_redis_port_when_the_default_is_busy(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        up, port, out, err = _up(tmp_path, "--redis-port", str(taken))
        try:
            out.wait_for("localq ready on", timeout=60)
            assert _port_of(_redis_url_seen_by_worker(tmp_path)) != taken
            up.send_signal(signal.SIGINT)
            assert up.wait(timeout=60) == 0
            assert f"port {taken} is busy" in err.rest(timeout=1)
        finally:
            _stop(up)


def test_up_with_api_keys_may_bind_publicly_and_says_so(tmp_path):
    up, port, out, err = _up(tmp_path, "--host", "0.0.0.0", env_extra={"LOCALQ_API_KEYS": "sk-a,sk-b"})
    try:
        out.wait_for("localq ready on", timeout=60)
        assert "2 API key(s) required on /v1" in "".join(out.lines)
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=60) == 0
    finally:
        _stop(up)


# --- localq up, for real: embedded Redis, a Celery worker, gunicorn --------------------------


def test_up_end_to_end(tmp_path):
    from ops.redis_server import port_is_free

    up, port, out, err = _up(tmp_path, "--connections", "40", standins=False)
    try:
        out.wait_for("localq ready on", timeout=120)
        summary = "".join(out.lines)
        assert "queue cpu" in summary and ": ready" in summary, summary
        # ready means the `preload` models are in: loaded before any request asked for them
        import re

        import redis

        from store.heartbeats import live_workers

        redis_port = re.search(r"redis://:\*\*\*@127\.0\.0\.1:(\d+)/0", summary).group(1)
        password = (tmp_path / "redis" / "password").read_text().strip()
        with redis.Redis(port=int(redis_port), password=password, decode_responses=True) as store:
            (beat,) = live_workers(store)
        assert beat["preloaded"] and {"smollm2-135m-instruct", "all-minilm-l6-v2"} <= set(beat["loaded_models"])
        assert beat["jobs_done"] == 0
        base = f"http://127.0.0.1:{port}"
        assert _get_json(f"{base}/healthz") == {"status": "ok"}
        assert "gpt-4o-mini" in {model["id"] for model in _get_json(f"{base}/v1/models")["data"]}
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=90) == 0
        assert port_is_free(port)
    finally:
        _stop(up)


def test_up_restarts_a_killed_worker_and_the_service_keeps_answering(tmp_path):
    import re

    up, port, out, err = _up(tmp_path, standins=False)
    try:
        out.wait_for("localq ready on", timeout=120)
        worker = int(re.search(r"queue cpu, pid (\d+)\)", "".join(out.lines)).group(1))
        os.kill(worker, signal.SIGKILL)
        err.wait_for(f"(pid {worker}) was killed by SIGKILL", timeout=30)
        err.wait_for("restarted cpu@", timeout=30)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/embeddings", method="POST", headers={"Content-Type": "application/json"},
            data=json.dumps({"model": "text-embedding-3-small", "input": "after the restart"}).encode())
        with urllib.request.urlopen(request, timeout=180) as response:  # served by the new worker
            assert response.status == 200 and json.load(response)["data"][0]["embedding"]
        assert up.poll() is None
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=90) == 0
    finally:
        _stop(up)


@pytest.mark.parametrize(
    ("url", "shown"),
    [("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
     ("redis://:s3cret@cache:6380/1", "redis://:***@cache:6380/1"),
     ("rediss://app:s3cret@cache/0", "rediss://app:***@cache/0")],
)
def test_redis_passwords_are_not_printed(url, shown):
    assert redact_url(url) == shown
