"""Worker heartbeats in Redis: who is alive, on what device, holding which models, running what.

Each worker's pool process writes its heartbeat (a JSON document) every `interval` seconds to
`localq:worker:<id>` with a TTL of three intervals, and scores its id by the time in the sorted
set `localq:workers`. A worker whose key has expired is gone: `live_workers` lists only the
others. A worker that stops cleanly removes itself at once, so readiness changes without waiting
for the TTL. Dispatch, `GET /v1/workers`, `/readyz`, `/metrics` and `localq workers` read them.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable

import redis

log = logging.getLogger(__name__)

INDEX = "localq:workers"
FORGET_AFTER = 3600.0  # index entries of workers gone this long are pruned


def worker_key(worker_id: str) -> str:
    return f"localq:worker:{worker_id}"


def ttl_for(interval: float) -> float:
    return max(3 * interval, 3.0)


def publish(client: redis.Redis, beat: dict, interval: float) -> None:
    now = time.time()
    beat = {**beat, "last_heartbeat": int(now)}
    pipe = client.pipeline(transaction=False)
    pipe.set(worker_key(beat["id"]), json.dumps(beat), px=int(ttl_for(interval) * 1000))
    pipe.zadd(INDEX, {beat["id"]: now})
    pipe.execute()


def remove(client: redis.Redis, worker_id: str) -> None:
    pipe = client.pipeline(transaction=False)
    pipe.delete(worker_key(worker_id))
    pipe.zrem(INDEX, worker_id)
    pipe.execute()


def live_workers(client: redis.Redis) -> list[dict]:
    """The heartbeats of every worker alive now, ordered by id (two round trips)."""
    now = time.time()
    pipe = client.pipeline(transaction=False)
    pipe.zremrangebyscore(INDEX, "-inf", now - FORGET_AFTER)
    pipe.zrangebyscore(INDEX, now - FORGET_AFTER, "+inf")
    ids = pipe.execute()[1]
    if not ids:
        return []
    beats = [json.loads(raw) for raw in client.mget([worker_key(_text(i)) for i in ids]) if raw]
    return sorted(beats, key=lambda beat: beat["id"])


class CachedWorkers:
    """`live_workers` for the dispatch path: read again at most once per `max_age` seconds, and
    then in the background, so a request never waits for it.

    A request finding the list older than `max_age` gets it as it is and starts one refresh; only
    a list older than `stale_limit` (or none yet) is read on the request's own time. The first
    request after a pause, the common case of a person at a keyboard, paid for the read (three
    round trips to Redis) before its job was queued. A list a few seconds old is safe: a job sent to a
    worker that has just gone moves to its model's shared queue (`tasks.orphans`)."""

    def __init__(self, max_age: float = 1.0, stale_limit: float = 10.0):
        self.max_age = max_age
        self.stale_limit = stale_limit
        self._lock = threading.Lock()
        self._at = -float("inf")
        self._workers: list[dict] = []
        self._refreshing = False

    def get(self, client: redis.Redis) -> list[dict]:
        with self._lock:
            age = time.monotonic() - self._at
            if age <= self.max_age or self._refreshing:
                return self._workers
            if age > self.stale_limit:
                self._read(client)
                return self._workers
            self._refreshing = True
        threading.Thread(target=self._refresh, args=(client,), name="localq-workers-refresh", daemon=True).start()
        return self._workers

    def _read(self, client: redis.Redis) -> None:
        self._workers = live_workers(client)
        self._at = time.monotonic()

    def _refresh(self, client: redis.Redis) -> None:
        try:
            workers = live_workers(client)
        except redis.RedisError:
            log.debug("could not refresh the live workers", exc_info=True)
            workers = None
        with self._lock:
            if workers is not None:
                self._workers, self._at = workers, time.monotonic()
            self._refreshing = False


class Heartbeat(threading.Thread):
    """Publishes `describe()` every `interval` seconds, and `settle` seconds after a `poke()`.

    A worker pokes it when a job starts and ends. Beating at once would describe the worker and
    write to Redis on the very time the new job's first token is being computed and sent; a
    short wait keeps off that path and makes one beat of pokes close together (jobs starting
    at once)."""

    def __init__(self, client: redis.Redis, describe: Callable[[], dict], interval: float, settle: float = 0.0):
        super().__init__(name="localq-heartbeat", daemon=True)
        self.client = client
        self.describe = describe
        self.interval = interval
        self.settle = settle
        self._wake = threading.Event()
        self._stopped = threading.Event()

    def poke(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        """Stop beating and remove this worker's heartbeat."""
        self._stopped.set()
        self._wake.set()
        if self.is_alive():
            self.join(timeout=2.0)
        try:
            remove(self.client, self.describe()["id"])
        except redis.RedisError:
            pass

    def run(self) -> None:
        while not self._stopped.is_set():
            try:
                publish(self.client, self.describe(), self.interval)
            except Exception:  # Redis away, say: try again next beat, never kill the worker
                log.warning("heartbeat not published", exc_info=True)
            if self._wake.wait(self.interval) and self.settle > 0:
                self._stopped.wait(self.settle)
            self._wake.clear()


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value
