"""Batch lines into the broker by fair shares (`store.admission`): what the batch tasks and the
sweep call to queue a batch's chunks, send the ones whose turn has come, and settle a finished one.

The room per queue is the job slots of the live workers that consume it, plus one (a chunk
that finishes sends the next at once, and one more is queued; a project whose turn comes waits
for at most that one), or `LOCALQ_BATCH_ADMIT`. A chunk admitted for a batch
that was cancelled or became final meanwhile is settled here without a message: its lines are
dropped (counted once, as a running line of a cancelled batch is) and the next chunk is admitted.
"""

from __future__ import annotations

import logging
import time

from store.admission import Admission, Chunk
from store.heartbeats import live_workers
from tasks import batch_messages
from tasks.runtime import runtime

log = logging.getLogger(__name__)

#: Seconds per line assumed for a model not measured yet.
DEFAULT_LINE_SECONDS = 0.05
LINE_SECONDS = "localq:admission:line_seconds"  # model -> measured seconds per line (moving average)
SMOOTHING = 0.3


def admission(client=None) -> Admission:
    rt = runtime()
    return Admission(client or rt.redis, lag=rt.settings.fair_lag, stale=rt.settings.admission_stale)


def line_seconds(client, models: list[str]) -> dict[str, float]:
    """The measured seconds per line of each model (the default where none was measured)."""
    found = client.hmget(LINE_SECONDS, models) if models else []
    return {model: float(value) if value else DEFAULT_LINE_SECONDS for model, value in zip(models, found, strict=True)}


def queue_room(client, queue: str) -> int:
    """How many chunks `queue` may hold admitted at once."""
    fixed = runtime().settings.batch_admit
    if fixed:
        return fixed
    slots = sum(int(worker.get("slots") or 1) for worker in live_workers(client) if queue in worker.get("queues", ()))
    return slots + 1


def admit_and_send(queue: str, client=None) -> int:
    """Send every chunk `queue` has room for now; the number sent."""
    client = client or runtime().redis
    fair = admission(client)
    sent = 0
    while True:
        chunks = fair.admit(queue, queue_room(client, queue), time.time())
        if not chunks:
            return sent
        settled = 0
        for chunk in chunks:
            if batch_messages.settle_unrunnable(chunk, client):
                fair.finish(chunk.token, chunk.queue, chunk.project, -chunk.cost)  # it cost nothing
                settled += 1
                continue
            try:
                batch_messages.send_lines(chunk.batch_id, chunk.items, queue, chunk=_ticket(chunk))
                sent += 1
            except Exception:
                # not sent: its room comes back when the token goes stale, and the sweep sends
                # the lines again (they have no outcome and no message)
                log.warning("batch %s: chunk %s not sent", chunk.batch_id, chunk.token, exc_info=True)
        if not settled:
            return sent  # the room is full again (or nothing waits); settled chunks left room to refill


def _ticket(chunk: Chunk) -> dict:
    """What a lines message carries to settle its chunk when it is done."""
    return {"token": chunk.token, "queue": chunk.queue, "project": chunk.project, "cost": chunk.cost}


def finished(ticket: dict | None, seconds: float, model: str | None, lines: int) -> None:
    """A lines message is done (ran, was dropped or given up): charge its project what it cost,
    learn the model's seconds per line, and admit what comes next. Never raises."""
    if not ticket:
        return  # a message sent outside the admission (the sweep's resend, an older localq)
    try:
        client = runtime().redis
        fair = admission(client)
        if fair.finish(ticket["token"], ticket["queue"], ticket["project"], seconds - float(ticket["cost"])) \
                and model and lines:
            known = line_seconds(client, [model])[model]
            client.hset(LINE_SECONDS, model, (1 - SMOOTHING) * known + SMOOTHING * seconds / lines)
        admit_and_send(ticket["queue"], client)
    except Exception:
        log.warning("batch chunk %s: admission not settled", ticket.get("token"), exc_info=True)


def admit_waiting(client, queues: list[str]) -> int:
    """Admit on those of `queues` with projects waiting (the sweep's tick: nothing stays stuck when
    every chunk in flight was lost); the number of chunks sent."""
    return sum(admit_and_send(queue, client) for queue in admission(client).waiting_queues(queues))
