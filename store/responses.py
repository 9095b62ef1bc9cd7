"""Stored responses (the Responses API's `store: true`): the Response object, its input items, its
project and its job, in one Redis hash per response, kept for the retention (LOCALQ_RESPONSE_TTL,
30 days by default, counted from the last write).

`localq:response:<id>` holds `response` (the Response object as JSON: written when the response
is created, and again by the worker when it ends), `input_items` (JSON list), `project`, `job_id`
and `previous` (the previous response id, for the chain). Like files and batches, a response of
another project is not found, exactly as an unknown id.
"""

from __future__ import annotations

import json
import re
from typing import Any

import redis

DEFAULT_TTL = 30 * 86400
RESPONSE_ID = re.compile(r"resp_[0-9a-f]{48}")
#: How many earlier responses `previous_response_id` may reach back through.
MAX_CHAIN = 100


def response_key(response_id: str) -> str:
    return f"localq:response:{response_id}"


class ResponseStore:
    def __init__(self, client: redis.Redis, ttl: int = DEFAULT_TTL):
        self.client = client
        self.ttl = ttl

    def create(self, response: dict, input_items: list[dict], *, project: str, job_id: str) -> None:
        key = response_key(response["id"])
        pipe = self.client.pipeline()
        pipe.hset(key, mapping={"response": _json(response), "input_items": _json(input_items), "project": project,
                                "job_id": job_id, "previous": response.get("previous_response_id") or ""})
        pipe.expire(key, self.ttl)
        pipe.execute()

    def update(self, response: dict) -> bool:
        """Replace the stored Response object (the worker, when the response ends); False when it
        is not stored (deleted meanwhile, or never stored)."""
        key = response_key(response["id"])
        if not self.client.exists(key):
            return False
        pipe = self.client.pipeline()
        pipe.hset(key, "response", _json(response))
        pipe.expire(key, self.ttl)
        pipe.execute()
        return True

    def record(self, response_id: str, project: str | None = None) -> dict[str, Any] | None:
        """The stored response (`response`, `input_items`, `project`, `job_id`, `previous`); None when
        there is none, or it is another project's (`project` None: any project's)."""
        if not RESPONSE_ID.fullmatch(response_id or ""):
            return None
        raw = self.client.hgetall(response_key(response_id))
        if not raw:
            return None
        found = {_text(k): _text(v) for k, v in raw.items()}
        if project is not None and found.get("project", "") != project:
            return None
        return {**found, "response": json.loads(found["response"]), "input_items": json.loads(found["input_items"])}

    def get(self, response_id: str, project: str | None = None) -> dict | None:
        found = self.record(response_id, project)
        return found["response"] if found else None

    def delete(self, response_id: str, project: str | None = None) -> bool:
        if self.record(response_id, project) is None:
            return False
        return bool(self.client.delete(response_key(response_id)))

    def conversation(self, response_id: str, project: str) -> list[dict] | None:
        """Every item of the conversation up to and including response `response_id`, oldest first
        (each response's input items, then its output); None when a response of the chain is gone."""
        chain = []
        current: str | None = response_id
        while current:
            if len(chain) >= MAX_CHAIN:
                break
            found = self.record(current, project)
            if found is None:
                return None
            chain.append(found)
            current = found.get("previous") or None
        items: list[dict] = []
        for found in reversed(chain):
            items += found["input_items"] + [item for item in found["response"].get("output", [])
                                             if item.get("type") in ("message", "function_call")]
        return items


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value
