"""`/v1/responses`: OpenAI's Responses API on the queue.

A response is a queued chat job (`tasks.responses`) whose event log holds the Responses API's own
stream events, each with its `sequence_number`; its Response object is stored (`store.responses`,
unless `store: false`), owned by the project of the key that made it, and kept up to date by the
worker. So a response can be answered at once (`background: true`, status `queued`), streamed,
awaited, retrieved, followed again from any sequence number (`GET ...?stream=true&starting_after=N`),
cancelled, and continued (`previous_response_id`), on any API process.
"""

from __future__ import annotations

import json
import time

from flask import Response

from api.auth import project_scope
from api.errors import APIError
from api.model_jobs import client_socket, enqueue, job_headers, json_response, wait_for_result
from api.queue import queue_runtime, setting
from api.sse import relay, sse_response, typed_frames
from schemas import openai_errors as errors
from schemas.openai_errors import OpenAIError
from store.events import Event
from store.jobs import FINAL_STATUSES, final_event, new_job_id
from store.responses import ResponseStore
from tasks.responses.job import KIND
from tasks.responses.request import chat_request, initial_response, input_items, input_param, new_response_id

FINAL = frozenset({"completed", "failed", "incomplete", "cancelled"})
TOKENS_KIND = "chat_tokens"
MAX_ITEMS_LIMIT = 100
CANCEL_WAIT = 5.0  # seconds a cancel waits for the worker to stop the response


def _store() -> ResponseStore:
    rt = queue_runtime()
    return ResponseStore(rt.redis, int(rt.settings.response_ttl))


def _not_found(response_id: str) -> APIError:
    return APIError(404, f"Response with id '{response_id}' not found.", param="response_id", code="not_found")


def _record(response_id: str) -> dict:
    found = _store().record(response_id, project_scope())
    if found is None:
        raise _not_found(response_id)
    return found


def _checked(body: dict) -> None:
    for name in ("model", "input"):  # the spec requires neither (prompts and conversations), localq both
        if body.get(name) is None:
            raise errors.invalid(name, f"Missing required parameter: '{name}'.", "missing_required_parameter")
    for name in ("conversation", "prompt"):
        if body.get(name) is not None:
            raise errors.unsupported_parameter(name, f"'{name}' is not supported by localq: send the input itself "
                                                     "(and previous_response_id to continue a conversation).")


def _history(store: ResponseStore, body: dict) -> list[dict]:
    """The stored conversation `previous_response_id` continues (none without one)."""
    previous = body.get("previous_response_id")
    if not previous:
        return []
    history = store.conversation(previous, project_scope())
    if history is None:
        raise APIError(404, f"Previous response with id '{previous}' not found.", param="previous_response_id",
                       code="previous_response_not_found")
    return history


def create_response(call):
    body = call.body or {}
    _checked(body)
    background, stored = bool(body.get("background")), body.get("store", True) is not False
    if background and not stored:
        raise errors.invalid("store", "A background response must be stored: send store=true (the default).")
    store, project = _store(), project_scope()
    history = _history(store, body)
    items = input_items(body)
    chat = chat_request(body, items, history)
    response_id, job_id = new_response_id(), new_job_id()
    response = initial_response(body, response_id, int(time.time()))
    if stored:
        store.create(response, items, project=project, job_id=job_id)  # before the job: the worker updates it
    try:
        rt, job = enqueue(KIND, chat, checked_as="chat", job_id=job_id, attached=not background,
                          extra={"response": response, "store": stored, "truncation": body.get("truncation")})
    except OpenAIError as err:
        if stored:
            store.delete(response_id)
        raise _as_sent(err, body, history) from None
    except Exception:
        if stored:
            store.delete(response_id)
        raise
    if body.get("stream"):
        return _stream(rt, job_id, deadline=None if background else job["deadline"])
    if background:
        return Response(_json(response), mimetype="application/json", headers=job_headers(job_id))
    return wait_for_result(rt, job, keepalive=setting("keepalive_interval"), respond=json_response,
                           patience=setting("relay_ride_over"))


def _stream(rt, job_id: str, *, deadline: float | None, starting_after: int | None = None):
    return sse_response(relay(rt, job_id, _frames(starting_after), keepalive=setting("keepalive_interval"),
                              deadline=deadline, grace=rt.settings.resume_grace, sock=client_socket(),
                              patience=setting("relay_ride_over")), job_id)


def _as_sent(err: OpenAIError, body: dict, history: list[dict]) -> OpenAIError:
    """A refusal of the chat request, naming what the Responses request sent (`input[2].content[1]`)."""
    if err.param:
        err.param = input_param(err.param, body, history)
    return err


def _frames(starting_after: int | None):
    """The job's Responses events as OpenAI frames them (`event: <type>`), those up to and
    including `starting_after` left out."""

    def render(event: Event):
        if event.type == "delta" and starting_after is not None \
                and isinstance(event.data, dict) and event.data.get("sequence_number", -1) <= starting_after:
            return
        yield from typed_frames(event)

    return render


def count_input_tokens(call):
    """`POST /v1/responses/input_tokens`: the prompt the request would be, rendered and counted
    by the model's worker (a job of its own; nothing is generated)."""
    body = call.body or {}
    _checked(body)
    chat = chat_request(body, input_items(body), _history(_store(), body))
    rt, job = enqueue(TOKENS_KIND, chat, checked_as="chat", extra={"truncation": body.get("truncation")})
    return wait_for_result(rt, job, keepalive=setting("keepalive_interval"), respond=json_response,
                           patience=setting("relay_ride_over"))


def get_response(call):
    response_id = call.path["response_id"]
    found = _record(response_id)
    if not call.query.get("stream"):
        return found["response"]
    rt = queue_runtime()
    job = rt.jobs.get(found["job_id"])
    # the job's record gone, or the job finished and its log compacted (past LOCALQ_RESUME_WINDOW)
    if job is None or (final_event(job) is not None and not rt.events.exists(found["job_id"])):
        raise APIError(400, f"The events of response '{response_id}' are no longer kept; retrieve it without "
                            "stream=true.", param="stream", code="events_expired")
    return _stream(rt, found["job_id"], deadline=None, starting_after=call.query.get("starting_after"))


def delete_response(call):
    response_id = call.path["response_id"]
    if not _store().delete(response_id, project_scope()):
        raise _not_found(response_id)
    return {"id": response_id, "object": "response", "deleted": True}


def cancel_response(call):
    response_id = call.path["response_id"]
    found = _record(response_id)
    response = found["response"]
    if not response.get("background"):
        raise APIError(400, "Only responses created with background=true can be cancelled.", param="response_id",
                       code="invalid_request")
    if response["status"] in FINAL:
        return response
    rt, store = queue_runtime(), _store()
    rt.jobs.request_cancel(found["job_id"])
    deadline = time.monotonic() + CANCEL_WAIT
    while time.monotonic() < deadline:
        job = rt.jobs.get(found["job_id"])
        current = store.get(response_id) or response
        if current["status"] in FINAL:
            return current
        if job is None or job.get("status") in FINAL_STATUSES:  # ended before it ever ran
            cancelled = {**current, "status": "cancelled"}
            store.update(cancelled)
            return cancelled
        time.sleep(0.05)
    return store.get(response_id) or response


def list_input_items(call):
    found = _record(call.path["response_id"])
    query = call.query
    limit = query.get("limit", 20)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_ITEMS_LIMIT:
        raise errors.invalid("limit", f"Invalid 'limit': {limit!r}. Expected an integer between 1 and "
                                      f"{MAX_ITEMS_LIMIT}.", "integer_out_of_range")
    items = found["input_items"] if query.get("order") == "asc" else list(reversed(found["input_items"]))
    after = query.get("after")
    if after:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise errors.invalid("after", f"No input item with id '{after}' in response '{found['response']['id']}'.")
        items = items[ids.index(after) + 1:]
    page = items[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else "",
            "last_id": page[-1]["id"] if page else "", "has_more": len(items) > limit}


def _json(value) -> str:
    return json.dumps(value, separators=(",", ":"))


HANDLERS = {
    "createResponse": create_response,
    "getResponse": get_response,
    "deleteResponse": delete_response,
    "cancelResponse": cancel_response,
    "listInputItems": list_input_items,
    "Getinputtokencounts": count_input_tokens,
}
