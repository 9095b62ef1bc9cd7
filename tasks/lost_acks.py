"""Messages whose acknowledgement a Redis failover took back, found by the worker that ran them.

Redis replicates asynchronously: when a primary dies, the writes it acknowledged in its last
moments may never reach the replica that Sentinel promotes. A task records its outcome (a batch
line's outcome, a job's final status and result), then Celery acknowledges its message (kombu's
Redis transport removes it from `unacked`); both writes can be lost together. The new primary then
holds a message in `unacked` that no worker holds any more, and a line without an outcome or a job
still `running` whose client waits. kombu would put the message back only after its visibility
timeout (longer than the longest job, 11 minutes by default), and until then the batch sweep
counts the batch as still having a message somewhere.

Each worker's main process remembers the lines and job messages it was handed (`received`). On
each sweep tick (`check`), a message it no longer holds (its request ended) that is still in
`unacked`, on two ticks in a row, had its acknowledgement lost:

* a batch lines message is removed from `unacked` again; the batch sweep (`tasks.sweeper`) then
  finds the batch's lines without an outcome and no message left anywhere, and sends them again.
  A line's outcome is kept with HSETNX, so a line that did record its outcome keeps it (exactly
  once), and removing a message that some other worker was handed again is safe for that reason;
* a job message whose job has a final status is removed (only the acknowledgement was lost); one
  whose job has none is put back on its queue (`restore`): the job runs again, as after a worker
  died, and its stream goes on from the events its log kept.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

import redis

from store.jobs import FINAL_STATUSES, job_key

log = logging.getLogger(__name__)

UNACKED_KEY = "unacked"  # kombu's Redis transport: delivered, not yet acknowledged messages
UNACKED_INDEX_KEY = "unacked_index"  # the same, scored by delivery time
REMEMBER_FOR = 3600.0  # seconds a handed message is remembered (a failover is noticed well within that)


class HandedMessages:
    """The lines and job messages this worker was handed recently, by delivery tag."""

    def __init__(self, remember_for: float = REMEMBER_FOR):
        self.remember_for = remember_for
        self._received: dict[str, tuple[float, str | None]] = {}  # tag -> (when handed over, job id or None)
        self._suspects: set[str] = set()  # not held, still unacked on the last tick
        self._lock = threading.Lock()

    def received(self, tag: str, job_id: str | None = None) -> None:
        """A message handed to this worker: a batch lines message, or (`job_id`) a job's."""
        with self._lock:
            self._received[tag] = (time.monotonic(), job_id)

    def check(self, client: redis.Redis, held: Iterable[str],
              restore: Callable[[list[str]], None] | None = None) -> list[str]:
        """Deal with the remembered messages not in `held` found in `unacked` on this tick and the one
        before (see the module's text; `restore` puts job messages back on their queues); their tags."""
        now = time.monotonic()
        held = set(held)
        with self._lock:
            for tag in [tag for tag, (at, _) in self._received.items() if now - at > self.remember_for]:
                del self._received[tag]
            ended = [tag for tag in self._received if tag not in held]
        if not ended:
            self._suspects.clear()
            return []
        pipe = client.pipeline(transaction=False)
        for tag in ended:
            pipe.hexists(UNACKED_KEY, tag)
        present = {tag for tag, there in zip(ended, pipe.execute(), strict=True) if there}
        with self._lock:
            for tag in set(ended) - present:
                self._received.pop(tag, None)  # acknowledged for good
            lost = sorted(present & self._suspects)
            self._suspects = present - set(lost)
            jobs = {tag: self._received.pop(tag)[1] for tag in lost}
        if not lost:
            return []
        unfinished = [tag for tag, job_id in jobs.items() if job_id is not None and restore is not None
                      and not _ended(client, job_id)]
        if unfinished:
            restore(unfinished)
        removed = [tag for tag in lost if tag not in unfinished]
        if removed:
            pipe = client.pipeline(transaction=True)
            pipe.hdel(UNACKED_KEY, *removed)
            pipe.zrem(UNACKED_INDEX_KEY, *removed)
            pipe.execute()
        log.warning("%d message(s) this worker ran were unacknowledged again (a Redis failover took back the "
                    "acknowledgement): %d put back on their queues (their jobs had not ended), %d removed (batch "
                    "lines without an outcome are sent again by the batch sweep): %s",
                    len(lost), len(unfinished), len(removed), ", ".join(lost[:20]))
        return lost


def _ended(client: redis.Redis, job_id: str) -> bool:
    return client.hget(job_key(job_id), "status") in FINAL_STATUSES


#: This worker process's messages (its main process: where Celery hands messages over).
handed_messages = HandedMessages()


def held_tags() -> set[str]:
    """The delivery tags of the requests this worker holds now (reserved or running)."""
    from celery.worker import state

    tags = set()
    for request in list(state.requests.values()):
        tag = getattr(getattr(request, "_message", None), "delivery_tag", None)
        if tag is not None:
            tags.add(tag)
    return tags
