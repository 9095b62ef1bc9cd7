"""The Batch API's work: validate a batch's input file, run its lines at batch priority, write its files.

Three Celery tasks, JSON arguments only:

* `localq.batch.start(batch_id)`: reads the input file line by line, checks every line (and that the
  worker's registry can run its model), then either fails the batch with OpenAI's `errors` list or
  moves it to `in_progress` and sends one `localq.batch.line` task per line to its model's device
  queue at batch priority (9), so interactive calls (0) go first.
* `localq.batch.line(batch_id, line, custom_id, body)`: runs one request in-process through
  `workers.execute` and records its outcome exactly once (`BatchStore.record_outcome`). A line of a
  cancelled batch is dropped (counted once in the batch hash's `dropped` field, never in the output);
  a line past `expires_at` is recorded as failed with `error.code` `batch_expired`. The line that
  brings completed + failed + dropped to the total sends `localq.batch.finalize`, once (SETNX).
* `localq.batch.finalize(batch_id)`: writes the output file (successful lines) and the error file
  (failed ones) through `FileStore`, in input order, and gives the batch its final status.
"""

from __future__ import annotations

import json
import logging
import secrets
import time

from celery.exceptions import SoftTimeLimitExceeded

from tasks.batch_input import check_lines
from tasks.batches import FINAL, BatchStore, batch_key
from tasks.celery_app import PRIORITIES, app
from tasks.filestore import FileNotFound, FileStore
from tasks.runtime import model_runtime, runtime

log = logging.getLogger(__name__)

START_TASK = "localq.batch.start"
LINE_TASK = "localq.batch.line"
FINALIZE_TASK = "localq.batch.finalize"
KINDS = {"/v1/chat/completions": "chat", "/v1/completions": "completion", "/v1/embeddings": "embedding"}
CANCEL_POLL = 0.25


def cancel_key(batch_id: str) -> str:
    return f"localq:batch:{batch_id}:cancel"


def dropped_key(batch_id: str) -> str:
    return f"localq:batch:{batch_id}:dropped"


def finalize_key(batch_id: str) -> str:
    return f"localq:batch:{batch_id}:finalize"


def expired_key(batch_id: str) -> str:
    return f"localq:batch:{batch_id}:expired"


def lines_key(batch_id: str) -> str:
    """custom_id -> input line number, so the output files keep the input's order."""
    return f"localq:batch:{batch_id}:lines"


def _store() -> BatchStore:
    return BatchStore(runtime().redis)


def _files() -> FileStore:
    rt = runtime()
    return FileStore(rt.redis, rt.settings.files_dir)


def _send_finalize(batch_id: str) -> None:
    if runtime().redis.set(finalize_key(batch_id), "1", nx=True):
        app.send_task(FINALIZE_TASK, args=[batch_id], queue="cpu", priority=PRIORITIES["interactive"])


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
        _send_finalize(batch_id)  # cancelled while waiting to be validated: nothing to run
        return
    endpoint = record["endpoint"]
    kind = KINDS[endpoint]
    registry = model_runtime()[0]
    from workers.capabilities import unsupported

    devices: dict[str, str] = {}

    def model_problem(model, body):
        config = registry.resolve(model) if isinstance(model, str) else None
        if config is None:
            return "model_not_found", f"The model '{model}' does not exist"
        problem = unsupported(kind, config, body)
        if problem is not None:
            return "unsupported_parameter", problem[1]
        devices[model] = config.device
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
    pipe = rt.redis.pipeline(transaction=False)
    for item in checked.lines:
        pipe.hset(lines_key(batch_id), item.custom_id, item.line)
    pipe.execute()
    store.set_status(batch_id, "in_progress", total=len(checked.lines))
    if rt.redis.exists(cancel_key(batch_id)):
        store.set_status(batch_id, "cancelling")  # cancelled while we validated: keep its status
    for item in checked.lines:
        app.send_task(LINE_TASK, args=[batch_id, item.line, item.custom_id, item.body],
                      queue=devices.get(item.body["model"], "cpu"), priority=PRIORITIES["batch"])


# ---------------------------------------------------------------------------------------------
# line: run one request, record its outcome once
# ---------------------------------------------------------------------------------------------


def _drop(batch_id: str, custom_id: str) -> None:
    """Count a line of a cancelled batch as dropped, once, unless it already has an outcome."""
    rt = runtime()
    if rt.redis.hexists(f"localq:batch:{batch_id}:results", custom_id):
        return
    if rt.redis.sadd(dropped_key(batch_id), custom_id) == 1:
        rt.redis.hincrby(batch_key(batch_id), "dropped", 1)


def _maybe_finalize(batch_id: str) -> None:
    total, completed, failed = _store().counts(batch_id)
    dropped = int(runtime().redis.hget(batch_key(batch_id), "dropped") or 0)
    if total and completed + failed + dropped >= total:
        _send_finalize(batch_id)


def _failure(custom_id: str, request_id: str, status: int, error: dict) -> dict:
    return {"id": _request_id(), "custom_id": custom_id,
            "response": {"status_code": status, "request_id": request_id, "body": {"error": error}},
            "error": None}


@app.task(name=LINE_TASK)
def run_line(batch_id: str, line: int, custom_id: str, body: dict) -> None:
    rt = runtime()
    store = _store()
    record = store.record(batch_id)
    if record is None or record["status"] in FINAL:
        return
    try:
        _run_line(rt, store, record, batch_id, line, custom_id, body)
    finally:
        _maybe_finalize(batch_id)


def _run_line(rt, store: BatchStore, record: dict, batch_id: str, line: int, custom_id: str, body: dict) -> None:
    if rt.redis.exists(cancel_key(batch_id)):
        _drop(batch_id, custom_id)
        return
    if time.time() > int(record.get("expires_at") or 0):
        rt.redis.set(expired_key(batch_id), "1")
        store.record_outcome(batch_id, custom_id, {
            "id": _request_id(), "custom_id": custom_id, "response": None,
            "error": {"code": "batch_expired",
                      "message": "This request could not be executed before the completion window expired."},
        }, failed=True)
        return

    from workers.errors import JobError
    from workers.execute import execute

    job_id = f"{batch_id}-{line}"
    job = {"id": job_id, "kind": KINDS[record["endpoint"]], "model": body["model"], "request": body,
           "created": int(time.time())}
    registry, cache = model_runtime()
    result: dict = {}
    cancelled = False
    next_check = 0.0

    def emit(event: str, data) -> None:
        if event == "result":
            result["body"] = data

    def is_cancelled() -> bool:
        nonlocal cancelled, next_check
        now = time.monotonic()
        if not cancelled and now >= next_check:
            next_check = now + CANCEL_POLL
            cancelled = bool(rt.redis.exists(cancel_key(batch_id)))
        return cancelled

    try:
        execute(job, emit, is_cancelled, registry=registry, cache=cache)
    except JobError as err:
        store.record_outcome(batch_id, custom_id, _failure(custom_id, job_id, err.status, err.to_dict()),
                             failed=True)
        return
    except SoftTimeLimitExceeded:
        store.record_outcome(batch_id, custom_id, _failure(custom_id, job_id, 504, {
            "message": "The request ran longer than its timeout.", "type": "timeout_error", "param": None,
            "code": "job_timeout"}), failed=True)
        return
    except Exception:
        log.exception("batch %s line %s failed", batch_id, line)
        store.record_outcome(batch_id, custom_id, _failure(custom_id, job_id, 500, {
            "message": "The worker had an error while running the request.", "type": "server_error",
            "param": None, "code": None}), failed=True)
        return
    if "body" not in result:  # stopped by a cancel while it ran
        _drop(batch_id, custom_id)
        return
    store.record_outcome(batch_id, custom_id, {
        "id": _request_id(), "custom_id": custom_id,
        "response": {"status_code": 200, "request_id": job_id, "body": result["body"]}, "error": None,
    }, failed=False)


# ---------------------------------------------------------------------------------------------
# finalize: the output and error files, the final status
# ---------------------------------------------------------------------------------------------


def _jsonl(outcomes: list[dict]):
    for outcome in outcomes:
        yield (json.dumps(outcome, separators=(",", ":")) + "\n").encode()


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
    fields: dict = {}
    if succeeded:
        fields["output_file_id"] = files.create(purpose="batch_output", filename=f"{batch_id}_output.jsonl",
                                                source=_jsonl(succeeded))["id"]
    if failed:
        fields["error_file_id"] = files.create(purpose="batch_output", filename=f"{batch_id}_error.jsonl",
                                               source=_jsonl(failed))["id"]
    if cancelling:
        status = "cancelled"
    elif rt.redis.exists(expired_key(batch_id)):
        status = "expired"
    else:
        status = "completed"
    store.set_status(batch_id, status, **fields)
