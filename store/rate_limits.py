"""Rate limits per project, and per model where one is configured, counted in Redis so that every
API process (and the batch tasks) draw on the same budgets.

Where the limits come from:
- server-wide defaults (`Limits.from_env`: LOCALQ_RATE_LIMIT_RPM, LOCALQ_RATE_LIMIT_TPM,
  LOCALQ_BATCH_TOKENS_PER_DAY), which bound every project as a whole;
- a project's own rows, in OpenAI's `project.rate_limit` shape: the row of model `*` (id `rl-*`)
  replaces the defaults for that project; the row of a model (id `rl-<model>`) adds a budget of
  that model's own, counted beside (not instead of) the project's. A stored 0 means "no limit".

Counting is GCRA, the generic cell rate algorithm (a token bucket kept as one number per budget):
a budget of L per window W refills continuously at L/W, holds at most L, and is kept as the time
at which it will be full again. A request costing c is admitted when c fits in what is there; it
is refused, at no cost, otherwise. So a project that spent its 3 requests per minute may send the
next one 20 s later, not at the turn of the minute, and `reset` (the time until the budget is
full again) is what OpenAI's `x-ratelimit-reset-*` headers say. Every budget a request draws on
is checked and charged in one Lua script, with Redis's own clock, so API processes on several
machines agree.

Redis layout:
- `localq:rate_limits`: set of the project ids that have rows of their own;
- `localq:rate_limits:<project>`: hash, model (`*` for the whole project) -> JSON {field: int};
- `localq:rate:<project>:<scope>:<budget>`: one budget's full-again time (ms, Redis clock), which
  expires when the budget is full (scope `*` or a model; budget `rpm`, `tpm` or `batch_tpd`).
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import redis

RPM, TPM, BATCH_TPD = "max_requests_per_1_minute", "max_tokens_per_1_minute", "batch_1_day_max_input_tokens"
FIELDS = (RPM, TPM, BATCH_TPD)
#: Fields of OpenAI's rate limit object that localq does not enforce.
UNENFORCED = ("max_images_per_1_minute", "max_audio_megabytes_per_1_minute", "max_requests_per_1_day")
ENV = {RPM: "LOCALQ_RATE_LIMIT_RPM", TPM: "LOCALQ_RATE_LIMIT_TPM", BATCH_TPD: "LOCALQ_BATCH_TOKENS_PER_DAY"}
#: The model of a project's own row for all its models together.
PROJECT_WIDE = "*"
#: The project of a server without keys (`g.tenant` None, `project_scope()` "").
OPEN_PROJECT = "default"
INDEX = "localq:rate_limits"
MINUTE_MS, DAY_MS = 60_000, 86_400_000
#: What each budget counts, and the window it refills over.
BUDGETS = {RPM: ("rpm", "requests", MINUTE_MS), TPM: ("tpm", "tokens", MINUTE_MS),
           BATCH_TPD: ("batch_tpd", "batch_tokens", DAY_MS)}


@dataclass(frozen=True)
class Limits:
    """One set of limits; None: none of that kind (0 in a stored row means the same)."""

    max_requests_per_1_minute: int | None = None
    max_tokens_per_1_minute: int | None = None
    batch_1_day_max_input_tokens: int | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Limits:
        """The server-wide defaults; a malformed value raises ValueError naming its variable."""
        return cls(**{field: _optional_positive(environ, name) for field, name in ENV.items()})

    def get(self, field: str) -> int | None:
        return getattr(self, field)

    def per_minute(self) -> bool:
        """Whether any per-minute limit is set (the ones a `/v1` request is checked against)."""
        return bool(self.max_requests_per_1_minute or self.max_tokens_per_1_minute)


def _optional_positive(environ: Mapping[str, str], name: str) -> int | None:
    raw = environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def _rows_key(project: str) -> str:
    return f"{INDEX}:{project}"


def counter_key(project: str, scope: str, field: str) -> str:
    return f"localq:rate:{project}:{scope}:{BUDGETS[field][0]}"


def project_or_open(project: str | None) -> str:
    """The project whose budgets a caller draws on: "" or None (no keys) is `OPEN_PROJECT`."""
    return project or OPEN_PROJECT


class RateLimitStore:
    """The projects' own rows (what `POST .../rate_limits/{id}` sets)."""

    def __init__(self, client: redis.Redis):
        self.client = client

    def any(self) -> bool:
        """Whether any project has a row of its own."""
        return bool(self.client.exists(INDEX))

    def rows(self, project: str, models: tuple[str, ...] | None = None) -> dict[str, dict[str, int]]:
        """model -> the fields set for it (`*`: the whole project); only `models` when given."""
        key = _rows_key(project)
        if models is None:
            found = self.client.hgetall(key)
        else:
            found = dict(zip(models, self.client.hmget(key, list(models)), strict=True)) if models else {}
        return {model: json.loads(raw) for model, raw in found.items() if raw}

    def update(self, project: str, model: str, changes: Mapping[str, int | None]) -> dict[str, int]:
        """Set (an int, 0: no limit) or clear (None: back to the default) fields of one row."""
        unknown = set(changes) - set(FIELDS)
        if unknown:
            raise ValueError(f"not rate limit fields: {sorted(unknown)}")
        key = _rows_key(project)
        result: dict[str, int] = {}

        def apply(pipe: redis.client.Pipeline) -> None:
            raw = pipe.hget(key, model)
            others = pipe.hlen(key) - (1 if raw else 0)
            row = json.loads(raw) if raw else {}
            for field, value in changes.items():
                if value is None:
                    row.pop(field, None)
                else:
                    row[field] = int(value)
            pipe.multi()
            if row:
                pipe.hset(key, model, json.dumps(row, sort_keys=True))
                pipe.sadd(INDEX, project)
            else:
                pipe.hdel(key, model)
                if not others:
                    pipe.srem(INDEX, project)
            result.clear()
            result.update(row)

        self.client.transaction(apply, key)  # WATCHes the project's rows: runs again if they changed
        return result

    def effective(self, project: str, model: str | None, defaults: Limits,
                  rows: Mapping[str, Mapping[str, int]] | None = None) -> tuple[Limits, Limits]:
        """(the project's limits, the model's own limits) for a request to `model` (None: no
        model's own). `rows` (from `rows`) saves the read when the caller has them."""
        if rows is None:
            rows = self.rows(project, (PROJECT_WIDE, model) if model else (PROJECT_WIDE,))
        wide = rows.get(PROJECT_WIDE, {})
        own = rows.get(model, {}) if model else {}
        project_limits = Limits(**{f.name: _limit(wide[f.name]) if f.name in wide else defaults.get(f.name)
                                   for f in fields(Limits)})
        model_limits = Limits(**{f.name: _limit(own[f.name]) for f in fields(Limits) if f.name in own})
        return project_limits, model_limits


def _limit(stored: int) -> int | None:
    return stored or None  # 0: no limit


# --- counting -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Budget:
    """One budget a request draws on: `cost` out of `limit` per window."""

    key: str
    field: str  # RPM, TPM or BATCH_TPD
    scope: str  # PROJECT_WIDE or a model
    limit: int
    cost: int

    @property
    def window_ms(self) -> int:
        return BUDGETS[self.field][2]

    @property
    def kind(self) -> str:
        """What it counts, as OpenAI names it in a 429's `type`: "requests" or "tokens"."""
        return BUDGETS[self.field][1]


@dataclass(frozen=True)
class State:
    """A budget after the check: what is left, when it is full again, when the request would fit."""

    budget: Budget
    remaining: int
    reset_ms: int
    retry_ms: int  # 0: it fits

    @property
    def too_large(self) -> bool:
        """The request costs more than the whole budget: waiting will not help."""
        return self.budget.cost > self.budget.limit

    @property
    def used(self) -> int:
        return self.budget.limit - self.remaining


@dataclass(frozen=True)
class Decision:
    allowed: bool
    states: tuple[State, ...]

    def blocking(self) -> State | None:
        """The budget that refused the request (requests before tokens, the longest wait first)."""
        over = [state for state in self.states if state.retry_ms > 0 or state.too_large]
        order = list(BUDGETS)
        over.sort(key=lambda state: (order.index(state.budget.field), -state.retry_ms))
        return over[0] if over else None

    def tightest(self, field: str) -> State | None:
        """Of the budgets of one kind, the one with the least left (what the headers report)."""
        found = [state for state in self.states if state.budget.field == field]
        return min(found, key=lambda state: (state.remaining, state.budget.limit), default=None)

    @property
    def retry_after_ms(self) -> int:
        return max((state.retry_ms for state in self.states), default=0)


# KEYS: the budgets; ARGV: for each, window (ms), limit, cost. Charges all or none.
_ADMIT = """
if redis.replicate_commands then redis.replicate_commands() end  -- Redis < 5: replicate the writes, not TIME
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local n = #KEYS
local plan = {}
local allowed = 1
for i = 1, n do
  local window = tonumber(ARGV[3 * i - 2])
  local limit = tonumber(ARGV[3 * i - 1])
  local cost = tonumber(ARGV[3 * i])
  local full_at = tonumber(redis.call('GET', KEYS[i]) or '0')
  if full_at < now then full_at = now end
  local after = full_at + cost * window / limit
  plan[i] = {window, limit, full_at, after}
  if after - now > window then allowed = 0 end
end
local out = {allowed}
for i = 1, n do
  local window, limit, full_at, after = plan[i][1], plan[i][2], plan[i][3], plan[i][4]
  local retry = 0
  if after - now > window then retry = math.max(1, math.ceil(after - window - now)) end
  local level = full_at
  if allowed == 1 then
    level = after
    redis.call('SET', KEYS[i], string.format('%.3f', after), 'PX', math.max(1, math.ceil(after - now)))
  end
  local remaining = math.floor(limit * (window - (level - now)) / window + 1e-6)
  if remaining < 0 then remaining = 0 end
  out[#out + 1] = remaining
  out[#out + 1] = math.ceil(level - now)
  out[#out + 1] = retry
end
return out
"""


def charge(client: redis.Redis, budgets: list[Budget]) -> Decision:
    """Check every budget and, when the request fits in all of them, charge it to all."""
    if not budgets:
        return Decision(True, ())
    args: list[int] = []
    for budget in budgets:
        args += [budget.window_ms, budget.limit, budget.cost]
    reply = _script(client)(keys=[budget.key for budget in budgets], args=args)
    states = tuple(State(budget, int(reply[1 + 3 * i]), int(reply[2 + 3 * i]), int(reply[3 + 3 * i]))
                   for i, budget in enumerate(budgets))
    return Decision(bool(reply[0]), states)


@functools.lru_cache(maxsize=16)
def _script(client: redis.Redis):
    # redis-py's Script runs EVALSHA and loads the script again after a Redis restart (NOSCRIPT)
    return client.register_script(_ADMIT)


def budgets(project: str, model: str | None, project_limits: Limits, model_limits: Limits,
            costs: Mapping[str, int]) -> list[Budget]:
    """The budgets a request costing `costs` ({field: cost}) draws on."""
    found = []
    for scope, limits in ((PROJECT_WIDE, project_limits), (model, model_limits)):
        if scope is None:
            continue
        for field, cost in costs.items():
            limit = limits.get(field)
            if limit:
                found.append(Budget(counter_key(project, scope, field), field, scope, limit, cost))
    return found


def admit_request(client: redis.Redis, project: str | None, model: str | None, tokens: int, defaults: Limits,
                  *, rows: Mapping[str, Mapping[str, int]] | None = None) -> Decision | None:
    """Charge one request (1 against requests per minute, `tokens` against tokens per minute) to
    the project's budgets and to `model`'s own where it has them; None when no limit applies."""
    project = project_or_open(project)
    project_limits, model_limits = RateLimitStore(client).effective(project, model, defaults, rows)
    found = budgets(project, model, project_limits, model_limits, {RPM: 1, TPM: max(0, int(tokens))})
    return charge(client, found) if found else None


def admit_batch_tokens(client: redis.Redis, project: str | None, model: str | None, tokens: int,
                       defaults: Limits | None = None) -> tuple[bool, float]:
    """Charge a batch's estimated input tokens for `model` to the project's batch budget (input
    tokens per day, apart from the per-minute ones) and to the model's own where it has one.

    Returns (admitted, retry_after seconds): (True, 0.0) when charged or no limit applies;
    (False, seconds until it would fit) when not, nothing charged; (False, math.inf) when the
    tokens exceed the whole daily budget. `defaults`: the server's (`Limits.from_env()` when None).
    """
    return admit_batch(client, project, {model: tokens} if model else {}, defaults,
                       unattributed=0 if model else tokens)


def admit_batch(client: redis.Redis, project: str | None, tokens_by_model: Mapping[str, int],
                defaults: Limits | None = None, *, unattributed: int = 0) -> tuple[bool, float]:
    """`admit_batch_tokens` for a batch whose lines name several models, all or nothing: the
    project's budget is charged the sum (plus `unattributed` tokens), each model's own budget its
    part. Use the models' config names (`ModelConfig.name`), so that aliases share a budget."""
    project = project_or_open(project)
    defaults = Limits.from_env() if defaults is None else defaults
    store = RateLimitStore(client)
    models = tuple(tokens_by_model)
    rows = store.rows(project, (PROJECT_WIDE, *models))
    total = max(0, int(unattributed)) + sum(max(0, int(tokens)) for tokens in tokens_by_model.values())
    project_limits, _ = store.effective(project, None, defaults, rows)
    found = budgets(project, None, project_limits, Limits(), {BATCH_TPD: total})
    for model, tokens in tokens_by_model.items():
        _, model_limits = store.effective(project, model, defaults, rows)
        found += budgets(project, model, Limits(), model_limits, {BATCH_TPD: max(0, int(tokens))})
    if not found:
        return True, 0.0
    decision = charge(client, found)
    if decision.allowed:
        return True, 0.0
    if any(state.too_large for state in decision.states):
        return False, math.inf
    return False, decision.retry_after_ms / 1000


def batch_tokens_left(client: redis.Redis, project: str | None, model: str | None,
                      defaults: Limits | None = None) -> int | None:
    """The batch input tokens `model` may still take today in the project; None: no limit."""
    project = project_or_open(project)
    defaults = Limits.from_env() if defaults is None else defaults
    project_limits, model_limits = RateLimitStore(client).effective(project, model, defaults)
    found = budgets(project, model, project_limits, model_limits, {BATCH_TPD: 0})
    if not found:
        return None
    return min(state.remaining for state in charge(client, found).states)


# --- the token estimate ---------------------------------------------------------------------------

#: Completion tokens counted for a chat request that sets no maximum (and whose model config has none).
DEFAULT_CHAT_COMPLETION_TOKENS = 1024
COMPLETION_DEFAULT = {"createCompletion": 16, "createChatCompletion": DEFAULT_CHAT_COMPLETION_TOKENS}
#: Body fields whose text is the request's input.
TEXT_FIELDS = ("messages", "prompt", "input", "instructions", "suffix", "content")
#: Keys inside those whose values are not text (images, audio, files, ids).
NOT_TEXT = frozenset({"image_url", "input_audio", "file", "file_data", "file_id", "data", "url", "id",
                      "tool_call_id", "role", "type", "detail", "format"})
MAX_WALK = 100_000  # values looked at, at most, while estimating (bodies are bounded already)


def prompt_tokens(body: dict) -> int:
    """A request body's input tokens, estimated: its text's characters / 4, rounded up, plus the
    ids of token id arrays. What a batch line costs its batch budget."""
    counter = _TextCounter()
    for field in TEXT_FIELDS:
        if field in body:
            counter.walk(body[field])
    return math.ceil(counter.chars / 4) + counter.token_ids


def estimate_tokens(operation_id: str, body: dict, config: Any = None) -> int:
    """What a request costs its tokens per minute: its prompt tokens and the completion it may
    produce (`completion_allowance`)."""
    return prompt_tokens(body) + completion_allowance(operation_id, body, config)


def completion_allowance(operation_id: str, body: dict, config: Any = None) -> int:
    """Chat and completions: `max_completion_tokens` or `max_tokens` (times `n`, or `best_of`),
    else the model config's (`config.parameters["max_tokens"]`), else 16 for completions (OpenAI's
    default there) and `DEFAULT_CHAT_COMPLETION_TOKENS` for chat. Other operations: 0."""
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


def duration(ms: int) -> str:
    """A time as OpenAI writes it in `x-ratelimit-reset-*` (Go's style): 20ms, 1s, 8.64s, 6m0s, 1h2m3s."""
    ms = max(0, int(ms))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds = f"{rest // 1000}" if rest % 1000 == 0 else f"{rest / 1000:.3f}".rstrip("0")
    text = f"{seconds}s"
    if hours or minutes:
        text = f"{minutes}m{text}"
    if hours:
        text = f"{hours}h{text}"
    return text
