"""Run one job: the single entry point the task layer calls in a worker process.

Chat and completion jobs emit every OpenAI streaming chunk as a "delta" event (also when the
client did not ask for a stream), then the full OpenAI response as one "result" event, built
from the same pieces, so the concatenated stream always equals the result. Other kinds emit
only the result. A cancelled job emits no result: it stops after the model load, between pieces
of its prompt's tokenization, between batches of the prompt's evaluation, or between tokens.
Chat and completion responses carry the model's `system_fingerprint` (`workers.fingerprint`).

Without a `seed` in the request (or the model config), sampling is seeded from the job id: a
job delivered again after its worker died replays the same tokens, so the deltas already
published stay a prefix of the new ones; two jobs still sample differently.
"""

from __future__ import annotations

import base64
import hashlib
import struct
import zlib
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

from schemas.openai_errors import OpenAIError, invalid, model_not_found
from workers import capabilities, sampling
from workers.tools.answer import ChatAnswer, ToolCallError
from workers.tools.formats import PARSERS
from workers.tools.formats.generic import GenericParser
from workers.tools.reasoning import ReasoningSplitter
from workers.tools.prompt import generic_messages
from workers.tools.request import REQUIRED, ToolRequest, ToolRequestError, tool_request
from workers.cache import ModelCache
from workers.config import ModelConfig
from workers.errors import JobError
from workers.registry import ModelRegistry

Emit = Callable[[str, dict], None]
Cancelled = Callable[[], bool]


#: Kinds whose requests are checked as those of another kind (a chat's prompt counted is a chat).
CHECKED_AS = {"chat_tokens": "chat"}


def execute(
    job: dict,
    emit: Emit,
    cancelled: Cancelled,
    *,
    registry: ModelRegistry,
    cache: ModelCache,
) -> None:
    """Run `job` (`{"id", "kind", "model", "request", "created"}`), reporting through `emit`.

    Raises JobError for failures the client caused (unknown model: 404; a request the model
    cannot honour, a prompt longer than the context: 400); anything else is a server error.
    """
    kind, name, request = job["kind"], job["model"], job["request"]
    handler = _HANDLERS.get(kind)
    if handler is None:
        raise ValueError(f"unknown job kind {kind!r}")
    config = registry.resolve(name)
    if config is None:
        raise model_not_found(name)
    problem = capabilities.unsupported(CHECKED_AS.get(kind, kind), config, request)
    if problem is not None:
        param, message = problem
        raise invalid(param, message, problem.code)
    if cancelled():
        return
    with cache.lease(config) as backend:  # the model stays loaded, and its share of jobs is kept
        if cancelled():  # the client may have left while the model loaded or while it waited its turn
            return
        handler(job, config, backend, emit, cancelled)


# ---------------------------------------------------------------------------------------------
# chat
# ---------------------------------------------------------------------------------------------


def _chat_prompt(request: dict, config: ModelConfig, backend: Any, cancelled: Cancelled, *, truncate: bool = False):
    """(prompt, sampling params, active tools, native): the chat rendered as the model will read it,
    its tools by the model's own template (native) or under a grammar (constrained); the prompt is
    None when `cancelled()` turned true on the way. `truncate` (the Responses API's `truncation:
    auto`): a chat too long for the context loses its oldest messages (after the system ones)
    until it fits."""
    params = sampling.resolve("chat", request, config)
    tools = _tools(request)
    active = tools if tools is not None and tools.active else None
    # `required` and a named choice always go the constrained way: only a grammar guarantees a call
    native = backend.tool_format != "constrained" and (active is None or active.mode != REQUIRED)
    messages, options = request["messages"], _template_options(request)
    if not native:
        if active is not None:
            from workers.tools.grammar import UnenforceableTool, answer_schema  # llama_cpp's converter: worker only

            try:
                schema = answer_schema(active)
            except UnenforceableTool as err:
                raise invalid(err.param, str(err)) from None
            params["response_format"] = {"type": "json_schema", "json_schema": {"schema": schema, "strict": True}}
    while True:
        try:
            if native:
                definitions = _definitions(active) if active else None
                prompt = backend.chat_prompt(messages, cancelled, tools=definitions, native=True, options=options)
            elif tools is not None or _carries_tools(messages):  # any template can render these
                prompt = backend.chat_prompt(generic_messages(messages, tools), cancelled, options=options)
            else:
                prompt = backend.chat_prompt(messages, cancelled, options=options)
            fits = prompt is None or len(prompt) < getattr(backend, "n_ctx", len(prompt) + 1)
            shorter = None if fits or not truncate else _without_oldest(messages)
            if shorter is None:
                return prompt, params, active, native  # one that does not fit is refused when it starts
        except OpenAIError as err:
            shorter = _without_oldest(messages) if truncate and err.code == capabilities.CONTEXT_LENGTH_EXCEEDED else None
            if shorter is None:
                raise
        messages = shorter


def _without_oldest(messages: list[dict]) -> list[dict] | None:
    """`messages` without the oldest one after the leading system messages (and the tool results
    that answered it); None when only the system messages and the last one are left."""
    head = 0
    while head < len(messages) and messages[head].get("role") in ("system", "developer"):
        head += 1
    if len(messages) - head <= 1:
        return None
    rest = messages[head + 1:]
    while len(rest) > 1 and rest[0].get("role") == "tool":  # results of calls no longer in the chat
        rest = rest[1:]
    return messages[:head] + rest


def _truncates(job: dict) -> bool:
    return job.get("truncation") == "auto"


def _chat_tokens(job: dict, config: ModelConfig, backend: Any, emit: Emit, cancelled: Cancelled) -> None:
    """How many tokens the chat's prompt is (`POST /v1/responses/input_tokens`), without generating."""
    prompt = _chat_prompt(job["request"], config, backend, cancelled, truncate=_truncates(job))[0]
    if prompt is not None:
        emit("result", {"object": "response.input_tokens", "input_tokens": len(prompt)})


def _chat(job: dict, config: ModelConfig, backend: Any, emit: Emit, cancelled: Cancelled) -> None:
    request = job["request"]
    style = backend.tool_format
    prompt, params, active, native = _chat_prompt(request, config, backend, cancelled, truncate=_truncates(job))
    if prompt is None:
        return
    markers = backend.reasoning_markers
    thinking = backend.opens_thinking(prompt)

    def reader(choice: int) -> ChatAnswer | None:
        """What reads choice `choice`'s output as it streams, when plain text is not all it can hold."""
        if active is None and not markers:
            return None
        parser = (PARSERS[style]() if native else GenericParser()) if active is not None else None
        splitter = ReasoningSplitter(*markers, thinking=thinking) if markers else None
        return ChatAnswer(active, parser, lambda call: _call_id(job, choice, call), splitter)

    run = backend.start(prompt, params, param="messages")
    stream = _Stream(emit, {
        "id": f"chatcmpl-{job['id']}",
        "object": "chat.completion.chunk",
        "created": job["created"],
        "model": job["model"],
        "system_fingerprint": backend.fingerprint,
    }, _include_usage(request))
    want_logprobs = params["logprobs"]
    choices, completion_tokens, cached_tokens = [], 0, 0
    seeds = [_seed(params["seed"], job, index) for index in range(request.get("n") or 1)]
    with _generations([(run, seeds)], cancelled, backend.concurrent_jobs) as generations:
        for index, generation in enumerate(generations):
            answer = reader(index)
            if answer is not None:
                chosen = _read_choice(stream, index, generation, answer, want_logprobs, choices)
            else:
                chosen = _chat_choice(stream, index, generation, want_logprobs, choices)
            if not chosen:
                return
            completion_tokens += generation.completion_tokens
            if index == 0:  # the prompt counts once, however many choices read it
                cached_tokens = generation.cached_tokens
    usage = _usage(len(run.prompt_tokens), completion_tokens, cached_tokens)
    stream.usage(usage)
    emit("result", {**stream.base, "object": "chat.completion", "choices": choices, "usage": usage})


@contextmanager
def _generations(runs_and_seeds: list, cancelled: Cancelled, window: int):
    """The answers of one request (each run's, one per seed), in order; each is handed to the
    engine when at most `window - 1` unread answers come before it, so they decode together, yet
    one request with many answers never takes more than `window` of the engine's slots at once
    (other jobs' sequences are admitted between its own). Read in order of index, so the stream's
    chunks come in the same order on every delivery of the job (a redelivery skips those already sent)."""
    generations = [generation for run, seeds in runs_and_seeds for generation in run.choices(seeds, cancelled)]
    try:
        yield _submitted_ahead(generations, window)
    finally:
        for generation in generations:
            generation.abandon()


def _submitted_ahead(generations: list, window: int):
    for index, generation in enumerate(generations):
        for ahead in generations[index:index + window]:
            ahead.submit()  # a no-op for those already submitted
        yield generation


def _chat_choice(stream, index: int, generation, want_logprobs, choices: list) -> bool:
    """Stream one chat answer and add it to `choices`; False if the job was cancelled meanwhile.

    The opening chunk (the role) goes out with the first piece, not before the first decode: sent
    apart, it woke the publisher, Redis, the API and the client while the first token was being
    computed, and on a small machine they took CPU time from it (the first token came later)."""
    opening = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    opened = False
    content: list[dict] = []
    for piece in generation:
        if not opened:
            stream.chunk([opening])
            opened = True
        entries = [_chat_logprob(info) for info in piece.logprobs] if want_logprobs else []
        content.extend(entries)
        stream.chunk([{
            "index": index,
            "delta": {"content": piece.text},
            "logprobs": {"content": entries, "refusal": None} if want_logprobs else None,
            "finish_reason": None,
        }])
    if generation.finish_reason == "cancelled":
        return False
    if not opened:  # an answer without text (it ended at once) still opens with its role
        stream.chunk([opening])
    stream.chunk([{"index": index, "delta": {}, "logprobs": None, "finish_reason": generation.finish_reason}])
    choices.append({
        "index": index,
        "message": {"role": "assistant", "content": generation.text, "refusal": None, "annotations": []},
        "logprobs": {"content": content, "refusal": None} if want_logprobs else None,
        "finish_reason": generation.finish_reason,
    })
    return True


def _read_choice(stream, index: int, generation, answer: ChatAnswer, want_logprobs, choices: list) -> bool:
    """Stream one answer as `answer` reads it (text, thinking, calls) and add it to `choices`;
    False if the job was cancelled meanwhile."""
    content: list[dict] = []
    waiting: list[dict] = []  # log probabilities of tokens whose text no delta has carried yet

    def send(deltas: list[dict]) -> None:
        for delta in deltas:
            logprobs = {"content": list(waiting), "refusal": None} if want_logprobs else None
            waiting.clear()
            stream.chunk([{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": None}])

    for piece in generation:
        entries = [_chat_logprob(info) for info in piece.logprobs] if want_logprobs else []
        content.extend(entries)
        waiting.extend(entries)
        send(answer.feed(piece.text))
    if generation.finish_reason == "cancelled":
        return False
    try:
        send(answer.close(generation.finish_reason))
        answer.check()
    except ToolCallError as err:
        raise JobError(500, str(err), code="invalid_tool_call") from None
    finish = answer.finish_reason(generation.finish_reason)
    message = answer.message()
    if not answer.calls and not answer.text and not answer.reasoning:  # an empty answer still opens with its role
        stream.chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                       "finish_reason": None}])
    stream.chunk([{"index": index, "delta": {}, "logprobs": None, "finish_reason": finish}])
    choices.append({
        "index": index,
        "message": message,
        "logprobs": {"content": content, "refusal": None} if want_logprobs else None,
        "finish_reason": finish,
    })
    return True


def _tools(request: dict) -> ToolRequest | None:
    try:
        return tool_request(request)
    except ToolRequestError as err:  # checked before the job was queued; a redelivered old job may differ
        raise invalid(err.param, str(err)) from None


def _definitions(tools: ToolRequest) -> list[dict]:
    """OpenAI's tool definitions of the functions `tools` allows, for a template that renders them."""
    return [{"type": "function", "function": {"name": f.name, "description": f.description,
                                              "parameters": f.parameters}} for f in tools.functions]


def _template_options(request: dict) -> dict:
    """Template variables a request sets: `reasoning_effort` as sent (gpt-oss's templates read it)
    and `enable_thinking` (Qwen3's), off for "none" and "minimal". Templates that read neither
    render as they would without them: the effort is then ignored."""
    effort = request.get("reasoning_effort")
    if effort is None:
        return {}
    return {"reasoning_effort": effort, "enable_thinking": effort not in ("none", "minimal")}


def _carries_tools(messages: list) -> bool:
    """Whether a conversation holds earlier tool calls or tool results (they need rendering as text)."""
    return any(isinstance(m, dict) and (m.get("role") in ("tool", "function") or m.get("tool_calls")
                                        or m.get("function_call")) for m in messages)


def _call_id(job: dict, choice: int, call: int) -> str:
    """The same id on every delivery of the job: a redelivery replays the same stream."""
    digest = hashlib.sha256(f"{job['id']}:{choice}:{call}".encode()).hexdigest()
    return f"call_{digest[:24]}"


def _chat_logprob(info) -> dict:
    return {
        "token": info.piece.decode("utf-8", errors="replace"),
        "logprob": info.logprob,
        "bytes": list(info.piece),
        "top_logprobs": [
            {"token": piece.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(piece)}
            for piece, logprob in info.top
        ],
    }


# ---------------------------------------------------------------------------------------------
# completions
# ---------------------------------------------------------------------------------------------


def _completion(job: dict, config: ModelConfig, backend: Any, emit: Emit, cancelled: Cancelled) -> None:
    request = job["request"]
    params = sampling.resolve("completion", request, config)
    n = request.get("n") or 1
    echo = bool(request.get("echo"))
    # Every prompt is checked before the first chunk goes out.
    prompts = []
    for position, prompt in enumerate(_prompts(request.get("prompt"))):
        param = "prompt" if position == 0 else f"prompt[{position}]"
        prepared = backend.completion_prompt(prompt, param=param, cancelled=cancelled)
        if prepared is None:
            return
        tokens, text = prepared
        prompts.append((backend.start(tokens, params, param=param), text))
    stream = _Stream(emit, {
        "id": f"cmpl-{job['id']}",
        "object": "text_completion",
        "created": job["created"],
        "model": job["model"],
        "system_fingerprint": backend.fingerprint,
    }, _include_usage(request))
    want_logprobs = params["logprobs"] is not None
    choices, prompt_tokens, completion_tokens, cached_tokens = [], 0, 0, 0
    seeds = [_seed(params["seed"], job, j) for j in range(n)]
    with _generations([(run, seeds) for run, _ in prompts], cancelled, backend.concurrent_jobs) as generations:
        for index, generation in enumerate(generations):  # every prompt's answers, prompt after prompt
            run, prompt_text = prompts[index // n]
            if not _completion_choice(stream, index, generation, prompt_text, echo, want_logprobs, choices):
                return
            completion_tokens += generation.completion_tokens
            if index % n == 0:  # each prompt counts once, however many choices read it
                prompt_tokens += len(run.prompt_tokens)
                cached_tokens += generation.cached_tokens
    usage = _usage(prompt_tokens, completion_tokens, cached_tokens)
    stream.usage(usage)
    emit("result", {**stream.base, "object": "text_completion", "choices": choices, "usage": usage})


def _completion_choice(stream, index: int, generation, prompt_text: str, echo: bool, want_logprobs: bool,
                       choices: list) -> bool:
    """Stream one completion and add it to `choices`; False if the job was cancelled meanwhile."""
    base_offset = len(prompt_text)
    text = ""
    logprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    if echo and prompt_text:
        text = prompt_text
        stream.chunk([{"text": prompt_text, "index": index, "logprobs": None, "finish_reason": None}])
    for piece in generation:
        chunk_logprobs = _completion_logprobs(piece.logprobs, base_offset) if want_logprobs else None
        if chunk_logprobs:
            for key, values in chunk_logprobs.items():
                logprobs[key].extend(values)
        text += piece.text
        stream.chunk([{"text": piece.text, "index": index, "logprobs": chunk_logprobs,
                       "finish_reason": None}])
    if generation.finish_reason == "cancelled":
        return False
    stream.chunk([{"text": "", "index": index, "logprobs": None, "finish_reason": generation.finish_reason}])
    choices.append({
        "text": text,
        "index": index,
        "logprobs": logprobs if want_logprobs else None,
        "finish_reason": generation.finish_reason,
    })
    return True


def _prompts(prompt: Any) -> list[str | list[int]]:
    """The prompts of a completions request: one string, strings, one token list, token lists."""
    if prompt is None:
        return [""]
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(item, int) for item in prompt):
        return [list(prompt)]
    return list(prompt) or [""]


def _completion_logprobs(entries, base_offset: int) -> dict:
    return {
        "tokens": [info.piece.decode("utf-8", errors="replace") for info in entries],
        "token_logprobs": [info.logprob for info in entries],
        "top_logprobs": [
            {
                **{piece.decode("utf-8", errors="replace"): logprob for piece, logprob in info.top},
                info.piece.decode("utf-8", errors="replace"): info.logprob,
            }
            for info in entries
        ],
        "text_offset": [base_offset + info.offset for info in entries],
    }


# ---------------------------------------------------------------------------------------------
# embeddings, tokenizer
# ---------------------------------------------------------------------------------------------


def _embedding(job: dict, config: ModelConfig, backend: Any, emit: Emit, cancelled: Cancelled) -> None:
    request = job["request"]
    outcome = backend.embed(_embedding_inputs(request), dimensions=request.get("dimensions"), cancelled=cancelled)
    if outcome is not None:
        emit("result", _embedding_result(job, *outcome))


def _embedding_inputs(request: dict) -> list:
    """A request's `input` as a list of texts or of token-id lists."""
    raw = request["input"]
    if isinstance(raw, str):
        return [raw]
    if raw and all(isinstance(item, int) for item in raw):
        return [list(raw)]
    return list(raw)


def _embedding_result(job: dict, vectors: list[list[float]], token_counts: list[int]) -> dict:
    as_base64 = job["request"].get("encoding_format") == "base64"
    tokens = sum(token_counts)
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": index, "embedding": _base64(vector) if as_base64 else vector}
            for index, vector in enumerate(vectors)
        ],
        "model": job["model"],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def execute_embeddings(
    jobs: list[dict],
    cancelled: Cancelled,
    *,
    registry: ModelRegistry,
    cache: ModelCache,
) -> list[dict | Exception | None]:
    """Run several embedding jobs, each one's result (or the exception it raised, or None if cancelled).

    Why: a batch's embedding lines are tiny requests, and one forward pass over many inputs costs
    far less than one pass per request. Jobs for the same model, `dimensions` and input type share
    one `embed` call and each gets back its own slice. If that shared call fails (one input too
    long, say), its jobs run one by one, so every job gets exactly the answer it would get alone.
    """
    outcomes: list[dict | Exception | None] = [None] * len(jobs)
    groups: dict[tuple, list[int]] = {}
    for index, job in enumerate(jobs):
        config = registry.resolve(job["model"])
        inputs = _embedding_inputs(job["request"])
        if config is None or not inputs or capabilities.unsupported("embedding", config, job["request"]):
            outcomes[index] = run_job(job, cancelled, registry, cache)
            continue
        key = (config.name, job["request"].get("dimensions"), isinstance(inputs[0], str))
        groups.setdefault(key, []).append(index)
    for (name, dimensions, _), members in groups.items():
        if cancelled():
            break
        inputs_of = [_embedding_inputs(jobs[i]["request"]) for i in members]
        flat = [item for inputs in inputs_of for item in inputs]
        try:
            with cache.lease(registry.resolve(name)) as backend:
                outcome = backend.embed(flat, dimensions=dimensions, cancelled=cancelled)
        except JobError:
            for i in members:
                outcomes[i] = run_job(jobs[i], cancelled, registry, cache)
            continue
        if outcome is None:
            break
        vectors, counts = outcome
        start = 0
        for i, inputs in zip(members, inputs_of, strict=True):
            end = start + len(inputs)
            outcomes[i] = _embedding_result(jobs[i], vectors[start:end], counts[start:end])
            start = end
    return outcomes


def run_job(job: dict, cancelled: Cancelled, registry: ModelRegistry, cache: ModelCache) -> dict | Exception | None:
    """Run one job to its result: the result body, the exception it raised, or None if cancelled."""
    result: dict = {}

    def emit(event: str, data: dict) -> None:
        if event == "result":
            result["body"] = data

    try:
        execute(job, emit, cancelled, registry=registry, cache=cache)
    except Exception as err:  # handed back to the caller, who records it as this job's failure
        return err
    return result.get("body")


def _base64(vector: list[float]) -> str:
    """OpenAI's base64 encoding: the little-endian float32 bytes of the vector."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def _tokenize(job: dict, config: ModelConfig, backend: Any, emit: Emit, cancelled: Cancelled) -> None:
    request = job["request"]
    tokens = backend.tokenize(request["content"], add_special=request.get("add_special", True))
    emit("result", {"tokens": tokens, "model": job["model"]})


def _detokenize(job: dict, config: ModelConfig, backend: Any, emit: Emit, cancelled: Cancelled) -> None:
    emit("result", {"content": backend.detokenize(job["request"]["tokens"]), "model": job["model"]})


# ---------------------------------------------------------------------------------------------
# shared
# ---------------------------------------------------------------------------------------------


class _Stream:
    """Emits chunks sharing one id; with include_usage every chunk has `usage: null` and a last
    chunk with no choices carries the usage."""

    def __init__(self, emit: Emit, base: dict, include_usage: bool):
        self._emit = emit
        self.base = base
        self._include_usage = include_usage

    def chunk(self, choices: list[dict]) -> None:
        chunk = {**self.base, "choices": choices}
        if self._include_usage:
            chunk["usage"] = None
        self._emit("delta", chunk)

    def usage(self, usage: dict) -> None:
        if self._include_usage:
            self._emit("delta", {**self.base, "choices": [], "usage": usage})


def _include_usage(request: dict) -> bool:
    return bool((request.get("stream_options") or {}).get("include_usage"))


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    """OpenAI's usage; `cached_tokens`: prompt tokens the engine found in its cache (not read again)."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def _seed(seed: int | None, job: dict, index: int) -> int:
    """Choice `index`'s seed: the request's seed + index, else one derived from the job id."""
    base = zlib.crc32(str(job["id"]).encode("utf-8")) if seed is None else seed
    return base + index


_HANDLERS: dict[str, Callable[..., None]] = {
    "chat": _chat,
    "completion": _completion,
    "embedding": _embedding,
    "tokenize": _tokenize,
    "chat_tokens": _chat_tokens,
    "detokenize": _detokenize,
}

# Media kinds: their handlers live beside their backends (and import nothing heavy at import time).
from workers import audio_jobs, image_jobs  # noqa: E402

_HANDLERS.update(image_jobs.HANDLERS)
_HANDLERS.update(audio_jobs.HANDLERS)
