"""Batch records in Redis: the OpenAI Batch object, and each line's outcome recorded exactly once.

A line's outcome is stored with HSETNX under its `custom_id` and the request counts move in the
same atomic script only when that store succeeded, so a line task that is redelivered after its
worker died (and runs again) can neither be counted twice nor appear twice in the output files.
Records have no TTL: a batch outlives Redis restarts (AOF) and lives until deleted. What it keeps
per line (outcomes, line numbers, dropped lines, deliveries) goes once finalize has written the
output and error files and set the final status: a finished batch is its record, whatever its size.

A batch belongs to the project of the key that created it (`project`, "" without keys); its
output and error files belong to the same project. `get` and `list` take the reader's project:
another project's batch is not found, exactly as an unknown id.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

import redis

INDEX = "localq:batches"
FINAL = frozenset({"completed", "failed", "expired", "cancelled"})
TIMESTAMPS = ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at",
              "cancelled_at")

# KEYS: results hash, batch hash. ARGV: custom_id, outcome json, counter field ("completed"/"failed"),
# input tokens, output tokens. Returns 1 if the outcome was recorded now, 0 if this custom_id already
# had one: the counts and the token usage move only with the first outcome of a line. A batch with
# its final status takes no outcome (its outcomes are in its files, and no longer in Redis).
_RECORD = """
local status = redis.call('HGET', KEYS[2], 'status')
if status == 'completed' or status == 'failed' or status == 'expired' or status == 'cancelled' then
  return 0
end
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
  redis.call('HINCRBY', KEYS[2], 'input_tokens', ARGV[4])
  redis.call('HINCRBY', KEYS[2], 'output_tokens', ARGV[5])
  return 1
end
return 0
"""


# KEYS: batch hash, dropped set, results hash. ARGV: custom_id. A line of a cancelled batch counts
# as dropped once, unless it has an outcome: one script, so a retried call cannot count it short.
_DROP = """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'completed' or status == 'failed' or status == 'expired' or status == 'cancelled' then
  return 0
end
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then return 0 end
if redis.call('SADD', KEYS[2], ARGV[1]) == 1 then
  redis.call('HINCRBY', KEYS[1], 'dropped', 1)
  return 1
end
return 0
"""

# KEYS: batch hash. ARGV: total, now. Start a validated batch only if it is still waiting to run:
# validating -> in_progress (1); cancelling keeps its status (2); anything else (expired by the
# sweep meanwhile, say) is left alone (0).
_START = """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'validating' then
  redis.call('HSET', KEYS[1], 'status', 'in_progress', 'total', ARGV[1], 'in_progress_at', ARGV[2])
  return 1
elseif status == 'cancelling' then
  redis.call('HSET', KEYS[1], 'total', ARGV[1], 'in_progress_at', ARGV[2])
  return 2
end
return 0
"""


def project_index(project: str) -> str:
    """The list index of one project's batches; "" (a server without keys) lists them all."""
    return f"{INDEX}:project:{project}" if project else INDEX


def batch_key(batch_id: str) -> str:
    return f"localq:batch:{batch_id}"


def results_key(batch_id: str) -> str:
    return f"localq:batch:{batch_id}:results"


def cancel_key(batch_id: str) -> str:
    return f"localq:batch:{batch_id}:cancel"


def dropped_key(batch_id: str) -> str:
    return f"localq:batch:{batch_id}:dropped"


def finalize_key(batch_id: str) -> str:
    return f"localq:batch:{batch_id}:finalize"


def expired_key(batch_id: str) -> str:
    return f"localq:batch:{batch_id}:expired"


def deliveries_key(batch_id: str) -> str:
    """custom_id of a lines message's first line -> deliveries of that message."""
    return f"localq:batch:{batch_id}:deliveries"


def lines_key(batch_id: str) -> str:
    """custom_id -> input line number, so the output files keep the input's order."""
    return f"localq:batch:{batch_id}:lines"


#: What a batch keeps per line (or per message) while it runs.
LINE_KEYS = (results_key, lines_key, dropped_key, deliveries_key, expired_key, cancel_key, finalize_key)


def new_batch_id() -> str:
    return "batch_" + secrets.token_hex(16)


class BatchStore:
    def __init__(self, client: redis.Redis):
        self.client = client
        self._record = client.register_script(_RECORD)
        self._drop = client.register_script(_DROP)
        self._start = client.register_script(_START)

    def create(self, *, input_file_id: str, endpoint: str, completion_window: str, metadata: dict | None,
               window_seconds: int, base_url: str = "", project: str = "") -> dict:
        """A new `validating` batch of `project`; `base_url` is where the API that took it serves
        generated files."""
        batch_id = new_batch_id()
        now = int(time.time())
        fields = {
            "id": batch_id, "input_file_id": input_file_id, "endpoint": endpoint,
            "completion_window": completion_window, "status": "validating", "created_at": now,
            "expires_at": now + window_seconds, "metadata": json.dumps(metadata) if metadata is not None else "",
            "total": 0, "completed": 0, "failed": 0, "base_url": base_url, "project": project,
        }
        pipe = self.client.pipeline()
        pipe.hset(batch_key(batch_id), mapping=fields)
        pipe.zadd(INDEX, {batch_id: now})
        if project:
            pipe.zadd(project_index(project), {batch_id: now})
        pipe.execute()
        return self.get(batch_id)

    def record(self, batch_id: str) -> dict[str, str] | None:
        raw = self.client.hgetall(batch_key(batch_id))
        return {_text(k): _text(v) for k, v in raw.items()} or None

    def get(self, batch_id: str, project: str | None = None) -> dict | None:
        """The Batch object; None when there is none, or it is not `project`'s (None: any project's)."""
        record = self.record(batch_id)
        if not record or (project is not None and record.get("project", "") != project):
            return None
        return batch_object(record)

    def list(self, *, after: str | None = None, limit: int = 20, project: str = "") -> tuple[list[dict], bool]:
        """`project`'s batches ("" all of them), newest first, as OpenAI lists batches; `after` is
        the id the previous page ended with."""
        index = project_index(project)
        start = 0
        if after:
            rank = self.client.zrevrank(index, after)
            if rank is None:
                return [], False
            start = rank + 1
        ids = [_text(i) for i in self.client.zrevrange(index, start, start + limit)]
        batches = [b for b in (self.get(i) for i in ids[:limit]) if b]
        return batches, len(ids) > limit

    def set_status(self, batch_id: str, status: str, **fields: Any) -> None:
        """Move to `status`, stamping its `<status>_at` time where OpenAI has one."""
        stamp = f"{status}_at"
        values = {"status": status, **{k: v if isinstance(v, str | int) else json.dumps(v) for k, v in fields.items()}}
        if stamp in TIMESTAMPS:
            values[stamp] = int(time.time())
        self.client.hset(batch_key(batch_id), mapping=values)

    def record_outcome(self, batch_id: str, custom_id: str, outcome: dict, *, failed: bool) -> bool:
        """Keep the first outcome of a line; False if it already had one (a redelivered line)."""
        return self.record_outcomes(batch_id, [(custom_id, outcome, failed)]) == [True]

    def record_outcomes(self, batch_id: str, outcomes: list[tuple[str, dict, bool]]) -> list[bool]:
        """`record_outcome` for several `(custom_id, outcome, failed)` lines in one round trip."""
        if not outcomes:
            return []
        pipe = self.client.pipeline(transaction=False)
        for custom_id, outcome, failed in outcomes:
            input_tokens, output_tokens = _tokens(outcome)
            self._record(keys=[results_key(batch_id), batch_key(batch_id)],
                         args=[custom_id, json.dumps(outcome, separators=(",", ":")),
                               "failed" if failed else "completed", input_tokens, output_tokens], client=pipe)
        return [bool(recorded) for recorded in pipe.execute()]

    def start(self, batch_id: str, total: int) -> bool:
        """Record `total` lines and move a validating batch to `in_progress` (a cancelling one
        stays cancelling); False when the batch is no longer waiting to run."""
        return bool(self._start(keys=[batch_key(batch_id)], args=[total, int(time.time())]))

    def drop(self, batch_id: str, custom_id: str, dropped_set: str) -> bool:
        """Count a line of a cancelled batch as dropped, once, unless it has an outcome."""
        return bool(self._drop(keys=[batch_key(batch_id), dropped_set, results_key(batch_id)], args=[custom_id]))

    def forget_lines(self, batch_id: str) -> None:
        """Drop what the batch kept per line, once its final status is set: its outcomes are in its
        output and error files, and its record keeps the counts (see the module's text)."""
        self.client.delete(*(key(batch_id) for key in LINE_KEYS))

    def outcomes(self, batch_id: str) -> dict[str, dict]:
        """Every recorded line outcome by custom_id (read in slices, for large batches)."""
        found = {}
        for custom_id, raw in self.client.hscan_iter(results_key(batch_id), count=1000):
            found[_text(custom_id)] = json.loads(raw)
        return found

    def counts(self, batch_id: str) -> tuple[int, int, int]:
        total, completed, failed = self.client.hmget(batch_key(batch_id), "total", "completed", "failed")
        return int(total or 0), int(completed or 0), int(failed or 0)


def batch_object(record: dict[str, str]) -> dict:
    """The OpenAI Batch object of a record. Fields not set yet (`errors`, the output and error file
    ids, the timestamps of states not reached) are left out: OpenAI's schema has no null for them."""
    batch: dict[str, Any] = {
        "id": record["id"],
        "object": "batch",
        "endpoint": record["endpoint"],
        "input_file_id": record["input_file_id"],
        "completion_window": record["completion_window"],
        "status": record["status"],
        "created_at": int(record["created_at"]),
        "request_counts": {"total": int(record.get("total") or 0), "completed": int(record.get("completed") or 0),
                           "failed": int(record.get("failed") or 0)},
        "metadata": json.loads(record["metadata"]) if record.get("metadata") else None,
    }
    if record.get("errors"):
        batch["errors"] = json.loads(record["errors"])
    for name in ("output_file_id", "error_file_id"):
        if record.get(name):
            batch[name] = record[name]
    for name in ("expires_at", *TIMESTAMPS):
        if record.get(name):
            batch[name] = int(record[name])
    input_tokens, output_tokens = int(record.get("input_tokens") or 0), int(record.get("output_tokens") or 0)
    batch["usage"] = {
        "input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }
    return batch


def _tokens(outcome: dict) -> tuple[int, int]:
    """(input, output) tokens of a line's response body: chat, completions and embeddings usage."""
    usage = ((outcome.get("response") or {}).get("body") or {}).get("usage") or {}
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))  # a Response's usage names them so
    completion = usage.get("completion_tokens", usage.get("output_tokens"))
    return (prompt if isinstance(prompt, int) else 0), (completion if isinstance(completion, int) else 0)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value
