"""The messages of a batch's life (lines, finalize) and the checks that decide them, shared by the
batch tasks (`tasks.batch_run`), the fair admission of lines (`tasks.fair_share`) and the sweep."""

from __future__ import annotations

from store.admission import Chunk
from store.batches import FINAL, BatchStore, batch_key, cancel_key, dropped_key, finalize_key
from tasks.celery_app import app
from tasks.routing import FINALIZE_TASK, LINES_TASK, PRIORITIES
from tasks.runtime import runtime


def send_finalize(batch_id: str, client=None) -> None:
    """Send `localq.batch.finalize` once (SETNX on its key); the sweep sends it again if it is lost."""
    client = client or runtime().redis
    if client.set(finalize_key(batch_id), "1", nx=True):
        try:
            app.send_task(FINALIZE_TASK, args=[batch_id], queue="cpu", priority=PRIORITIES["interactive"])
        except Exception:
            client.delete(finalize_key(batch_id))  # not sent: the next line or the sweep sends it
            raise


def send_lines(batch_id: str, items: list, queue: str, chunk: dict | None = None) -> None:
    """One `localq.batch.lines` task for `items` (`[line, custom_id, body]` each, one model);
    `chunk`: the admission ticket it settles when done (`tasks.fair_share`)."""
    lines = [list(item) for item in items]
    args = [batch_id, lines] if chunk is None else [batch_id, lines, chunk]
    # argsrepr: logs and Flower show which lines, not a repr of every line's body built per send
    app.send_task(LINES_TASK, args=args, queue=queue, priority=PRIORITIES["batch"],
                  argsrepr=f"[{batch_id!r}, <lines {', '.join(str(line[0]) for line in lines)}>]", kwargsrepr="{}")


def maybe_finalize(batch_id: str, client=None) -> None:
    """Send finalize once every line has its outcome (or was dropped)."""
    client = client or runtime().redis
    total, completed, failed = BatchStore(client).counts(batch_id)
    dropped = int(client.hget(batch_key(batch_id), "dropped") or 0)
    if total and completed + failed + dropped >= total:
        send_finalize(batch_id, client)


def settle_unrunnable(chunk: Chunk, client) -> bool:
    """Whether an admitted chunk needs no message: its batch is gone or final (nothing to do), or
    cancelled (its lines are dropped here, as a line task would drop them)."""
    store = BatchStore(client)
    record = store.record(chunk.batch_id)
    if record is None or record["status"] in FINAL:
        return True
    if not client.exists(cancel_key(chunk.batch_id)):
        return False
    for _, custom_id, _ in chunk.items:
        store.drop(chunk.batch_id, custom_id, dropped_key(chunk.batch_id))
    maybe_finalize(chunk.batch_id, client)
    return True
