"""OpenAI's project rate limit operations, over `store.rate_limits`:

- `GET /v1/organization/projects/{project_id}/rate_limits` lists the project's limits: first its
  own row for all models together (id `rl-*`, model `*`), then one per configured model
  (`rl-<model>`), each with what applies: the model's own limits where it has them, else the
  project's. 0 means no limit.
- `POST /v1/organization/projects/{project_id}/rate_limits/{rate_limit_id}` sets fields of one
  row: `max_requests_per_1_minute`, `max_tokens_per_1_minute`, `batch_1_day_max_input_tokens`
  (an integer, 0: no limit; null, a localq extension: back to the server's default for `rl-*`, or
  to the project's limit for a model).

Both need an owner key (or a server without keys). Projects are the ones `localq keys` made, the
projects of keys listed in LOCALQ_API_KEYS, and `default`, the one project of a server without keys.
"""

from __future__ import annotations

from flask import current_app

from api.auth import require_owner
from api.errors import APIError
from api.pages import page
from api.queue import queue_runtime, setting
from api.rate_limits import listed_projects, rows_changed
from schemas.openai_errors import invalid, unsupported_parameter
from store.api_keys import KeyStore
from store.rate_limits import FIELDS, OPEN_PROJECT, PROJECT_WIDE, UNENFORCED, Limits, RateLimitStore

MAX_LIST_LIMIT = 100
MAX_LIMIT = 10**12
ID_PREFIXES = ("rl-", "rl_")


def _project(project_id: str) -> str:
    client = queue_runtime().redis
    known = (project_id == OPEN_PROJECT or project_id in listed_projects()
             or KeyStore(client).project_by_id(project_id) is not None)
    if not known:
        raise APIError(404, f"No project found with id '{project_id}'.", param="project_id", code="not_found")
    return project_id


def _models() -> list[str]:
    return [config.name for config in current_app.extensions["localq.models"].list()]


def rate_limit_object(model: str, project_limits: Limits, model_limits: Limits) -> dict:
    row = {"object": "project.rate_limit", "id": f"rl-{model}", "model": model}
    for field in FIELDS:
        value = model_limits.get(field) if model_limits.get(field) is not None else project_limits.get(field)
        row[field] = value or 0
    return row


def _rows(project: str, models: list[str]) -> list[dict]:
    store = RateLimitStore(queue_runtime().redis)
    defaults = setting("rate_limits")
    rows = store.rows(project)
    project_limits, _ = store.effective(project, None, defaults, rows)
    found = [rate_limit_object(PROJECT_WIDE, project_limits, Limits())]
    for model in models:
        found.append(rate_limit_object(model, *store.effective(project, model, defaults, rows)))
    return found


def _limit(query: dict) -> int:
    raw = query.get("limit", "100")
    try:
        limit = int(raw)
    except (TypeError, ValueError):
        limit = 0
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise APIError(400, f"Invalid 'limit': {raw!r}. Expected an integer between 1 and {MAX_LIST_LIMIT}.",
                       param="limit", code="integer_out_of_range")
    return limit


def list_project_rate_limits(call):
    require_owner()
    project = _project(call.path["project_id"])
    items = _rows(project, _models())
    limit = _limit(call.query)
    ids = [item["id"] for item in items]
    after, before = call.query.get("after"), call.query.get("before")
    if after:
        items = items[ids.index(after) + 1:] if after in ids else []
    elif before:
        items = items[:ids.index(before)] if before in ids else []
        items = items[-limit:] if len(items) > limit else items
        return page(items, False)
    return page(items[:limit], len(items) > limit)


def _model_of(rate_limit_id: str) -> str:
    name = next((rate_limit_id[len(prefix):] for prefix in ID_PREFIXES if rate_limit_id.startswith(prefix)), None)
    if name == PROJECT_WIDE:
        return PROJECT_WIDE
    config = current_app.extensions["localq.models"].resolve(name) if name else None
    if config is None:
        raise APIError(404, f"No rate limit found with id '{rate_limit_id}'.", param="rate_limit_id",
                       code="not_found")
    return config.name


def _changes(body) -> dict[str, int | None]:
    if not isinstance(body, dict):
        raise invalid(None, "The request body must be a JSON object.")
    changes: dict[str, int | None] = {}
    for field, value in body.items():
        if field in UNENFORCED:
            raise unsupported_parameter(field, f"'{field}' is not enforced by localq; set "
                                               f"{', '.join(FIELDS)}.")
        if field not in FIELDS:
            raise invalid(field, f"Unrecognized request argument supplied: {field}", "unknown_parameter")
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or not 0 <= value <= MAX_LIMIT):
            raise invalid(field, f"Invalid '{field}': expected an integer from 0 (no limit) to {MAX_LIMIT}, "
                                 f"or null (the default), got {value!r}.")
        changes[field] = value
    return changes


def update_project_rate_limits(call):
    require_owner()
    project = _project(call.path["project_id"])
    model = _model_of(call.path["rate_limit_id"])
    changes = _changes(call.body)
    RateLimitStore(queue_runtime().redis).update(project, model, changes)
    rows_changed()
    [row] = [item for item in _rows(project, [] if model == PROJECT_WIDE else [model]) if item["model"] == model]
    return row


HANDLERS = {
    "list-project-rate-limits": list_project_rate_limits,
    "update-project-rate-limits": update_project_rate_limits,
}
