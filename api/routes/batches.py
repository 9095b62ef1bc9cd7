"""`/v1/batches`: OpenAI's Batch API. The API checks the input file and records the batch; the
`localq.batch.*` Celery tasks (`tasks.batch_run`) validate its lines, run them at batch priority
and write the output and error files.
"""

from __future__ import annotations

import re

from flask import request

from api.auth import project_scope
from api.errors import APIError
from api.pages import page, page_limit
from api.queue import queue_runtime, setting
from api.routes.files import file_store
from store.batches import FINAL, BatchStore, cancel_key
from tasks.batch_input import BATCH_ENDPOINTS
from tasks.celery_app import app
from tasks.routing import PRIORITIES, START_TASK

WINDOWS = {"24h": 86400}
MAX_LIST_LIMIT = 100
BATCH_ID = re.compile(r"batch_[0-9a-f]{32}")


def _store() -> BatchStore:
    return BatchStore(queue_runtime().redis)


def _window_seconds(window: str) -> int:
    """The completion window's seconds: LOCALQ_BATCH_WINDOW (tests, experiments) replaces every one."""
    return setting("batch_window") or WINDOWS[window]


def _not_found(batch_id: str) -> APIError:
    return APIError(404, f"No batch found with id '{batch_id}'.", param="batch_id", code="batch_not_found")


def _get(batch_id: str) -> dict:
    if not BATCH_ID.fullmatch(batch_id or ""):
        raise _not_found(batch_id)
    found = _store().get(batch_id, project_scope())
    if found is None:
        raise _not_found(batch_id)
    return found


def create_batch(call):
    body = call.body
    endpoint = body["endpoint"]
    if endpoint not in BATCH_ENDPOINTS:
        raise APIError(400, f"The endpoint {endpoint} is not supported by localq batches; use one of "
                            f"{', '.join(BATCH_ENDPOINTS)}.", param="endpoint", code="unsupported_endpoint")
    file_id = body["input_file_id"]
    found = file_store().get(file_id, project_scope())
    if found is None:
        raise APIError(404, f"No such File object: {file_id}", param="input_file_id", code="file_not_found")
    if found["purpose"] != "batch":
        raise APIError(400, f"The file {file_id} has purpose '{found['purpose']}'; a batch needs purpose 'batch'.",
                       param="input_file_id", code="invalid_file_purpose")
    batch = _store().create(input_file_id=file_id, endpoint=endpoint, completion_window=body["completion_window"],
                            metadata=body.get("metadata"), window_seconds=_window_seconds(body["completion_window"]),
                            base_url=request.host_url, project=project_scope())
    # ahead of the batch lines already queued (as finalize is): validating the input is short, and a
    # project's batch must not wait behind another's admitted lines to take its turn at all
    app.send_task(START_TASK, args=[batch["id"]], queue="cpu", priority=PRIORITIES["interactive"])
    return batch


def retrieve_batch(call):
    return _get(call.path["batch_id"])


def list_batches(call):
    query = call.query
    limit = page_limit(query, 20, MAX_LIST_LIMIT)
    after = query.get("after") or None
    items, has_more = _store().list(after=after, limit=limit, project=project_scope())
    # ListBatchesResponse has no null ids: an empty page leaves them out.
    return {key: value for key, value in page(items, has_more).items() if value is not None}


def cancel_batch(call):
    batch_id = call.path["batch_id"]
    batch = _get(batch_id)
    status = batch["status"]
    if status in ("cancelling", "cancelled"):
        return batch
    if status in FINAL or status == "finalizing":
        raise APIError(400, f"The batch {batch_id} is {status} and can no longer be cancelled.",
                       param="batch_id", code="batch_not_cancellable")
    rt = queue_runtime()
    rt.redis.set(cancel_key(batch_id), "1")
    _store().set_status(batch_id, "cancelling")
    return _get(batch_id)


HANDLERS = {
    "createBatch": create_batch,
    "retrieveBatch": retrieve_batch,
    "listBatches": list_batches,
    "cancelBatch": cancel_batch,
}
