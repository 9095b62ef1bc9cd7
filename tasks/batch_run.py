"""The Batch API's work: validate a batch's input file, run its lines at batch priority, write its files.

Three Celery tasks, JSON arguments only:

* `localq.batch.start(batch_id)`: reads the input file line by line, checks every line (and that the
  worker's registry can run its model), then either fails the batch with OpenAI's `errors` list or
  moves it to `in_progress` and sends `localq.batch.lines` tasks to its models' device queues at
  batch priority (9), so interactive calls (0) go first: one line per task for chat and completions,
  up to 32 consecutive lines of one model for embeddings (they share one forward pass).
* `localq.batch.lines(batch_id, [[line, custom_id, body], ...])`: runs the requests in-process
  through `workers.execute` and records each outcome exactly once (`BatchStore.record_outcomes`);
  lines that already have one (a redelivered task) are skipped. A line of a cancelled batch is
  dropped (counted once in the batch hash's `dropped` field, never in the output); a line past
  `expires_at` is recorded as failed with `error.code` `batch_expired`. The task that brings
  completed + failed + dropped to the total sends `localq.batch.finalize`, once (SETNX).
  A lines message delivered more than `LOCALQ_MAX_DELIVERIES` times (its lines kept stopping the
  worker) records a `worker_lost` error for its lines instead, and goes to the dead letters
  (`store.dead_letters`); `give_up_lines` does the same for one no worker can take (`tasks.handoff`).
* `localq.batch.finalize(batch_id)`: writes the output file (successful lines) and the error file
  (failed ones) through `FileStore`, in input order, and gives the batch its final status. A
  finalize delivered again after a crash reuses the files the first one recorded.
"""

from __future__ import annotations

import json
import logging
import secrets
import time

from celery.exceptions import SoftTimeLimitExceeded

from schemas import openai_errors as errors
from schemas.openai_errors import OpenAIError
from store import dead_letters
from store.batches import (FINAL, BatchStore, batch_key, cancel_key, deliveries_key, dropped_key, expired_key,
                           lines_key, results_key)
from store.files import generated_folder, publish_outputs, url_maker
from store.filestore import FileNotFound, FileStore
from store.model_permissions import permissions
from store.rate_limits import admit_batch, prompt_tokens
from store.metrics import completion_tokens, queue_jobs, record_jobs
from store.usage import configured_retention, queue_usage, usage_of
from store.admission import Chunk
from tasks import fair_share
from tasks.batch_messages import maybe_finalize, send_finalize
from tasks.batch_input import check_lines
from tasks.responses.batch import chat_line, response_of
from tasks.responses.job import KIND as RESPONSE
from tasks.cancel_check import CancelCheck, soft_deadline
from tasks.celery_app import app
from tasks.routing import FINALIZE_TASK, LINES_TASK, START_TASK, queue_for
from tasks.runtime import model_runtime, runtime
from workers.capabilities import unsupported
from workers.execute import execute_embeddings, run_job  # light at import: model libraries load in the backends

log = logging.getLogger(__name__)

KINDS = {"/v1/chat/completions": "chat", "/v1/completions": "completion", "/v1/embeddings": "embedding",
         "/v1/images/generations": "image", "/v1/responses": RESPONSE}
CANCEL_POLL = 0.25
# Lines per task. Embedding lines share one forward pass (see workers.execute.execute_embeddings);
# a chat or completion line runs alone, so an interactive call waits for at most one line.
CHUNK_SIZES = {"embedding": 32}


def _store() -> BatchStore:
    return BatchStore(runtime().redis)


def _files() -> FileStore:
    rt = runtime()
    return FileStore(rt.redis, rt.settings.files_dir)


def _request_id() -> str:
    return "batch_req_" + secrets.token_hex(16)


# ---------------------------------------------------------------------------------------------
# start: validate the input file, fan out the lines
# ---------------------------------------------------------------------------------------------


@app.task(name=START_TASK)
def start_batch(batch_id: str) -> None:
    rt = runtime()
    store = _store()
    record = store.record(batch_id)
    if record is None or record["status"] != "validating" and record["status"] != "cancelling":
        return  # unknown, or already started (a redelivered start task)
    if rt.redis.exists(cancel_key(batch_id)):
        send_finalize(batch_id)  # cancelled while waiting to be validated: nothing to run
        return
    endpoint = record["endpoint"]
    kind = KINDS[endpoint]
    registry = model_runtime()[0]

    devices: dict[str, str] = {}  # model -> its queue

    allowed = permissions(rt.redis, record.get("project", ""))

    def model_problem(model, body):
        config = registry.resolve(model) if isinstance(model, str) else None
        if config is None or not allowed.allows(config.names):  # a model the project may not use
            return "model_not_found", f"The model '{model}' does not exist"
        if kind == RESPONSE:
            try:
                body = chat_line(body)
            except OpenAIError as err:
                return err.code, err.message
        problem = unsupported("chat" if kind == RESPONSE else kind, config, body)
        if problem is not None:
            return problem.code, problem[1]
        devices[model] = queue_for(config)
        return None

    try:
        with _files().open(record["input_file_id"]) as handle:
            checked = check_lines(handle, endpoint, model_problem)
    except FileNotFound:
        store.set_status(batch_id, "failed", errors={"object": "list", "data": [
            {"line": None, "code": "file_not_found", "param": "input_file_id",
             "message": f"The input file {record['input_file_id']} no longer exists."}]})
        return
    if not checked.valid:
        store.set_status(batch_id, "failed", errors={"object": "list", "data": checked.errors})
        return
    if not _within_token_budget(rt, store, record, batch_id, checked.lines, registry):
        return
    pipe = rt.redis.pipeline(transaction=False)
    for item in checked.lines:
        pipe.hset(lines_key(batch_id), item.custom_id, item.line)
    pipe.execute()
    if not store.start(batch_id, len(checked.lines)):
        return  # expired by the sweep while we validated: its lines never run
    # the lines wait for their project's turn (`store.admission`), then go to their model's queue
    project = record.get("project", "")
    seconds = fair_share.line_seconds(rt.redis, sorted({item.body["model"] for item in checked.lines}))
    chunks = [Chunk(token=f"{batch_id}:{chunk[0].line}", batch_id=batch_id, project=project,
                    queue=devices.get(chunk[0].body["model"], "cpu"), cost=seconds[chunk[0].body["model"]] * len(chunk),
                    items=[[item.line, item.custom_id, item.body] for item in chunk])
              for chunk in _chunks(checked.lines, CHUNK_SIZES.get(kind, 1))]
    fair_share.admission(rt.redis).enqueue(chunks)
    for queue in sorted({chunk.queue for chunk in chunks}):
        fair_share.admit_and_send(queue, rt.redis)


def _within_token_budget(rt, store: BatchStore, record: dict, batch_id: str, lines: list, registry) -> bool:
    """Charge the batch's estimated input tokens to its project's daily batch budget, all or nothing
    (`store.rate_limits`); over it, the batch fails with `token_limit_exceeded`, as OpenAI's does."""
    tokens: dict[str, int] = {}
    for item in lines:
        name = registry.resolve(item.body["model"]).name  # aliases share their model's budget
        tokens[name] = tokens.get(name, 0) + prompt_tokens(item.body)
    admitted, retry_after = admit_batch(rt.redis, record.get("project", ""), tokens)
    if admitted:
        return True
    wait = "." if retry_after == float("inf") else f"; try again in {int(retry_after) + 1} s."
    store.set_status(batch_id, "failed", errors={"object": "list", "data": [{
        "line": None, "param": None, "code": "token_limit_exceeded",
        "message": f"Enqueued token limit reached: the batch's {sum(tokens.values())} estimated input tokens "
                   f"exceed what is left of the project's batch_1_day_max_input_tokens{wait}"}]})
    return False


def _chunks(lines: list, size: int):
    """Consecutive lines for the same model, at most `size` per task."""
    chunk: list = []
    for item in lines:
        if chunk and (len(chunk) >= size or chunk[0].body["model"] != item.body["model"]):
            yield chunk
            chunk = []
        chunk.append(item)
    if chunk:
        yield chunk


# ---------------------------------------------------------------------------------------------
# lines: run a few requests, record each outcome once
# ---------------------------------------------------------------------------------------------


def _drop(batch_id: str, custom_id: str) -> None:
    """Count a line of a cancelled batch as dropped, once, unless it already has an outcome."""
    _store().drop(batch_id, custom_id, dropped_key(batch_id))


def give_up_lines(client, batch_id: str, items: list, payload: dict, chunk: dict | None = None) -> int:
    """Record `payload` (`{"status", "error"}`) as the outcome of every line of `items` that has none:
    a lines message no worker can run (`tasks.handoff`). Sends finalize if that was the last line;
    the number of lines recorded now. `client`: the caller's own Redis client (the worker's main
    process must not wait on the task runtime's long retries). `chunk`: the message's admission
    ticket, settled here."""
    if chunk:
        fair_share.admission(client).finish(chunk["token"], chunk["queue"], chunk["project"], 0.0)
    store = BatchStore(client)
    record = store.record(batch_id)
    if record is None or record["status"] in FINAL:
        return 0
    outcomes = [(custom_id, _failure(custom_id, f"{batch_id}-{line}", payload["status"], payload["error"]), True)
                for line, custom_id, *_ in items]
    recorded = store.record_outcomes(batch_id, outcomes)
    try:
        record_jobs(client, [{"kind": KINDS.get(record.get("endpoint"), ""), "outcome": "failed"}
                             for first in recorded if first])
    except Exception:
        log.warning("batch line metrics not recorded", exc_info=True)
    maybe_finalize(batch_id, client)
    return sum(recorded)


def _failure(custom_id: str, request_id: str, status: int, error: dict) -> dict:
    return {"id": _request_id(), "custom_id": custom_id,
            "response": {"status_code": status, "request_id": request_id, "body": {"error": error}},
            "error": None}


def _success(custom_id: str, request_id: str, body: dict) -> dict:
    return {"id": _request_id(), "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": request_id, "body": body}, "error": None}


def _expired(custom_id: str) -> dict:
    expired = errors.expired()  # a batch line's own `error`: code and message only
    return {"id": _request_id(), "custom_id": custom_id, "response": None,
            "error": {"code": expired.code, "message": expired.message}}


@app.task(name=LINES_TASK, bind=True)
def run_lines(self, batch_id: str, items: list, chunk: dict | None = None) -> None:
    """Run `items` (`[line, custom_id, body]` each) of one batch, all for the same model; then
    settle the admission `chunk` it came with, which lets the next chunk in."""
    began = time.monotonic()
    try:
        store = _store()
        record = store.record(batch_id)
        if record is None or record["status"] in FINAL:
            return
        try:
            if not _given_up(runtime(), self.request, batch_id, items):
                _run_lines(runtime(), store, record, batch_id, items,
                           soft_deadline(self.request, runtime().settings.job_timeout))
        finally:
            maybe_finalize(batch_id)
    finally:
        model = items[0][2].get("model") if items and isinstance(items[0][2], dict) else None
        fair_share.finished(chunk, time.monotonic() - began, model, len(items))


def _given_up(rt, request, batch_id: str, items: list) -> bool:
    """Count this delivery of the lines message; past `max_deliveries` (its lines kept stopping the
    worker), record their error and keep the message in the dead letters instead of running it."""
    key = deliveries_key(batch_id)
    pipe = rt.redis.pipeline(transaction=False)
    pipe.hincrby(key, str(items[0][1]) if items else "", 1)
    pipe.expire(key, int(rt.settings.job_ttl))
    deliveries = int(pipe.execute()[0])
    if deliveries <= rt.settings.max_deliveries:
        return False
    stops = deliveries - 1
    give_up_lines(rt.redis, batch_id, items, errors.worker_lost(stops, "request").payload())
    try:
        dead_letters.add(rt.redis, reason="worker_lost", task=LINES_TASK, job_id=batch_id,
                         queue=(request.delivery_info or {}).get("routing_key"),
                         error=f"the lines stopped their worker {stops} times", body=[batch_id, items])
    except Exception:
        log.warning("batch %s: dead letter not kept", batch_id, exc_info=True)
    return True


def _run_lines(rt, store: BatchStore, record: dict, batch_id: str, items: list, deadline: float | None = None) -> None:
    done = rt.redis.hmget(results_key(batch_id), [custom_id for _, custom_id, _ in items])
    pending = [item for item, outcome in zip(items, done, strict=True) if outcome is None]  # a redelivery
    if not pending:
        return
    if rt.redis.exists(cancel_key(batch_id)):
        for _, custom_id, _ in pending:
            _drop(batch_id, custom_id)
        return
    if time.time() > int(record.get("expires_at") or 0):
        rt.redis.set(expired_key(batch_id), "1")
        store.record_outcomes(batch_id, [(custom_id, _expired(custom_id), True) for _, custom_id, _ in pending])
        return

    kind = KINDS[record["endpoint"]]
    runs_as = "chat" if kind == RESPONSE else kind  # a Responses line is the chat job its body makes
    jobs = [{"id": f"{batch_id}-{line}", "kind": runs_as, "model": body["model"],
             "request": chat_line(body) if kind == RESPONSE else body,
             "created": int(time.time()), "base_url": record.get("base_url"),
             "project": record.get("project", ""), "truncation": body.get("truncation")} for line, _, body in pending]
    is_cancelled = CancelCheck(lambda: rt.redis.exists(cancel_key(batch_id)), CANCEL_POLL, deadline)

    registry, cache = model_runtime()
    began = time.monotonic()
    try:
        if kind == "embedding":
            results = execute_embeddings(jobs, is_cancelled, registry=registry, cache=cache)
        else:
            results = [run_job(job, is_cancelled, registry, cache) for job in jobs]
    except SoftTimeLimitExceeded as err:
        results = [err] * len(jobs)
    except Exception as err:
        log.exception("batch %s: lines %s failed", batch_id, [line for line, _, _ in pending])
        results = [err] * len(jobs)
    if is_cancelled.timed_out:  # lines stopped at the soft time limit failed; they were not cancelled
        results = [SoftTimeLimitExceeded() if result is None else result for result in results]
    outcomes = []
    for (line, custom_id, body), job, result in zip(pending, jobs, results, strict=True):
        if kind == RESPONSE and isinstance(result, dict):
            result = response_of(body, result, batch_id, line, job["created"])
        if result is None:  # stopped by a cancel while it ran
            _drop(batch_id, custom_id)
        elif isinstance(result, dict):
            # generated pictures asked for as `url`: kept in the file store, served by the API like a sync call's
            body = publish_outputs(rt.redis, result, url_maker(job["base_url"]), int(rt.settings.generated_ttl),
                                   job.get("project", ""), folder=generated_folder(rt.settings.files_dir))
            outcomes.append((custom_id, _success(custom_id, job["id"], body), False))
        else:
            outcomes.append((custom_id, _line_failure(batch_id, line, custom_id, job["id"], result), True))
    recorded = store.record_outcomes(batch_id, outcomes)
    _count(rt, registry, kind, jobs[0]["model"], (time.monotonic() - began) / len(jobs),
           [outcome for outcome, first in zip(outcomes, recorded, strict=True) if first], record.get("project", ""))


def _count(rt, registry, kind: str, model: str, seconds_per_line: float, outcomes: list, project: str = "") -> None:
    """Batch lines in the job metrics (`store.metrics`), like any other job, and what the successful
    ones used in their project's usage (`store.usage`, as batch lines), in one round trip; never
    fails the lines."""
    config = registry.resolve(model)
    model = config.name if config else model
    try:
        pipe = rt.redis.pipeline(transaction=True)
        queue_jobs(pipe, [{
            "kind": kind, "outcome": "failed" if failed else "succeeded", "model": model,
            "duration": seconds_per_line,
            "completion_tokens": completion_tokens((outcome.get("response") or {}).get("body")),
        } for _, outcome, failed in outcomes])
        queue_usage(pipe, [usage_of(project=project, kind=kind, model=model, request=None,
                                    result=outcome["response"]["body"], batch=True)
                           for _, outcome, failed in outcomes if not failed], time.time(), configured_retention())
        pipe.execute()
    except Exception:
        log.warning("batch line metrics not recorded", exc_info=True)


def _line_failure(batch_id: str, line: int, custom_id: str, request_id: str, err: Exception) -> dict:
    if isinstance(err, OpenAIError):  # what the client caused (`workers.errors.JobError`)
        error = err
    elif isinstance(err, SoftTimeLimitExceeded):
        error = errors.job_timeout("request")
    else:
        if err.__traceback__ is not None:
            log.error("batch %s line %s failed", batch_id, line, exc_info=err)
        error = errors.server_error("request")
    return _failure(custom_id, request_id, error.status, error.to_dict())


# ---------------------------------------------------------------------------------------------
# finalize: the output and error files, the final status
# ---------------------------------------------------------------------------------------------


def _jsonl(outcomes: list[dict]):
    for outcome in outcomes:
        yield (json.dumps(outcome, separators=(",", ":")) + "\n").encode()


def _file_once(batch_id: str, field: str, create) -> str:
    """The file recorded in `field`, created now if the batch has none (a redelivered finalize reuses it)."""
    rt = runtime()
    existing = rt.redis.hget(batch_key(batch_id), field)
    if existing:
        return existing
    file_id = create()
    if not rt.redis.hsetnx(batch_key(batch_id), field, file_id):  # another finalize got there first
        _files().delete(file_id)
        return rt.redis.hget(batch_key(batch_id), field)
    return file_id


@app.task(name=FINALIZE_TASK)
def finalize_batch(batch_id: str) -> None:
    rt = runtime()
    store = _store()
    record = store.record(batch_id)
    if record is None or record["status"] in FINAL:
        return
    cancelling = record["status"] == "cancelling" or bool(rt.redis.exists(cancel_key(batch_id)))
    store.set_status(batch_id, "finalizing")
    outcomes = store.outcomes(batch_id)
    order = {k: int(v) for k, v in rt.redis.hgetall(lines_key(batch_id)).items()}
    ranked = sorted(outcomes.values(), key=lambda o: order.get(o["custom_id"], 0))
    succeeded = [o for o in ranked if o.get("response") and o["response"].get("status_code") == 200]
    failed = [o for o in ranked if not (o.get("response") and o["response"].get("status_code") == 200)]
    files = _files()
    project = record.get("project", "")  # the output belongs to whoever owns the batch
    fields = {}
    for field, outcomes_in_file, suffix in (("output_file_id", succeeded, "output"), ("error_file_id", failed, "error")):
        if outcomes_in_file:
            fields[field] = _file_once(batch_id, field, lambda: files.create(
                purpose="batch_output", filename=f"{batch_id}_{suffix}.jsonl", source=_jsonl(outcomes_in_file),
                project=project)["id"])
    if cancelling:
        status = "cancelled"
    elif rt.redis.exists(expired_key(batch_id)):
        status = "expired"
    else:
        status = "completed"
    store.set_status(batch_id, status, **fields)
    store.forget_lines(batch_id)  # its outcomes are in its files now
    fair_share.admission(rt.redis).discard(batch_id, project)  # chunks still waiting (expired lines)
