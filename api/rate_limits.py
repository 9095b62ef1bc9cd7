"""Rate limits on `/v1` model operations: requests and tokens per minute per project (and per
model where a project has a limit for it), counted in Redis (`store.rate_limits`) so that they hold
across API processes and machines.

`admit(call)` runs after a request is validated and before its handler queues anything; every
operation whose body names a `model` is counted. A request over a limit is answered 429
`rate_limit_exceeded` with `Retry-After`; every answer to a counted request carries OpenAI's
`x-ratelimit-*` headers (added when the response is made, so a stream has them before its body).

Tokens are estimated before the request runs, as OpenAI does: a quarter of the characters of its
text (messages, prompt, input, instructions, suffix; token id arrays count one per id), plus the
completion it may produce: `max_completion_tokens` or `max_tokens` (times `n`), else the model
config's `max_tokens`, else 16 for completions (OpenAI's default there) and
`DEFAULT_CHAT_COMPLETION_TOKENS` for chat. The estimate is not corrected by the actual usage.
"""

from __future__ import annotations

import hashlib
import math
import time
from typing import Any

import redis
from flask import Flask, current_app, g

from api.errors import APIError
from api.queue import queue_runtime
from schemas.openai_errors import queue_unavailable
from store.rate_limits import (
    OPEN_PROJECT,
    PROJECT_WIDE,
    RPM,
    TPM,
    Decision,
    RateLimitStore,
    State,
    admit_request,
    duration,
)

#: Completion tokens counted for a chat request that sets no maximum (and whose model config has none).
DEFAULT_CHAT_COMPLETION_TOKENS = 1024
COMPLETION_DEFAULT = {"createCompletion": 16, "createChatCompletion": DEFAULT_CHAT_COMPLETION_TOKENS}
#: Body fields whose text is the request's input.
TEXT_FIELDS = ("messages", "prompt", "input", "instructions", "suffix", "content")
#: Keys inside those whose values are not text (images, audio, files, ids).
NOT_TEXT = frozenset({"image_url", "input_audio", "file", "file_data", "file_id", "data", "url", "id",
                      "tool_call_id", "role", "type", "detail", "format"})
MAX_WALK = 100_000  # values looked at, at most, while estimating (bodies are bounded already)

_HEADERS = "localq_rate_limit_headers"
_ROWS_PRESENT = "localq.rate_limit_rows"  # (read at, whether any project has rows of its own)
ROWS_PRESENT_MAX_AGE = 1.0  # seconds
HEADER_NAMES = {RPM: "requests", TPM: "tokens"}


def install_rate_limits(app: Flask) -> None:
    app.after_request(_add_headers)


def project_of_request() -> str:
    tenant = g.get("tenant")
    return tenant.project_id if tenant is not None else OPEN_PROJECT


def admit(call) -> None:
    """Charge the request to its project's budgets; 429 when it does not fit. Nothing is done
    for an operation without a `model`, or when no limit applies to the project."""
    body = call.body
    model = body.get("model") if isinstance(body, dict) else None
    if not isinstance(model, str):
        return
    defaults = current_app.config["LOCALQ"].rate_limits
    try:
        client = queue_runtime().redis
        rows_present = _rows_present(client)
        if not defaults.per_minute() and not rows_present:
            return
        config = current_app.extensions["localq.models"].resolve(model)
        scope = config.name if config is not None else None  # aliases share their model's budgets
        project = project_of_request()
        tokens = estimate_tokens(call.operation["operation_id"], body, config)
        rows = None if rows_present else {}
        decision = admit_request(client, project, scope, tokens, defaults, rows=rows)
    except redis.RedisError as err:
        raise queue_unavailable().with_headers({"Retry-After": "5"}) from err
    if decision is None:
        return
    setattr(g, _HEADERS, headers(decision))
    if not decision.allowed:
        raise exceeded(decision, project)


def headers(decision: Decision) -> dict[str, str]:
    """OpenAI's `x-ratelimit-*` headers: for requests and for tokens, the budget with least left."""
    found: dict[str, str] = {}
    for field, name in HEADER_NAMES.items():
        state = decision.tightest(field)
        if state is None:
            continue
        found[f"x-ratelimit-limit-{name}"] = str(state.budget.limit)
        found[f"x-ratelimit-remaining-{name}"] = str(state.remaining)
        found[f"x-ratelimit-reset-{name}"] = duration(state.reset_ms)
    return found


def exceeded(decision: Decision, project: str) -> APIError:
    """OpenAI's 429 for a request over a limit; `type` says which: "requests" or "tokens"."""
    state: State = decision.blocking()  # type: ignore[assignment]
    budget = state.budget
    unit = "requests per min (RPM)" if budget.field == RPM else "tokens per min (TPM)"
    where = f"project {project}" if budget.scope == PROJECT_WIDE else f"{budget.scope} in project {project}"
    if state.too_large:
        return APIError(429, f"Request too large for {where} on {unit}: Limit {budget.limit}, "
                             f"Requested {budget.cost}. The input or output tokens must be reduced in order "
                             f"to run successfully.", type=budget.kind, code="rate_limit_exceeded")
    seconds = max(1, math.ceil(state.retry_ms / 1000))
    return APIError(429, f"Rate limit reached for {where} on {unit}: Limit {budget.limit}, Used {state.used}, "
                         f"Requested {budget.cost}. Please try again in {duration(state.retry_ms)}.",
                    type=budget.kind, code="rate_limit_exceeded", headers={"Retry-After": str(seconds)})


def _add_headers(response):
    found = g.get(_HEADERS)
    if found:
        for name, value in found.items():
            response.headers[name] = value
    return response


def _rows_present(client: redis.Redis) -> bool:
    """Whether any project has limits of its own, read at most once a second per API process.
    Without Redis it keeps what it last knew, so that a server without limits answers as before."""
    read_at, present = current_app.extensions.get(_ROWS_PRESENT, (float("-inf"), False))
    now = time.monotonic()
    if now - read_at >= ROWS_PRESENT_MAX_AGE:
        try:
            present = RateLimitStore(client).any()
        except redis.RedisError:
            pass  # Redis away: keep what was last known (the request itself will tell)
        current_app.extensions[_ROWS_PRESENT] = (now, present)
    return present


def rows_changed() -> None:
    """A project's rows were just written: this process reads them from its next request on."""
    current_app.extensions.pop(_ROWS_PRESENT, None)


def listed_projects() -> set[str]:
    """The projects of the keys listed in LOCALQ_API_KEYS (each key a project of its own)."""
    keys = current_app.config["LOCALQ"].api_keys
    return {"proj_" + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:24] for key in keys}


# --- the token estimate ---------------------------------------------------------------------------

def estimate_tokens(operation_id: str, body: dict, config: Any = None) -> int:
    """Prompt tokens (characters / 4, rounded up, plus token ids) and the completion allowance."""
    counter = _TextCounter()
    for field in TEXT_FIELDS:
        if field in body:
            counter.walk(body[field])
    prompt = math.ceil(counter.chars / 4) + counter.token_ids
    return prompt + completion_allowance(operation_id, body, config)


def completion_allowance(operation_id: str, body: dict, config: Any = None) -> int:
    if operation_id not in COMPLETION_DEFAULT:
        return 0
    asked = next((body[name] for name in ("max_completion_tokens", "max_tokens")
                  if isinstance(body.get(name), int) and not isinstance(body.get(name), bool)), None)
    if asked is None:
        configured = ((getattr(config, "parameters", None) or {}).get("max_tokens")) if config is not None else None
        asked = configured if isinstance(configured, int) else COMPLETION_DEFAULT[operation_id]
    choices = body.get("n") if isinstance(body.get("n"), int) and not isinstance(body.get("n"), bool) else 1
    best_of = body.get("best_of") if operation_id == "createCompletion" else None
    if isinstance(best_of, int) and not isinstance(best_of, bool):
        choices = max(choices, best_of)
    return max(0, asked) * max(1, choices)


class _TextCounter:
    def __init__(self):
        self.chars = 0
        self.token_ids = 0
        self.seen = 0

    def walk(self, value: Any) -> None:
        stack = [value]
        while stack and self.seen < MAX_WALK:
            item = stack.pop()
            self.seen += 1
            if isinstance(item, str):
                self.chars += len(item)
            elif isinstance(item, bool):
                continue
            elif isinstance(item, int):
                self.token_ids += 1  # an element of a token id array
            elif isinstance(item, dict):
                stack.extend(child for key, child in item.items() if key not in NOT_TEXT)
            elif isinstance(item, list):
                stack.extend(item)
