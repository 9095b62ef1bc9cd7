"""Issue 10, finding 2: work that no one waits for.

A prompt that cannot fit the context is refused before the expensive part (by the API when the
number of messages alone rules it out, by the worker from the prompt's size or a tokenization
that stops at the context size); tokenization stays linear however many chat-template markers
the prompt holds; and a job whose client left stops in every phase (after the model load,
while the prompt is prepared, while it is evaluated), not only between generated tokens.

No timed assertions: the tests check the structure of the work (which calls were made, with
what) and, end to end, that an abandoned job ends `cancelled` before it produced a token.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import redis
import yaml

from api.settings import DEFAULT_MODELS_DIR, Settings
from workers import capabilities, sampling
from workers.cache import ModelCache
from workers.config import ModelConfig
from workers.errors import JobError
from workers.execute import execute
from workers.registry import ModelRegistry

CHAT_MODEL = "gpt-4o-mini"
MARKER = b"<|im_start|>"  # SmolLM2's chat template opens every message with it
MAX_MARKERS_PER_CALL = 65  # the splitter's bound on special tokens per llama.cpp tokenize call


def many(n: int, content: str = "hello there") -> list[dict]:
    return [{"role": "user", "content": content}] * n


# ---------------------------------------------------------------------------------------------
# the cheap bound known before queueing (pure)
# ---------------------------------------------------------------------------------------------


def _config(**overrides) -> ModelConfig:
    values = {"name": "m", "source": Path("/models/m.yaml"), "created": 0, "model_file": None,
              "backend": "llama-cpp", "context_size": 16}
    return ModelConfig(**{**values, **overrides})


def test_more_messages_than_context_tokens_is_context_length_exceeded():
    problem = capabilities.unsupported("chat", _config(), {"model": "m", "messages": many(16)})
    assert problem is not None
    param, message = problem
    assert param == "messages" and problem.code == "context_length_exceeded"
    assert message.startswith("This model's maximum context length is 16 tokens. However, your messages")
    assert capabilities.unsupported("chat", _config(), {"model": "m", "messages": many(15)}) is None


def test_default_context_size_applies_without_a_config_value():
    config = _config(context_size=None)
    assert config.context_tokens == 2048
    assert capabilities.unsupported("chat", config, {"messages": many(2048)}).code == "context_length_exceeded"
    assert capabilities.unsupported("chat", config, {"messages": many(2047)}) is None


def test_token_prompts_longer_than_the_context_are_refused():
    problem = capabilities.unsupported("completion", _config(), {"prompt": list(range(16))})
    assert tuple(problem)[0] == "prompt" and problem.code == "context_length_exceeded"
    problem = capabilities.unsupported("completion", _config(), {"prompt": [[1, 2], list(range(20))]})
    assert tuple(problem)[0] == "prompt[1]" and problem.code == "context_length_exceeded"
    assert capabilities.unsupported("completion", _config(), {"prompt": list(range(15))}) is None
    assert capabilities.unsupported("completion", _config(), {"prompt": "x" * 100}) is None  # needs the tokenizer


def test_other_problems_keep_their_code():
    problem = capabilities.unsupported("chat", _config(), {"messages": many(1), "modalities": ["audio"]})
    assert problem.code == "unsupported_parameter"


def test_api_refuses_100000_messages_before_queueing(redis_server, redis_db):
    from api.app import create_app

    client = create_app(Settings.from_env({"LOCALQ_REDIS_URL": redis_server.url})).test_client()
    response = client.post("/v1/chat/completions", json={"model": CHAT_MODEL, "messages": many(100_000)})
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert error["type"] == "invalid_request_error"
    assert "maximum context length is 2048 tokens" in error["message"]
    assert redis_db.dbsize() == 0  # nothing was queued


# ---------------------------------------------------------------------------------------------
# the worker: the real SmolLM2 tokenizer
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def config() -> ModelConfig:
    return replace(ModelRegistry.load(DEFAULT_MODELS_DIR).resolve(CHAT_MODEL), threads=1)


@pytest.fixture(scope="module")
def backend(config):
    from workers.backends.llama_cpp import LlamaCppBackend

    loaded = LlamaCppBackend(config)
    yield loaded
    loaded.close()


class Spy:
    """Records every call of one method of an object (an instance attribute shadows it)."""

    def __init__(self, owner, name: str):
        self.calls: list[tuple] = []
        self._owner, self._name = owner, name
        self._shadowed = owner.__dict__.get(name)  # an earlier spy's, restored on close
        self._real = getattr(owner, name)

        def spy(*args, **kwargs):
            self.calls.append(args)
            return self._real(*args, **kwargs)

        setattr(owner, name, spy)

    def close(self) -> None:
        if self._shadowed is None:
            delattr(self._owner, self._name)
        else:
            setattr(self._owner, self._name, self._shadowed)


@pytest.fixture
def spy_on():
    spies: list[Spy] = []

    def make(owner, name: str) -> Spy:
        spies.append(Spy(owner, name))
        return spies[-1]

    yield make
    for spy in reversed(spies):
        spy.close()


TRICKY = [
    "",
    "plain text without markers",
    "<|im_start|>",
    "<|im_start|><|im_end|><|im_start|>",
    "<|im_start|>user\n  spaced   out  <|im_end|>\n\n<|im_start|>",
    "<|im_st<|im_start|>art|> nested <|im_end|><|im_end|>",
    "<|endoftext|>é中文🙂<|im_end|>" * 3,
    "trailing <|im_start",
]


@pytest.mark.parametrize("text", TRICKY)
def test_tokens_are_those_of_one_llama_call(backend, text):
    whole = backend.llm.tokenize(text.encode(), add_bos=True, special=True)
    assert backend.tokenize(text, add_special=True) == whole


def test_many_markers_are_tokenized_in_bounded_pieces(backend, spy_on):
    prompt = backend._formatter(messages=many(3000) + [{"role": "user", "content": "<|im_start|> x"}]).prompt
    whole = backend.llm.tokenize(prompt.encode(), add_bos=False, special=True)
    calls = spy_on(backend.llm, "tokenize").calls
    assert backend.tokenize(prompt, add_special=False) == whole
    assert len(calls) > 1
    assert max(call[0].count(MARKER) for call in calls) <= MAX_MARKERS_PER_CALL
    assert b"".join(call[0] for call in calls) == prompt.encode()


def test_20000_messages_are_refused_before_rendering(backend, spy_on):
    renders = spy_on(backend, "_formatter").calls
    tokenizations = spy_on(backend.llm, "tokenize").calls
    with pytest.raises(JobError) as info:
        backend.chat_prompt(many(20_000))
    error = info.value
    assert error.status == 400 and error.code == "context_length_exceeded" and error.param == "messages"
    assert error.message == ("This model's maximum context length is 2048 tokens. However, your messages resulted "
                             "in at least 20000 tokens. Please reduce the length of the messages.")
    assert renders == [] and tokenizations == []


def test_a_long_prompt_stops_tokenizing_at_the_context_size(backend, spy_on):
    messages = many(1500, "1 2 3 4 5 6 7 8 9")  # about 33,000 tokens
    calls = spy_on(backend.llm, "tokenize").calls
    with pytest.raises(JobError) as info:
        backend.chat_prompt(messages)
    error = info.value
    assert error.code == "context_length_exceeded" and error.param == "messages"
    counted = int(re.search(r"resulted in at least (\d+) tokens", error.message).group(1))
    assert 2048 <= counted < 4000
    assert calls and max(call[0].count(MARKER) for call in calls) <= MAX_MARKERS_PER_CALL
    prompt = backend._formatter(messages=messages).prompt.encode()
    assert sum(len(call[0]) for call in calls) < len(prompt) / 5  # the rest was never tokenized


def test_a_prompt_too_large_for_any_tokenization_is_refused_untokenized(backend, spy_on):
    calls = spy_on(backend.llm, "tokenize").calls
    with pytest.raises(JobError) as info:
        backend.chat_prompt([{"role": "user", "content": "The sea. " * 200_000}])
    assert info.value.code == "context_length_exceeded" and "at least" in info.value.message
    assert calls == []
    with pytest.raises(JobError) as info:
        backend.completion_prompt("The sea. " * 200_000)
    assert info.value.code == "context_length_exceeded" and info.value.param == "prompt"
    assert calls == []


def test_prompt_that_fits_is_exact(backend):
    tokens = backend.chat_prompt(many(3))
    prompt = backend._formatter(messages=many(3)).prompt
    assert tokens == backend.llm.tokenize(prompt.encode(), add_bos=False, special=True)


def test_preparation_stops_when_cancelled(backend, spy_on):
    calls = spy_on(backend.llm, "tokenize").calls
    assert backend.chat_prompt(many(1500), cancelled=lambda: len(calls) >= 1) is None
    assert len(calls) == 1  # one piece tokenized, then it stopped


# ---------------------------------------------------------------------------------------------
# cancellation through execute: after the model load, during the prompt's evaluation
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def loads():
    return []


@pytest.fixture
def run_job(config, backend, loads):
    cache = ModelCache(loader=lambda _config: loads.append(_config) or backend)
    registry = ModelRegistry([config])

    def run(request: dict, cancelled) -> list[tuple[str, dict]]:
        events: list[tuple[str, dict]] = []
        job = {"id": "job1", "kind": "chat", "model": CHAT_MODEL, "created": 1700000000,
               "request": {"model": CHAT_MODEL, **request}}
        execute(job, lambda kind, data: events.append((kind, data)), cancelled, registry=registry, cache=cache)
        return events

    return run


def test_cancelled_while_the_model_loads_prepares_nothing(run_job, backend, spy_on, loads):
    calls = spy_on(backend.llm, "tokenize").calls
    events = run_job({"messages": many(3), "max_tokens": 4}, lambda: bool(loads))  # yes once it is loaded
    assert len(loads) == 1 and events == [] and calls == []


def greedy(config, **request) -> dict:
    return sampling.resolve("chat", {"temperature": 0, **request}, config)


def long_prompt(backend) -> list[int]:
    prompt = backend.tokenize("The sea is wide and deep. " * 280, add_special=False)  # about 1,960 tokens
    assert 6 * backend.engine.prefill_chunk < len(prompt) < backend.n_ctx
    return prompt


def after_one_engine_step(backend):
    """A cancel check that turns true once the engine has run a step (read a first chunk)."""
    start = backend.engine.steps
    return lambda: backend.engine.steps > start


def test_cancelled_during_prompt_evaluation(backend, config):
    prompt = long_prompt(backend)
    generation = backend.start(prompt, greedy(config), param="prompt").choice(1, after_one_engine_step(backend))
    pieces = list(generation)
    assert generation.finish_reason == "cancelled"
    assert pieces == [] and generation.completion_tokens == 0
    read = len(backend.engine.slots[0].cached)
    assert 0 < read < len(prompt) - 1  # it stopped part way through the prompt


def test_evaluated_prefix_is_reused_after_a_cancel(backend, config):
    prompt = long_prompt(backend)
    list(backend.start(prompt, greedy(config), param="prompt").choice(1, after_one_engine_step(backend)))
    kept = len(backend.engine.slots[0].cached)
    assert kept >= backend.engine.prefill_chunk
    generation = backend.start(prompt, greedy(config, max_tokens=2), param="prompt").choice(1, lambda: False)
    assert "".join(piece.text for piece in generation) and generation.completion_tokens == 2
    assert generation.cached_tokens == kept  # what the cancelled one read was not read again


# ---------------------------------------------------------------------------------------------
# end to end: a client that leaves a long prompt's non-streaming call frees the worker at once
# ---------------------------------------------------------------------------------------------

LONG_MODEL = "smollm2-long-context"
LONG_PROMPT = [{"role": "user", "content": "The sea is wide and deep. " * 2000}]  # about 14,000 tokens


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    from tests.service import running_service

    models = tmp_path_factory.mktemp("models")
    shipped = DEFAULT_MODELS_DIR / "smollm2-135m-instruct.yaml"
    # one slot: a job sent after the abandoned one runs only once that one has let go of the worker
    chat = {**yaml.safe_load(shipped.read_text()), "parallel": 1}
    (models / shipped.name).write_text(yaml.safe_dump(chat))
    long_context = {**chat, "name": LONG_MODEL, "aliases": [], "context_size": 16384}
    (models / "long.yaml").write_text(yaml.safe_dump(long_context))
    with running_service(tmp_path_factory.mktemp("svc"), {"LOCALQ_MODELS_DIR": str(models)}) as svc:
        for model in (LONG_MODEL, CHAT_MODEL):  # both loaded: the jobs below go straight to their prompts
            httpx.post(svc.base_url + "/v1/chat/completions", timeout=300,
                       json={"model": model, "messages": many(1), "max_tokens": 1}).raise_for_status()
        yield svc


def _job_created_after(store, since: float, model: str):
    for key in store.scan_iter("localq:job:job_*"):
        if key.count(":") == 2 and float(store.hget(key, "created_at") or 0) >= since \
                and store.hget(key, "model") == model:
            return store.hgetall(key)
    return None


def test_client_leaving_a_long_prompt_frees_the_worker(service):
    from tests.service import wait_until

    store = redis.Redis.from_url(service.redis.url, decode_responses=True)
    started = time.time()
    with pytest.raises(httpx.ReadTimeout):  # the client gives up after about a second
        httpx.post(service.base_url + "/v1/chat/completions", timeout=httpx.Timeout(30, read=1.0),
                   json={"model": LONG_MODEL, "messages": LONG_PROMPT, "max_tokens": 8})
    job = wait_until(lambda: _job_created_after(store, started, LONG_MODEL), 10, "the long job's record")
    # queued behind it on the only worker: served once the abandoned job stops
    behind = httpx.post(service.base_url + "/v1/chat/completions", timeout=120,
                        json={"model": CHAT_MODEL, "messages": many(1), "max_tokens": 2})
    assert behind.status_code == 200 and behind.json()["choices"][0]["message"]["content"] is not None
    record = wait_until(lambda: (r := store.hgetall(f"localq:job:{job['id']}"))["status"] == "cancelled" and r, 30,
                        "the abandoned job to be cancelled")
    assert float(record["finished_at"]) <= float(store.hget(f"localq:job:{behind.headers['x-localq-job-id']}",
                                                            "started_at")) + 0.5
    # it stopped while its prompt was evaluated: not one token was generated
    contents = [json.loads(fields["data"])["choices"][0]["delta"].get("content")
                for _, fields in store.xrange(f"localq:job:{job['id']}:events") if fields["type"] == "delta"]
    assert not any(contents)
