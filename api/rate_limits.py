"""Rate limits on `/v1` model operations: requests and tokens per minute per project (and per
model where a project has a limit for it), counted in Redis (`store.rate_limits`) so that they hold
across API processes and machines.

`admit(call)` runs after a request is validated and before its handler queues anything; every
operation whose body names a `model` is counted. A request over a limit is answered 429
`rate_limit_exceeded` with `Retry-After`; every answer to a counted request carries OpenAI's
`x-ratelimit-*` headers (added when the response is made, so a stream has them before its body).

Tokens are estimated before the request runs, as OpenAI does (`store.rate_limits.estimate_tokens`):
a quarter of the characters of its text plus the completion it may produce.
"""

from __future__ import annotations

import hashlib
import math
import time

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
    estimate_tokens,
)

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
