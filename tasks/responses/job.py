"""A response job's part in `tasks.run`: the request runs as the chat job it carries, its events are
translated into the Responses API's (`tasks.responses.events`), and the stored Response follows
the job: `in_progress` when it starts, the final object (or `failed` / `cancelled`) when it ends.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from store.responses import ResponseStore
from tasks.responses.events import ResponseEvents, error_code

log = logging.getLogger(__name__)

KIND = "response"


def response_error(payload: dict) -> dict:
    """A job's error payload as a Response's `error`: its code where the spec has it, else server_error."""
    error = payload.get("error") or {}
    return {"code": error_code(error.get("code")), "message": error.get("message") or "The response failed."}


class ResponseJob:
    def __init__(self, rt, job: dict, emit):
        self.rt = rt
        self.job = job
        self.response = copy.deepcopy(job["response"])
        self.events = ResponseEvents(self.response, emit)
        self.stored = ResponseStore(rt.redis, int(rt.settings.response_ttl)) if job.get("store") else None

    @property
    def chat_job(self) -> dict:
        return {**self.job, "kind": "chat"}

    def start(self) -> None:
        """The Response is in progress (stored so); its first stream events."""
        self.response["status"] = "in_progress"
        self._store(self.response)
        self.events.start()

    def emit(self, type_: str, data: Any) -> None:
        self.events(type_, data)

    def ended(self, error: dict | None, *, cancelled: bool) -> None:
        """The job is over (its events flushed): store how the Response ended; a failed one also
        gets its `response.failed` event, ahead of the job's own error event."""
        if error is not None:
            failure = response_error(error)
            self.events.fail(failure, emit=self._append)
            self._store({**self.response, "status": "failed", "error": failure})
        elif cancelled:
            self._store({**self.response, "status": "cancelled"})
        elif self.events.final is not None:
            self._store(self.events.final)

    def _append(self, type_: str, data: Any) -> None:
        self.rt.events.append_many(self.job["id"], [(type_, data)])

    def _store(self, response: dict) -> None:
        if self.stored is None:
            return
        try:
            self.stored.update(response)
        except Exception:
            log.warning("response %s: not stored", response["id"], exc_info=True)
