"""Messages whose acknowledgement a Redis failover took back, found by the worker that ran them.

Redis replicates asynchronously: when a primary dies, the writes it acknowledged in its last
moments may never reach the replica that Sentinel promotes. A task records its outcome (a batch
line's outcome, a job's final status and result), then Celery acknowledges its message (kombu's
Redis transport removes it from `unacked`); both writes can be lost together. The new primary then
holds a message in `unacked` that no worker holds any more, and a line without an outcome or a job
still `running` whose client waits. kombu would put the message back only after its visibility
timeout (longer than the longest job, 11 minutes by default), and until then the batch sweep
counts the batch as still having a message somewhere.

The same state follows a connection loss: Celery drops the messages it had fetched and not yet
started (they "cannot be acknowledged on a new channel"), and kombu puts them back only if its
restore, run as the old channel closes, reaches a primary: during a failover none is there yet.

Each worker's main process remembers the lines and job messages it was handed (`received`). On each
sweep tick (`check`), one it no longer holds (neither waiting nor running: `held_tags`) that is
still in `unacked`, on two ticks in a row, was either acknowledged and the acknowledgement lost, or
dropped by Celery at a reconnection:

* a batch lines message is removed from `unacked`; the batch sweep (`tasks.sweeper`) then finds
  the batch's lines without an outcome and no message left anywhere, and sends them again. A
  line's outcome is kept with HSETNX, so a line that did record its outcome keeps it (exactly
  once), and removing a message that some other worker was handed again is safe for that reason;
* a job message whose job has a final status is removed (only the acknowledgement was lost); one
  whose job has none and did not start elsewhere is put back on its queue (`restore`): the job
  runs (again, as after a worker died: its stream goes on from the events its log kept). A job
  another worker runs now is that worker's.
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
#: Seconds a handed message is remembered: longer than Sentinel takes to fail over (30 s to notice a
#: primary is down by default, then the election), so an acknowledgement taken back is noticed.
REMEMBER_FOR = 300.0
MAX_REMEMBERED = 100_000  # at most this many (the oldest go first): one HEXISTS each per tick


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
            if len(self._received) > MAX_REMEMBERED:
                del self._received[next(iter(self._received))]

    def check(self, client: redis.Redis, held: Iterable[str], restore: Callable[[list[str]], None] | None = None,
              node: str = "") -> list[str]:
        """Deal with the remembered messages not in `held` found in `unacked` on this tick and the one
        before (see the module's text; `restore` puts job messages back on their queues); their tags."""
        now = time.monotonic()
        held = set(held)
        with self._lock:
            for tag in [tag for tag, (at, _) in self._received.items() if now - at > self.remember_for]:
                del self._received[tag]
            free = [tag for tag in self._received if tag not in held]
        if not free:
            self._suspects.clear()
            return []
        pipe = client.pipeline(transaction=False)
        for tag in free:
            pipe.hexists(UNACKED_KEY, tag)
        present = {tag for tag, there in zip(free, pipe.execute(), strict=True) if there}
        with self._lock:
            # one gone from `unacked` is remembered still: a failover can bring back the entry its
            # acknowledgement removed (the new primary never saw the acknowledgement)
            lost = sorted(present & self._suspects)
            self._suspects = present - set(lost)
            jobs = {tag: self._received.pop(tag)[1] for tag in lost}
        if not lost:
            return []
        put_back, left = [], []
        for tag, job_id in jobs.items():
            if job_id is None:
                continue
            state = _job_state(client, job_id, node)
            if state == "ours" and restore is not None:
                put_back.append(tag)
            elif state == "elsewhere":
                left.append(tag)
        if put_back:
            restore(put_back)
        removed = [tag for tag in lost if tag not in put_back and tag not in left]
        if removed:
            pipe = client.pipeline(transaction=True)
            pipe.hdel(UNACKED_KEY, *removed)
            pipe.zrem(UNACKED_INDEX_KEY, *removed)
            pipe.execute()
        log.warning("%d message(s) handed to this worker are unacknowledged, and it holds them no more (a Redis "
                    "failover took back their acknowledgement, or a reconnection dropped them): %d put back on "
                    "their queues (jobs that must run), %d removed (batch lines without an outcome are sent again "
                    "by the batch sweep): %s", len(lost), len(put_back), len(removed), ", ".join(lost[:20]))
        return lost


def _job_state(client: redis.Redis, job_id: str, node: str) -> str:
    """"ended", "elsewhere" (running on another worker) or "ours" (not ended, last run here or never
    started)."""
    status, worker = client.hmget(job_key(job_id), "status", "worker")
    if status in FINAL_STATUSES:
        return "ended"
    runner = (worker or "").rpartition(":")[0]
    return "elsewhere" if status == "running" and runner and runner != node else "ours"


#: This worker process's messages (its main process: where Celery hands them over).
handed_messages = HandedMessages()


def held_tags() -> set[str]:
    """The delivery tags of the requests this worker holds now: waiting for a slot, or running."""
    from celery.worker import state

    tags = set()
    for request in [*state.reserved_requests, *state.active_requests]:
        tag = getattr(getattr(request, "_message", None), "delivery_tag", None)
        if tag is not None:
            tags.add(tag)
    return tags


def job_id_of(request) -> str | None:
    """The job id a `localq.run_job` request carries."""
    try:
        job = request.args[0]
    except Exception:  # noqa: BLE001 - an undecodable message is the poisoned-message guard's business
        return None
    return job.get("id") if isinstance(job, dict) and isinstance(job.get("id"), str) else None
