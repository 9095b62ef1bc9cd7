"""How many jobs wait in each queue, by priority: the one reading of queue depths, shared by
`/metrics` (`localq_queue_depth`) and `GET /v1/queues`.

The known queues are the device queues, the queues of the configured models and every queue a
live worker's heartbeat names. kombu's Redis transport keeps one list per priority step of a
queue (`tasks.routing`); a job waits in the step of its priority. Interactive jobs are served
before batch ones: the steps below batch's count as interactive, the rest as batch. Messages a
worker has already taken (prefetched, unacknowledged) are in no list: not waiting.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

from tasks.routing import DEVICES, PRIORITIES, PRIORITY_STEPS, step_key

# The first priority step batch work waits in: kombu files a priority under the highest step not above it.
BATCH_STEP = max(step for step in PRIORITY_STEPS if step <= PRIORITIES["batch"])


class Depth(NamedTuple):
    interactive: int
    batch: int

    @property
    def total(self) -> int:
        return self.interactive + self.batch


def known_queues(configured: Iterable[str], workers: Iterable[dict]) -> list[str]:
    """The device queues, `configured` (the models' queues) and those the live workers'
    heartbeats name, sorted."""
    named = (queue for worker in workers for queue in (worker.get("queues") or ()) if isinstance(queue, str))
    return sorted({*DEVICES, *configured, *named})


def read_depths(pipe, queues: Sequence[str]) -> int:
    """Queue on `pipe` the reads of every priority step of `queues`; returns how many replies
    they take (the first ones of the pipe's replies, when queued first)."""
    for queue in queues:
        for step in PRIORITY_STEPS:
            pipe.llen(step_key(queue, step))
    return len(queues) * len(PRIORITY_STEPS)


def parse_depths(replies: Sequence, queues: Sequence[str]) -> dict[str, Depth]:
    """Each queue's depth from the replies of `read_depths` (in the same order)."""
    depths = {}
    for index, queue in enumerate(queues):
        counts = replies[index * len(PRIORITY_STEPS):(index + 1) * len(PRIORITY_STEPS)]
        steps = dict(zip(PRIORITY_STEPS, (int(count) for count in counts), strict=True))
        depths[queue] = Depth(interactive=sum(n for step, n in steps.items() if step < BATCH_STEP),
                              batch=sum(n for step, n in steps.items() if step >= BATCH_STEP))
    return depths
