"""A worker's delivery tags reach Redis from a thread of their own, never on the event loop's time."""

from __future__ import annotations

import time

from tasks.delivery_log import DeliveryLog
from tests.service import wait_until


def test_tags_reach_redis_newest_first_and_trimmed(redis_db):
    log = DeliveryLog(lambda: redis_db, lambda: "localq:worker:w@h:deliveries", lambda: 3)
    for tag in ["a", "b", "c", "d"]:
        log.add(tag)
    wait_until(lambda: redis_db.lrange("localq:worker:w@h:deliveries", 0, -1)[:1] == ["d"], 5, "the last tag",
               interval=0.01)
    assert redis_db.lrange("localq:worker:w@h:deliveries", 0, -1) == ["d", "c", "b"]


def test_adding_never_waits_for_an_unreachable_redis(caplog):
    import redis

    unreachable = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=2, socket_timeout=2)
    log = DeliveryLog(lambda: unreachable, lambda: "k", lambda: 8)
    started = time.monotonic()
    for tag in range(50):
        log.add(str(tag))
    assert time.monotonic() - started < 0.5  # the writer thread fails, not the caller
    wait_until(lambda: "not remembered" in caplog.text, 10, "the writer's warning", interval=0.02)
