"""Batches past their completion window expire on time, even when none of their lines runs.

A line task notices its batch's `expires_at` only when it runs; a batch whose lines wait behind a
busy worker, or on a queue no worker consumes, would stay `in_progress` long past its window.
`sweep_expired` looks at every batch that is not final and, for each one past `expires_at`, does
what OpenAI's Batch API does at the end of the completion window:

* `in_progress`: every line without an outcome yet is recorded as failed with `error.code`
  `batch_expired` (through `BatchStore.record_outcomes`, HSETNX: a line that is running now and
  finishes later keeps no second outcome, so each line is in the output or the error file exactly
  once), the batch's expired flag is set, and finalize is sent (once: `send_finalize` guards
  with SETNX), which writes the files and gives the batch its final status `expired`.
* `validating` (its input was never checked, e.g. no worker took the start task): the batch
  becomes `expired` with no lines; a start task that arrives later leaves it alone.
* `cancelling` and `finalizing` batches are on their way to a final status already: not expired.

The same pass looks after finalize, whatever the window: a batch whose lines all have their outcome
(completed + failed + dropped = total) but is not final gets its finalize sent if no line sent it
(the task that recorded the last outcome died before sending), and sent again if it has not run
`finalize_grace` seconds (by default the longest a job may take) after the sweep first saw the
batch in that state (the message was lost: a publish that failed, a worker that died mid-way).
finalize is safe to run twice: a second one finds the batch final, or reuses the files.

Batches whose lines wait for their project's turn (`store.admission`) are not lost; each tick also
admits waiting chunks where room was freed (an admitted chunk whose message was lost gives its room
back once it is stale). And it sends again the lines a broker lost. kombu's Redis transport takes a message off its queue
(BRPOP) before it records it as unacknowledged: a Redis restart between the two (the reply lost with
the server, or the record refused) loses that message, and its line would never get an outcome.
A batch `in_progress` or `cancelling` with lines that have no outcome, none of whose messages is on
a queue or unacknowledged (no line, start or finalize task of it anywhere), seen so on sweeps at
least `lost_grace` seconds apart, gets those lines sent again. A line sent twice runs at most once
to an outcome: the line task skips lines that have one, and outcomes are kept with HSETNX. The
queues are read only while they hold at most `SCAN_LIMIT` messages; with more, the check waits for
a later sweep (and the completion window bounds how long a batch can wait).

After a Redis failover the new primary may hold a lines message in `unacked` that no worker holds:
its acknowledgement (and its lines' outcomes) went with the old primary, or Celery dropped it when it
reconnected. The worker that was handed it removes it on its own tick (`tasks.lost_acks`), and the
check above then sends those lines again.

`BatchSweep` is a Celery worker bootstep: every worker's main process runs the sweep on the
worker's timer every `LOCALQ_BATCH_SWEEP_INTERVAL` seconds (default 60). A Redis lock
(`SET NX PX interval`) lets one worker sweep per interval, however many workers run on however
many machines. The sweep never takes its worker down: an error is logged and the next interval
tries again. It runs in the worker's event loop, so its Redis client gives up quickly (short
socket timeouts, one retry) rather than riding over an outage the way task code does. The same
tick also moves the jobs left on the own queues of workers that are gone (`tasks.orphans`).
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import secrets
import time
from functools import cache
from pathlib import Path

import redis
from celery import bootsteps
from redis.backoff import NoBackoff
from redis.retry import Retry

from store.batches import (FINAL, INDEX, BatchStore, batch_key, dropped_key, expired_key, finalize_key, lines_key,
                           results_key)
from store.files import generated_folder
from store.filestore import FileNotFound, FileStore
from store.spill import Spill, purge_older
from store.admission import Admission
from tasks import batch_messages, fair_share
from tasks.batch_input import check_lines
from tasks.lost_acks import UNACKED_KEY, HandedMessages, handed_messages, held_tags
from tasks.orphans import registry_resolver, rescue_gone
from tasks.redis_url import redis_client
from tasks.routing import DEVICE_QUEUES, queue_for, queue_keys
from tasks.runtime import models_dir
from tasks.settings import QueueSettings
from workers.registry import ModelRegistry

log = logging.getLogger(__name__)

LOCK_KEY = "localq:batches:sweep-lock"
# Seconds a finalize may take to run after the last line before it is sent again, with the
# default settings (a worker's sweep uses its own `QueueSettings.finalize_grace`).
FINALIZE_GRACE = QueueSettings().finalize_grace
WATCH_TTL = 7 * 86400
# Lost lines: sent again once the sweep saw no message of their batch for this long (default: two
# intervals), and only while the queues hold at most SCAN_LIMIT messages (they are read in full).
SCAN_LIMIT = 2000
# batches read per round trip while walking the index, and outcomes recorded per round trip
INDEX_CHUNK = 500
RECORD_CHUNK = 500
EXPIRED_ERROR = {"code": "batch_expired",
                 "message": "This request could not be executed before the completion window expired."}
FIELDS = ("status", "expires_at", "total", "completed", "failed", "dropped")


def expired_outcome(custom_id: str) -> dict:
    """The error-file line of a request the completion window ended before (OpenAI's shape)."""
    return {"id": "batch_req_" + secrets.token_hex(16), "custom_id": custom_id, "response": None,
            "error": dict(EXPIRED_ERROR)}


def finalize_watch_key(batch_id: str) -> str:
    """When the sweep first saw the batch with every line done and not final (epoch seconds)."""
    return f"localq:batch:{batch_id}:finalize-watch"


def lost_watch_key(batch_id: str) -> str:
    """When the sweep first saw the batch with lines to run and no message of it anywhere."""
    return f"localq:batch:{batch_id}:lost-watch"


def sweep_expired(redis_client: redis.Redis, now: float | None = None, *,
                  finalize_grace: float = FINALIZE_GRACE, lost_grace: float | None = None,
                  files_dir: Path | None = None) -> list[str]:
    """Expire every batch that is not final and is past its `expires_at`; the ids of those expired now.

    Also sends finalize for batches whose lines are all done but that are still not final, and
    sends again lines whose messages were lost (see above; `lost_grace=None` leaves them be).
    """
    now = time.time() if now is None else now
    store = BatchStore(redis_client)
    expired, running = [], []
    for batch_id, record in _open_batches(redis_client):
        total = _int(record["total"])
        if total and sum(_int(record[name]) for name in ("completed", "failed", "dropped")) >= total:
            # nothing left to expire: the batch only waits for its finalize
            _watch_finalize(redis_client, batch_id, now, finalize_grace)
            continue
        expires_at = _int(record["expires_at"])
        status = record["status"]
        past = bool(expires_at) and now > expires_at
        if past and status == "validating":
            if _expire_unstarted(redis_client, store, batch_id):
                expired.append(batch_id)
        elif past and status == "in_progress":
            _expire_lines(redis_client, store, batch_id)
            expired.append(batch_id)
        elif total and status in ("in_progress", "cancelling"):  # a cancelling one drops its lines as they come
            running.append(batch_id)
    if running and lost_grace is not None:
        _watch_lost_lines(redis_client, store, running, now, lost_grace, files_dir)
    return expired


def _open_batches(client: redis.Redis):
    """(batch_id, fields) of every indexed batch that is not final, read a chunk at a time."""
    start = 0
    while True:
        ids = [_text(i) for i in client.zrange(INDEX, start, start + INDEX_CHUNK - 1)]
        if not ids:
            return
        pipe = client.pipeline(transaction=False)
        for batch_id in ids:
            pipe.hmget(batch_key(batch_id), FIELDS)
        for batch_id, values in zip(ids, pipe.execute(), strict=True):
            record = dict(zip(FIELDS, (_text(v) if v is not None else "" for v in values), strict=True))
            if record["status"] and record["status"] not in FINAL:
                yield batch_id, record
        if len(ids) < INDEX_CHUNK:
            return
        start += INDEX_CHUNK


def _expire_unstarted(client: redis.Redis, store: BatchStore, batch_id: str) -> bool:
    """`validating` -> `expired`, only if nothing moved it on meanwhile (WATCH on the batch hash)."""
    def expire(pipe) -> bool:
        if _text(pipe.hget(batch_key(batch_id), "status") or "") != "validating":
            return False
        pipe.multi()
        pipe.set(expired_key(batch_id), "1")
        BatchStore(pipe).set_status(batch_id, "expired")
        return True

    return client.transaction(expire, batch_key(batch_id), value_from_callable=True)


def _expire_lines(client: redis.Redis, store: BatchStore, batch_id: str) -> None:
    # The flag first, as a line task does: a finalize that the last outcome triggers sees it.
    client.set(expired_key(batch_id), "1")
    pending = [_text(c) for c in client.hkeys(lines_key(batch_id))]
    if pending:
        have = client.hmget(results_key(batch_id), pending)
        pending = [custom_id for custom_id, outcome in zip(pending, have, strict=True) if outcome is None]
    for start in range(0, len(pending), RECORD_CHUNK):
        _record_expired(store, batch_id, pending[start:start + RECORD_CHUNK])
    batch_messages.send_finalize(batch_id)


def _watch_finalize(client: redis.Redis, batch_id: str, now: float, grace: float) -> None:
    """Send finalize if nobody did; send it again if it has not run within `grace` seconds."""
    watch = finalize_watch_key(batch_id)
    if not client.exists(finalize_key(batch_id)):
        log.warning("batch %s: every line is done but no finalize was sent; sending it", batch_id)
        batch_messages.send_finalize(batch_id)  # SETNX: a line task sending it right now sends it alone
        client.set(watch, now, ex=WATCH_TTL)
        return
    client.set(watch, now, nx=True, ex=WATCH_TTL)
    first_seen = float(client.get(watch) or now)
    if now - first_seen < grace:
        return
    log.warning("batch %s: finalize has not run %.0f s after the last line; sending it again", batch_id,
                now - first_seen)
    client.delete(finalize_key(batch_id))
    batch_messages.send_finalize(batch_id)
    client.set(watch, now, ex=WATCH_TTL)


def _record_expired(store: BatchStore, batch_id: str, custom_ids: list[str]) -> None:
    """A `batch_expired` outcome for each line, kept only where the line has none yet (HSETNX)."""
    store.record_outcomes(batch_id, [(custom_id, expired_outcome(custom_id), True) for custom_id in custom_ids])


def _watch_lost_lines(client: redis.Redis, store: BatchStore, batch_ids: list[str], now: float, grace: float,
                      files_dir: Path | None) -> None:
    messages = _messages(client)
    if messages is None:
        return  # too many messages to read now: a later sweep looks again
    present, tickets = messages
    waiting = Admission(client)
    _forget_lost_chunks(waiting, tickets, now - grace)
    for batch_id in batch_ids:
        watch = lost_watch_key(batch_id)
        if batch_id in present or waiting.waiting_chunks(batch_id, _batch_queues()):  # or awaiting its turn
            client.delete(watch)
            continue
        client.set(watch, now, nx=True, ex=WATCH_TTL)
        if now - float(client.get(watch) or now) < grace:
            continue
        client.delete(watch)
        sent = _resend_lost_lines(client, store, batch_id, files_dir)
        if sent:
            log.warning("batch %s: no message left for %d line(s) without an outcome; sent them again: %s",
                        batch_id, len(sent), ", ".join(sent[:20]) + (" ..." if len(sent) > 20 else ""))


def _forget_lost_chunks(admission: Admission, tickets: set[str], before: float) -> None:
    """Give back the room of admitted chunks that have no message anywhere since `before`: lost
    by the broker. Their lines are sent again once their batch has nothing else waiting."""
    for queue in _batch_queues():
        lost = [token for token in admission.admitted(queue, before) if token not in tickets]
        if admission.forget(queue, lost):
            log.warning("%s: admitted batch chunks with no message left, their room given back: %s",
                        queue, ", ".join(lost[:20]) + (" ..." if len(lost) > 20 else ""))


def _messages(client: redis.Redis) -> tuple[set[str], set[str]] | None:
    """(batch ids, admission tokens) named by the task messages on the queues batch work goes to,
    or delivered and not yet acknowledged; None if those hold more than SCAN_LIMIT messages."""
    keys = [key for queue in _batch_queues() for key in queue_keys(queue)]
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.llen(key)
    pipe.hlen(UNACKED_KEY)
    if sum(pipe.execute()) > SCAN_LIMIT:
        return None
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.lrange(key, 0, -1)
    pipe.hvals(UNACKED_KEY)
    found, tickets = set(), set()
    for raw in (item for items in pipe.execute() for item in items):
        batch_id, token = _message_batch(raw)
        if batch_id:
            found.add(batch_id)
        if token:
            tickets.add(token)
    return found, tickets


@cache
def _registry():
    """The worker's model configs (read once, as `tasks.runtime.model_runtime` does)."""
    return ModelRegistry.load(models_dir())  # the configs only: no model library in this process


def _batch_queues() -> list[str]:
    """The queues batch tasks go to: the device queues (start, finalize) and every model's queue."""
    return sorted({*DEVICE_QUEUES, *(queue_for(config) for config in _registry().list())})


def _message_batch(raw) -> tuple[str | None, str | None]:
    """The batch a Celery task message is about (its first argument, if that is a batch id), and
    the admission token of a lines message (in its third)."""
    try:
        message = json.loads(raw)
        if isinstance(message, list):  # an unacknowledged one: [message, exchange, routing key]
            message = message[0]
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
    except (ValueError, TypeError, KeyError, IndexError):
        return None, None
    first = args[0] if isinstance(args, list) and args else None
    ticket = args[2] if isinstance(args, list) and len(args) > 2 and isinstance(args[2], dict) else {}
    token = ticket.get("token") if isinstance(ticket.get("token"), str) else None
    return (first if isinstance(first, str) and first.startswith("batch_") else None), token


def _resend_lost_lines(client: redis.Redis, store: BatchStore, batch_id: str, files_dir: Path | None) -> list[str]:
    """Send again, one per task, the lines of the batch that have no outcome and were not dropped."""
    record = store.record(batch_id)
    if record is None or record["status"] not in ("in_progress", "cancelling"):
        return []
    numbers = {int(n): _text(c) for c, n in client.hgetall(lines_key(batch_id)).items()}
    if not numbers:
        return []
    ordered = sorted(numbers)
    have = client.hmget(results_key(batch_id), [numbers[n] for n in ordered])
    dropped = client.smismember(dropped_key(batch_id), [numbers[n] for n in ordered])
    wanted = {n for n, outcome, gone in zip(ordered, have, dropped, strict=True) if outcome is None and not gone}
    if not wanted:
        return []
    registry = _registry()
    queues = {}  # model -> its queue, as the start task sent it to

    def route(model, body):
        config = registry.resolve(model) if isinstance(model, str) else None
        queues[model] = queue_for(config) if config is not None else "cpu"
        return None

    files = FileStore(client, files_dir or QueueSettings.from_env().files_dir)
    try:
        with files.open(record["input_file_id"]) as handle:
            # the lines wanted, validated as the start task did; the others blank (numbers kept)
            checked = check_lines((raw if n in wanted else b"" for n, raw in enumerate(handle, start=1)),
                                  record["endpoint"], route)
    except FileNotFound:
        log.error("batch %s: lines to send again, but its input file %s is gone", batch_id, record["input_file_id"])
        return []
    sent = []
    for item in checked.lines:
        if item.line in wanted and numbers[item.line] == item.custom_id:
            batch_messages.send_lines(batch_id, [[item.line, item.custom_id, item.body]],
                                 queues.get(item.body["model"], "cpu"))
            sent.append(item.custom_id)
    return sent


class Sweeper:
    """One worker's periodic sweep: take the lock for this interval, sweep, never raise."""

    def __init__(self, client: redis.Redis, interval: float, owner: str = "", *,
                 finalize_grace: float = FINALIZE_GRACE, files_dir: Path | None = None,
                 deliveries: HandedMessages | None = None, restore=None, generated_ttl: float | None = None,
                 job_ttl: float = 86400.0):
        self.client = client
        self.job_ttl = job_ttl
        self.generated_ttl = generated_ttl  # with files_dir: expired generated files' bytes are deleted
        self.deliveries = deliveries
        self.restore = restore  # puts messages back on their queues, by delivery tag
        self.interval = interval
        self.owner = owner or "worker"
        self.finalize_grace = finalize_grace
        self.files_dir = files_dir

    def tick(self) -> list[str] | None:
        """Sweep if no other worker did in this interval; the batches expired, or None if it did not sweep."""
        if self.deliveries is not None:
            try:  # every worker, lock or not: each knows only the messages it was handed
                self.deliveries.check(self.client, held_tags(), self.restore, self.owner)
            except Exception:  # noqa: BLE001 - as below
                log.warning("checking for lost acknowledgements failed", exc_info=True)
        try:
            if not self.client.set(LOCK_KEY, self.owner, nx=True, px=max(1, int(self.interval * 1000))):
                return None
            expired = sweep_expired(self.client, finalize_grace=self.finalize_grace,
                                    lost_grace=2 * self.interval, files_dir=self.files_dir)
        except redis.RedisError as err:
            log.warning("batch expiry sweep skipped, Redis error: %s", err)
            return None
        except Exception:  # noqa: BLE001 - a sweep must never take the worker down
            log.exception("batch expiry sweep failed")
            return None
        if expired:
            log.warning("batches past their completion window expired: %s", ", ".join(expired))
        try:
            fair_share.admit_waiting(self.client, _batch_queues())  # room freed by chunks whose messages were lost
        except Exception:  # noqa: BLE001 - as above
            log.exception("admitting waiting batch chunks failed")
        try:
            rescue_gone(self.client, registry_resolver())
        except Exception:  # noqa: BLE001 - as above
            log.exception("moving the jobs of gone workers failed")
        if self.files_dir is not None and self.generated_ttl is not None:
            try:  # the bytes of what Redis no longer names: expired generated files, results of expired jobs
                purge_older(generated_folder(self.files_dir), self.generated_ttl)
                purge_older(Spill.under(self.files_dir).folder, self.job_ttl)
            except OSError:
                log.warning("deleting expired generated files and results failed", exc_info=True)
        return expired

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # noqa: BLE001
            pass


def restore_messages(app, tags: list[str]) -> None:
    """Put these unacknowledged messages back on their queues (kombu's own restore: the front of the
    queue and priority they had)."""
    with app.connection_for_write() as connection:
        qos = connection.default_channel.qos
        for tag in tags:
            qos.restore_by_tag(tag, leftmost=True)


def sweep_client(redis_url: str) -> redis.Redis:
    """A client for the worker's event loop: quick to give up, one retry for a connection Redis dropped."""
    return redis_client(redis_url, decode_responses=True, socket_timeout=5, socket_connect_timeout=2,
                                retry=Retry(NoBackoff(), 1), health_check_interval=30)


class BatchSweep(bootsteps.StartStopStep):
    """Worker bootstep: `Sweeper.tick` on the worker's timer, in the worker's main process."""

    label = "Batch expiry sweep"
    requires = ("celery.worker.components:Timer",)

    def __init__(self, worker, **kwargs):
        self.tref = None
        self.sweeper: Sweeper | None = None
        super().__init__(worker, **kwargs)

    def start(self, worker):
        settings = getattr(worker.app, "localq_settings", None) or QueueSettings.from_env()
        interval = settings.batch_sweep_interval
        self.sweeper = Sweeper(sweep_client(settings.redis_url), interval, owner=worker.hostname,
                               finalize_grace=settings.finalize_grace, files_dir=settings.files_dir,
                               deliveries=handed_messages, restore=functools.partial(restore_messages, worker.app),
                               generated_ttl=settings.generated_ttl, job_ttl=settings.job_ttl + 3600)
        self.tref = worker.timer.call_repeatedly(interval, self.sweeper.tick)

    def stop(self, worker):
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None
        if self.sweeper is not None:
            self.sweeper.close()
            self.sweeper = None

    terminate = stop


def _int(value) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value
