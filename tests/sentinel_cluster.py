"""A Redis primary, one replica and three sentinels, all local `redis-server` processes.

For the failover tests: `url` is the `sentinel://` URL localq is given, `kill_primary()` SIGKILLs
the current primary, and `wait_failover()` waits until the sentinels name another one.
"""

from __future__ import annotations

import secrets
import signal
import subprocess
import time
from pathlib import Path

import redis

from ops.redis_server import HOST, RedisServer, child_preexec, find_redis_server, free_port

MASTER = "localq"


class SentinelCluster:
    def __init__(self, folder: Path, *, down_after_ms: int = 1000, failover_timeout_ms: int = 10_000):
        self.folder = folder
        self.password = secrets.token_urlsafe(24)
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.servers: list[RedisServer] = []
        self.sentinels: list[tuple[int, subprocess.Popen]] = []
        self.lost_bytes = 0
        self.killed_at = 0.0  # monotonic time of the last kill
        self.probed = (None, None)

    @property
    def url(self) -> str:
        hosts = ",".join(f"{HOST}:{port}" for port, _ in self.sentinels)
        return f"sentinel://:{self.password}@{hosts}/0?master_name={MASTER}"

    def start(self) -> SentinelCluster:
        auth = (f"masterauth {self.password}",)
        primary = RedisServer(self.folder / "primary", password=self.password, config=auth).start()
        self.servers.append(primary)
        replica = RedisServer(self.folder / "replica", password=self.password,
                              config=auth + (f"replicaof {HOST} {primary.port}",)).start()
        self.servers.append(replica)
        for index in range(3):
            self.sentinels.append(self._start_sentinel(index, primary.port))
        self._wait(lambda: all(self._knows_everyone(port) for port, _ in self.sentinels), 30,
                   "the sentinels to know the replica and each other")
        return self

    def _start_sentinel(self, index: int, primary_port: int) -> tuple[int, subprocess.Popen]:
        folder = self.folder / f"sentinel-{index}"
        folder.mkdir(parents=True)
        port = free_port()
        conf = folder / "sentinel.conf"
        conf.write_text("\n".join([
            f"port {port}", f"bind {HOST}", "daemonize no", f"dir {folder}", "logfile sentinel.log",
            f"sentinel monitor {MASTER} {HOST} {primary_port} 2",
            f"sentinel auth-pass {MASTER} {self.password}",
            f"sentinel down-after-milliseconds {MASTER} {self.down_after_ms}",
            f"sentinel failover-timeout {MASTER} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {MASTER} 1", "",
        ]))
        conf.chmod(0o600)
        process = subprocess.Popen([str(find_redis_server()), str(conf), "--sentinel"], cwd=folder,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   process_group=0, preexec_fn=child_preexec())
        self._wait(lambda: self._sentinel(port).ping(), 15, f"sentinel {index}")
        return port, process

    def _sentinel(self, port: int) -> redis.Redis:
        return redis.Redis(host=HOST, port=port, socket_timeout=1, socket_connect_timeout=1, decode_responses=True)

    def _knows_everyone(self, port: int) -> bool:
        master = self._sentinel(port).sentinel_master(MASTER)
        return master["num-slaves"] >= 1 and master["num-other-sentinels"] >= 2

    def primary_port(self) -> int:
        """The primary's port as the first sentinel that answers names it."""
        for port, _ in self.sentinels:
            try:
                return int(self._sentinel(port).sentinel_get_master_addr_by_name(MASTER)[1])
            except redis.RedisError:
                continue
        raise RuntimeError("no sentinel answered")

    def server(self, port: int) -> RedisServer:
        return next(server for server in self.servers if server.port == port)

    def client(self, port: int | None = None) -> redis.Redis:
        """A client of the server on `port` (default: the current primary)."""
        return redis.Redis(host=HOST, port=port or self.primary_port(), password=self.password,
                           decode_responses=True, socket_timeout=5)

    def kill_primary(self) -> int:
        """SIGKILL the primary (no chance to flush anything); returns its port."""
        port = self.primary_port()
        server = self.server(port)
        self.killed_at = time.monotonic()
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
        server.process = None
        return port

    def kill_primary_losing_writes(self, seconds: float, probe=None, longest: float = 8.0) -> int:
        """What asynchronous replication can do, on purpose: the replica stops receiving (its link is
        cut, and it cannot authenticate again), the primary goes on acknowledging writes for
        `seconds`, and, with `probe`, until `probe(primary)` has changed (at most `longest` seconds),
        then is SIGKILLed; the replica is promoted without those writes. Returns the old port.
        `self.probed` holds the probe's value at the cut and just before the kill."""
        port = self.primary_port()
        replica = next(server for server in self.servers if server.port != port and server.running)
        primary, follower = self.client(port), self.client(replica.port)
        follower.config_set("masterauth", "not-the-password")
        try:
            primary.client_kill_filter(_type="replica")
            at_cut = probe(primary) if probe else None
            time.sleep(seconds)
            deadline = time.monotonic() + longest - seconds
            while probe is not None and probe(primary) == at_cut and time.monotonic() < deadline:
                time.sleep(0.05)
            at_kill = probe(primary) if probe else None
            written = primary.info("replication")["master_repl_offset"]
            self.killed_at = time.monotonic()
            self.server(port).process.send_signal(signal.SIGKILL)
        finally:
            follower.config_set("masterauth", self.password)
        self.probed = (at_cut, at_kill)
        server = self.server(port)
        server.process.wait()
        server.process = None
        kept = follower.info("replication")["master_repl_offset"]
        self.lost_bytes = written - kept  # of the replication stream: the writes the failover takes back
        return port

    def wait_failover(self, old_port: int, timeout: float = 60) -> float:
        """Until every sentinel names a primary other than `old_port` and it accepts writes; the
        monotonic time that first held."""
        def promoted() -> bool:
            ports = {int(self._sentinel(port).sentinel_get_master_addr_by_name(MASTER)[1])
                     for port, _ in self.sentinels}
            if len(ports) != 1 or old_port in ports:
                return False
            return self.client(ports.pop()).info("replication")["role"] == "master"
        self._wait(promoted, timeout, "the failover")
        return time.monotonic()

    def stop(self) -> None:
        for _, process in self.sentinels:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(5)
                except subprocess.TimeoutExpired:
                    process.kill()
        for server in self.servers:
            server.stop()

    def __enter__(self) -> SentinelCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @staticmethod
    def _wait(check, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if check():
                    return
            except (redis.RedisError, OSError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"timed out waiting for {what}")
