"""The real SmolLM2 GGUF model run through `workers.execute.execute`, as a worker runs it."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from itertools import count

import pytest

from api.settings import DEFAULT_MODELS_DIR
from schemas.generated import SCHEMAS
from workers.cache import ModelCache
from workers.errors import JobError
from workers.execute import execute
from workers.registry import ModelRegistry

CHAT_MODEL = "gpt-4o-mini"
EXT = "x-localai-extensions"
HELLO = [{"role": "user", "content": "Write one sentence about the sea."}]
_ids = count()


@pytest.fixture(scope="module")
def registry() -> ModelRegistry:
    # The shipped configs, on one thread (llama.cpp threads spin: more than the free cores is slow).
    configs = [replace(config, threads=1) for config in ModelRegistry.load(DEFAULT_MODELS_DIR).list()]
    chat = next(config for config in configs if config.name == "smollm2-135m-instruct")
    embedder = replace(chat, name="smollm2-embeddings", aliases=(), embeddings=True, known_usecases=())
    return ModelRegistry([*configs, embedder])


@pytest.fixture(scope="module")
def cache() -> ModelCache:
    cache = ModelCache(max_models=2)
    yield cache
    cache.clear()


@pytest.fixture
def run(registry, cache):
    """Run a job; returns (deltas, result or None)."""

    def run_job(kind: str, request: dict, *, model: str = CHAT_MODEL, cancelled=lambda: False, job_id=None):
        events: list[tuple[str, dict]] = []
        job = {"id": job_id or f"job{next(_ids)}", "kind": kind, "model": model,
               "request": {"model": model, **request}, "created": 1700000000}
        execute(job, lambda kind, data: events.append((kind, data)), cancelled, registry=registry, cache=cache)
        deltas = [data for kind, data in events if kind == "delta"]
        results = [data for kind, data in events if kind == "result"]
        assert len(results) <= 1
        assert [kind for kind, _ in events] == ["delta"] * len(deltas) + ["result"] * len(results)
        return deltas, results[0] if results else None

    return run_job


def chat(run, cancelled=lambda: False, **request):
    return run("chat", {"messages": HELLO, **request}, cancelled=cancelled)


def choice_chunks(deltas, index=0):
    return [choice for chunk in deltas for choice in chunk["choices"] if choice["index"] == index]


def streamed_text(deltas, index=0, key=None):
    parts = []
    for choice in choice_chunks(deltas, index):
        parts.append(choice["delta"].get("content") or "" if key is None else choice[key])
    return "".join(parts)


def valid(schema: str, body: dict) -> dict:
    """Checks `body` against the generated response schema."""
    return SCHEMAS[schema]().load(body)


FINGERPRINT = re.compile(r"fp_[0-9a-f]{10}")


# ---------------------------------------------------------------------------------------------
# chat
# ---------------------------------------------------------------------------------------------


def test_chat_stream_matches_result(run):
    deltas, result = chat(run, max_tokens=12, temperature=0, logprobs=True)
    valid("CreateChatCompletionResponse", result)
    for chunk in deltas:
        valid("CreateChatCompletionStreamResponse", chunk)
        assert chunk["id"] == result["id"] and chunk["id"].startswith("chatcmpl-")
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["created"] == 1700000000 and chunk["model"] == CHAT_MODEL
        assert chunk["system_fingerprint"] == result["system_fingerprint"]
        assert "usage" not in chunk
    assert FINGERPRINT.fullmatch(result["system_fingerprint"])
    first, *middle, last = choice_chunks(deltas)
    assert first["delta"] == {"role": "assistant", "content": ""} and first["finish_reason"] is None
    assert all(set(c["delta"]) == {"content"} and c["finish_reason"] is None for c in middle)
    assert last["finish_reason"] == "length" and last["delta"] == {}
    message = result["choices"][0]["message"]
    assert message["role"] == "assistant" and message["content"]
    assert streamed_text(deltas) == message["content"]
    assert result["object"] == "chat.completion" and result["model"] == CHAT_MODEL
    usage = result["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == usage["total_tokens"]
    assert usage["completion_tokens"] == 12 == len(middle)  # one content delta per token
    assert len(result["choices"][0]["logprobs"]["content"]) == 12
    assert "".join(e["token"] for e in result["choices"][0]["logprobs"]["content"]) == message["content"]


def test_chat_prompt_tokens_are_the_templated_prompt(run, cache, registry):
    _, result = chat(run, max_tokens=1)
    backend = cache.get(registry.resolve(CHAT_MODEL))
    assert result["usage"]["prompt_tokens"] == len(backend.chat_prompt(HELLO))
    text = backend.detokenize(backend.chat_prompt(HELLO))
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")


def test_deltas_are_emitted_even_without_stream(run):
    deltas, result = chat(run, max_tokens=3, stream=False)
    assert len(deltas) >= 3 and result is not None


def test_max_completion_tokens_wins_and_stops_with_length(run):
    _, result = chat(run, max_tokens=9, max_completion_tokens=4, temperature=0)
    assert result["choices"][0]["finish_reason"] == "length"
    assert result["usage"]["completion_tokens"] == 4


def test_natural_end_is_stop(run):
    _, result = run("chat", {"messages": [{"role": "user", "content": "Say just: OK"}], "temperature": 0})
    assert result["choices"][0]["finish_reason"] == "stop"
    assert 0 < result["usage"]["completion_tokens"] < 200


def test_stop_sequence_cuts_the_answer(run):
    _, free = chat(run, max_tokens=16, temperature=0)
    text = free["choices"][0]["message"]["content"]
    words = text.split()
    stop = words[2]
    deltas, result = chat(run, max_tokens=16, temperature=0, stop=["@@@", stop])
    content = result["choices"][0]["message"]["content"]
    assert result["choices"][0]["finish_reason"] == "stop"
    assert content == text[: text.index(stop)]
    assert stop not in content
    assert streamed_text(deltas) == content


def test_seed_reproduces_sampled_text(run):
    settings = {"max_tokens": 16, "temperature": 0.8, "top_p": 1.0}
    first = chat(run, seed=1234, **settings)[1]["choices"][0]["message"]["content"]
    again = chat(run, seed=1234, **settings)[1]["choices"][0]["message"]["content"]
    assert first == again
    others = {chat(run, seed=seed, **settings)[1]["choices"][0]["message"]["content"] for seed in (1, 2, 3)}
    assert len(others | {first}) > 1


def test_without_seed_a_redelivered_job_replays_the_same_tokens(run):
    request = {"messages": HELLO, "max_tokens": 12, "temperature": 1.0, "top_p": 1.0}
    first = run("chat", request, job_id="same-job")
    again = run("chat", request, job_id="same-job")
    assert first == again
    others = {run("chat", request)[1]["choices"][0]["message"]["content"] for _ in range(3)}
    assert len(others | {first[1]["choices"][0]["message"]["content"]}) > 1


def test_n_choices_stream_in_turn_with_successive_seeds(run):
    settings = {"max_tokens": 8, "temperature": 1.0, "seed": 42}
    deltas, result = chat(run, n=2, **settings)
    indices = [choice["index"] for chunk in deltas for choice in chunk["choices"]]
    assert indices == sorted(indices) and set(indices) == {0, 1}
    assert [c["index"] for c in result["choices"]] == [0, 1]
    for index in (0, 1):
        assert streamed_text(deltas, index) == result["choices"][index]["message"]["content"]
        chunks = choice_chunks(deltas, index)
        assert chunks[0]["delta"]["role"] == "assistant" and chunks[-1]["finish_reason"] == "length"
    assert result["usage"]["completion_tokens"] == 16
    second_alone = chat(run, **{**settings, "seed": 43})[1]
    assert second_alone["choices"][0]["message"]["content"] == result["choices"][1]["message"]["content"]
    assert second_alone["usage"]["prompt_tokens"] == result["usage"]["prompt_tokens"]


def test_n_choices_decode_together_from_one_read_of_the_prompt(run, cache, registry):
    """n > 1: the siblings run in the engine at once (one decode step serves them all) and start
    from the prompt the first one read (prefix reuse), yet each is what it would be alone."""
    engine = cache.get(registry.resolve(CHAT_MODEL)).engine
    question = [{"role": "user", "content": "Tell me about rivers and " + "the sea " * 20}]
    steps, read, cached = engine.steps, engine.prompt_tokens, engine.cached_tokens
    result = run("chat", {"messages": question, "n": 3, "max_tokens": 12, "temperature": 0,
                          "x-localai-extensions": {"ignore_eos": True}})[1]
    prompt = result["usage"]["prompt_tokens"]
    assert result["usage"]["completion_tokens"] == 36
    assert engine.prompt_tokens - read == 3 * prompt
    assert engine.cached_tokens - cached >= 2 * (prompt - 1)  # the siblings read no prompt of their own
    assert engine.steps - steps < 2 * 12  # one after the other, 36 decode steps at least
    texts = {choice["message"]["content"] for choice in result["choices"]}
    alone = run("chat", {"messages": question, "max_tokens": 12, "temperature": 0,
                         "x-localai-extensions": {"ignore_eos": True}})[1]
    assert texts == {alone["choices"][0]["message"]["content"]}


def test_include_usage(run):
    deltas, result = chat(run, max_tokens=5, stream=True, stream_options={"include_usage": True})
    *chunks, final = deltas
    assert all("usage" in chunk and chunk["usage"] is None for chunk in chunks)
    assert final["choices"] == [] and final["usage"] == result["usage"]
    assert final["id"] == result["id"]
    valid("CreateChatCompletionStreamResponse", final)


def test_chat_logprobs(run):
    deltas, result = chat(run, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    entries = result["choices"][0]["logprobs"]["content"]
    assert len(entries) == result["usage"]["completion_tokens"] == 6
    for entry in entries:
        assert entry["logprob"] <= 0
        assert len(entry["top_logprobs"]) == 3
        tops = [top["logprob"] for top in entry["top_logprobs"]]
        assert tops == sorted(tops, reverse=True)
        # greedy: the chosen token is the most likely one
        assert entry["top_logprobs"][0]["token"] == entry["token"]
        assert entry["logprob"] == pytest.approx(tops[0])
        assert bytes(entry["bytes"]).decode() == entry["token"]
    streamed = [e for c in choice_chunks(deltas) if c.get("logprobs") for e in c["logprobs"]["content"]]
    assert streamed == entries


def test_no_logprobs_unless_asked(run):
    deltas, result = chat(run, max_tokens=2)
    assert result["choices"][0]["logprobs"] is None
    assert all(c["logprobs"] is None for c in choice_chunks(deltas))


def test_json_object_response_format(run):
    request = {"messages": [{"role": "user", "content": "Give a JSON object with keys name and color for a cat."}],
               "response_format": {"type": "json_object"}, "temperature": 0, "max_tokens": 100}
    deltas, result = run("chat", request)
    content = result["choices"][0]["message"]["content"]
    assert result["choices"][0]["finish_reason"] == "stop"
    assert isinstance(json.loads(content), dict)
    assert streamed_text(deltas) == content


def test_json_schema_response_format(run):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 30}},
              "required": ["name", "age"], "additionalProperties": False}
    request = {"messages": [{"role": "user", "content": "Invent a cat."}], "temperature": 0, "max_tokens": 60,
               "response_format": {"type": "json_schema", "json_schema": {"name": "cat", "schema": schema}}}
    _, result = run("chat", request)
    value = json.loads(result["choices"][0]["message"]["content"])
    assert set(value) == {"name", "age"} and isinstance(value["age"], int) and 0 <= value["age"] <= 30


def test_one_request_never_holds_more_sequences_than_the_engine_has_slots(run, cache, registry):
    """n = 8 on a 4-slot engine: its answers go to the engine 4 at a time at most, so other jobs'
    sequences are admitted between them (a request with n = 128 and many prompts cannot queue
    thousands of sequences ahead of everyone else)."""
    import threading

    engine = cache.get(registry.resolve(CHAT_MODEL)).engine
    assert engine.parallel == 4
    result, seen = [], []
    request = {"messages": HELLO, "n": 8, "max_tokens": 6, "temperature": 0, EXT: {"ignore_eos": True}}
    worker = threading.Thread(target=lambda: result.append(run("chat", request)[1]))
    worker.start()
    while worker.is_alive():
        seen.append(engine.busy_slots + engine.waiting)
        threading.Event().wait(0.002)
    worker.join(60)
    assert len(result[0]["choices"]) == 8 and result[0]["usage"]["completion_tokens"] == 48
    assert 1 < max(seen) <= 4


def test_jobs_run_at_once_share_the_engine_and_each_gives_what_it_gives_alone(run, cache, registry):
    """What a worker with several slots does: jobs in threads on one backend. A grammar-constrained
    job beside free ones keeps to its schema, and at temperature 0 each gives its answer alone."""
    import threading

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}},
              "required": ["name"], "additionalProperties": False}
    requests = [
        {"messages": [{"role": "user", "content": "Invent a cat."}], "temperature": 0, "max_tokens": 40,
         "response_format": {"type": "json_schema", "json_schema": {"name": "cat", "schema": schema}}},
        *({"messages": [{"role": "user", "content": f"Tell me about {topic}."}], "temperature": 0, "max_tokens": 24,
           EXT: {"ignore_eos": True}} for topic in ("rivers", "mountains", "the sea")),
    ]
    alone = [run("chat", request)[1]["choices"][0]["message"]["content"] for request in requests]
    engine = cache.get(registry.resolve(CHAT_MODEL)).engine
    together: list = [None] * len(requests)
    busiest = []

    def job(index):
        together[index] = run("chat", requests[index])[1]["choices"][0]["message"]["content"]

    steps = engine.steps
    threads = [threading.Thread(target=job, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        busiest.append(engine.busy_slots)
        threading.Event().wait(0.005)
    for thread in threads:
        thread.join(120)
    assert together == alone
    assert set(json.loads(together[0])) == {"name"}
    assert max(busiest) > 1 and engine.steps - steps < 100  # one after the other: 40 + 3 * 24 decode steps at least


def test_grammar_extension(run):
    request = {"messages": [{"role": "user", "content": "Is water wet?"}],
               EXT: {"grammar": 'root ::= "yes" | "no"'}, "max_tokens": 5}
    _, result = run("chat", request)
    assert result["choices"][0]["message"]["content"] in ("yes", "no")
    assert result["choices"][0]["finish_reason"] == "stop"


def test_grammar_ends_the_answer_even_with_ignore_eos(run):
    request = {"messages": HELLO, "max_tokens": 8, EXT: {"grammar": 'root ::= "yes"', "ignore_eos": True}}
    _, result = run("chat", request)
    assert result["choices"][0]["message"]["content"] == "yes"
    assert result["choices"][0]["finish_reason"] == "stop"


def test_grammar_the_vocabulary_cannot_satisfy_ends_instead_of_aborting(run):
    # In llama.cpp's sampler chain this grammar aborts the process (no token can start it).
    _, result = run("chat", {"messages": HELLO, "max_tokens": 4, EXT: {"grammar": r'root ::= "\x00"'}})
    assert result["choices"][0]["message"]["content"] == ""
    assert result["choices"][0]["finish_reason"] == "stop"


def test_invalid_grammar_is_refused(run):
    with pytest.raises(JobError) as error:
        chat(run, **{EXT: {"grammar": "root ::= undefined-rule"}})
    assert error.value.status == 400 and error.value.param == f"{EXT}.grammar"


def test_logit_bias_bans_a_token(run, cache, registry):
    _, free = chat(run, max_tokens=1, temperature=0)
    first = free["choices"][0]["message"]["content"]
    backend = cache.get(registry.resolve(CHAT_MODEL))
    token = backend.tokenize(first, add_special=False)[0]
    _, biased = chat(run, max_tokens=1, temperature=0, logit_bias={str(token): -100})
    assert biased["choices"][0]["message"]["content"] != first


def test_logit_bias_unknown_token(run):
    with pytest.raises(JobError) as error:
        chat(run, logit_bias={"999999": 1})
    assert error.value.status == 400 and error.value.param == "logit_bias"


def test_sampling_extensions_run(run):
    for knobs in ({"mirostat": 2, "mirostat_tau": 4.0}, {"top_k": 1, "repeat_penalty": 1.2, "repeat_last_n": -1},
                  {"min_p": 0.2, "typical_p": 0.9, "n_keep": 4, "tfs_z": 1.0}):
        _, result = chat(run, max_tokens=3, seed=1, **{EXT: knobs})
        assert result["usage"]["completion_tokens"] >= 1


def test_message_forms(run):
    messages = [{"role": "developer", "content": "Answer briefly."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Bye", "name": "bob"}]
    _, result = run("chat", {"messages": messages, "max_tokens": 3})
    assert result["usage"]["completion_tokens"] >= 1


def test_cancellation_stops_between_tokens(registry, cache):
    events: list[tuple[str, dict]] = []

    def content(kind, data):
        return bool(kind == "delta" and data["choices"] and data["choices"][0]["delta"].get("content"))

    job = {"id": "cancel-between-tokens", "kind": "chat", "model": CHAT_MODEL, "created": 1700000000,
           "request": {"model": CHAT_MODEL, "messages": HELLO, "max_tokens": 200, "temperature": 0}}
    execute(job, lambda kind, data: events.append((kind, data)), lambda: sum(content(*e) for e in events) >= 3,
            registry=registry, cache=cache)
    assert [kind for kind, _ in events] == ["delta"] * len(events)  # no result
    deltas = [data for _, data in events]
    assert sum(1 for c in choice_chunks(deltas) if c["delta"].get("content")) == 3  # asked after every token
    assert all(c["finish_reason"] is None for c in choice_chunks(deltas))


def test_cancelled_before_start_emits_nothing(run):
    deltas, result = chat(run, cancelled=lambda: True)
    assert deltas == [] and result is None


# ---------------------------------------------------------------------------------------------
# completions
# ---------------------------------------------------------------------------------------------


def test_completion_defaults_to_16_tokens(run):
    deltas, result = run("completion", {"prompt": "Once upon a time", EXT: {"ignore_eos": True}})
    valid("CreateCompletionResponse", result)
    choice = result["choices"][0]
    assert choice["finish_reason"] == "length"
    assert result["usage"]["completion_tokens"] == 16
    assert result["object"] == "text_completion" and result["id"].startswith("cmpl-")
    assert FINGERPRINT.fullmatch(result["system_fingerprint"])
    for chunk in deltas:
        assert chunk["object"] == "text_completion" and chunk["id"] == result["id"]
        assert chunk["system_fingerprint"] == result["system_fingerprint"]
        assert set(chunk["choices"][0]) == {"text", "index", "logprobs", "finish_reason"}
    assert "".join(c["choices"][0]["text"] for c in deltas) == choice["text"]
    assert deltas[-1]["choices"][0]["finish_reason"] == "length"


def test_completion_logprobs(run):
    deltas, result = run("completion", {"prompt": "The sky is", "max_tokens": 5, "temperature": 0,
                                        "logprobs": 2, EXT: {"ignore_eos": True}})
    choice = result["choices"][0]
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["text_offset"]) == 5
    assert "".join(logprobs["tokens"]) == choice["text"]
    assert logprobs["text_offset"][0] == len("The sky is")
    for token, top in zip(logprobs["tokens"], logprobs["top_logprobs"]):
        assert token in top and 1 <= len(top) <= 3
    streamed = [t for c in deltas if c["choices"][0]["logprobs"] for t in c["choices"][0]["logprobs"]["tokens"]]
    assert streamed == logprobs["tokens"]


def test_completion_echo_and_usage_chunk(run):
    deltas, result = run("completion", {"prompt": "Hello", "max_tokens": 3, "echo": True,
                                        "stream_options": {"include_usage": True}})
    text = result["choices"][0]["text"]
    assert text.startswith("Hello")
    *chunks, final = deltas
    assert "".join(c["choices"][0]["text"] for c in chunks) == text
    assert final["choices"] == [] and final["usage"] == result["usage"]
    assert all(c["usage"] is None for c in chunks)


def test_completion_prompts_and_n(run):
    deltas, result = run("completion", {"prompt": ["One", [19556, 905]], "n": 2, "max_tokens": 2, "seed": 5,
                                        EXT: {"ignore_eos": True}})
    assert [c["index"] for c in result["choices"]] == [0, 1, 2, 3]
    assert result["usage"]["completion_tokens"] == 8
    assert result["usage"]["prompt_tokens"] == 1 + 2
    for index in range(4):
        text = "".join(c["text"] for chunk in deltas for c in chunk["choices"] if c["index"] == index)
        assert text == result["choices"][index]["text"]


def test_completion_max_tokens_zero(run):
    _, result = run("completion", {"prompt": "Hi", "max_tokens": 0})
    assert result["choices"][0]["text"] == "" and result["usage"]["completion_tokens"] == 0


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------


def test_unknown_model(run):
    with pytest.raises(JobError) as error:
        run("chat", {"messages": HELLO}, model="no-such-model")
    assert (error.value.status, error.value.code, error.value.param) == (404, "model_not_found", "model")


def test_prompt_longer_than_context(run):
    with pytest.raises(JobError) as error:
        run("chat", {"messages": [{"role": "user", "content": "hello " * 2100}]})
    assert (error.value.status, error.value.code, error.value.param) == (400, "context_length_exceeded", "messages")
    with pytest.raises(JobError) as error:
        run("completion", {"prompt": "hello " * 2100})
    assert (error.value.status, error.value.code, error.value.param) == (400, "context_length_exceeded", "prompt")


def test_embeddings_on_a_chat_model(run):
    with pytest.raises(JobError) as error:
        run("embedding", {"input": "hi"})
    assert (error.value.status, error.value.param) == (400, "model")


@pytest.mark.parametrize(
    ("request_body", "param"),
    [
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"audio": {"voice": "alloy", "format": "wav"}, "modalities": ["text", "audio"]}, "audio"),
        ({EXT: {"tfs_z": 0.5}}, f"{EXT}.tfs_z"),
    ],
)
def test_capability_rejections(run, request_body, param):
    with pytest.raises(JobError) as error:
        chat(run, **request_body)
    assert (error.value.status, error.value.param, error.value.code) == (400, param, "unsupported_parameter")


# ---------------------------------------------------------------------------------------------
# tokenizer, embeddings with llama.cpp
# ---------------------------------------------------------------------------------------------


def test_tokenize_detokenize_round_trip(run):
    text = "Hello, world! <|im_start|> naïve café"
    _, tokens = run("tokenize", {"content": text})
    assert tokens["model"] == CHAT_MODEL and all(isinstance(t, int) for t in tokens["tokens"])
    assert 1 in tokens["tokens"]  # the special token is parsed as one
    _, back = run("detokenize", {"tokens": tokens["tokens"]})
    assert back == {"content": text, "model": CHAT_MODEL}
    valid("LocalqTokenizeResponse", tokens)
    valid("LocalqDetokenizeResponse", back)


def test_detokenize_unknown_token(run):
    with pytest.raises(JobError) as error:
        run("detokenize", {"tokens": [1, 10**7]})
    assert (error.value.status, error.value.param) == (400, "tokens")


def test_llama_embeddings(run):
    import base64
    import struct

    _, floats = run("embedding", {"input": ["hello", "a second input"]}, model="smollm2-embeddings")
    _, packed = run("embedding", {"input": ["hello", "a second input"], "encoding_format": "base64"},
                    model="smollm2-embeddings")
    for plain, encoded in zip(floats["data"], packed["data"]):
        vector = plain["embedding"]
        assert len(vector) == 576
        assert sum(x * x for x in vector) == pytest.approx(1.0, abs=1e-4)
        raw = base64.b64decode(encoded["embedding"])
        assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == vector
    assert floats["usage"]["prompt_tokens"] == floats["usage"]["total_tokens"] > 0
    _, short = run("embedding", {"input": "hello", "dimensions": 64}, model="smollm2-embeddings")
    assert len(short["data"][0]["embedding"]) == 64


def test_a_repeated_prompt_reports_its_cached_tokens(run):
    system = {"role": "system", "content": "You answer in one word. " + "Be brief. " * 20}
    first = run("chat", {"messages": [system, {"role": "user", "content": "Name a fruit."}], "max_tokens": 2})[1]
    again = run("chat", {"messages": [system, {"role": "user", "content": "Name a fruit."}], "max_tokens": 2})[1]
    other = run("chat", {"messages": [system, {"role": "user", "content": "Name a tree."}], "max_tokens": 2})[1]
    prompt_tokens = again["usage"]["prompt_tokens"]
    # the whole prompt but its last token came from the cache; a new question reuses the system part
    assert again["usage"]["prompt_tokens_details"] == {"cached_tokens": prompt_tokens - 1}
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] < prompt_tokens - 1
    assert 30 < other["usage"]["prompt_tokens_details"]["cached_tokens"] < other["usage"]["prompt_tokens"] - 1


def test_the_model_budget_counts_the_engines_kv_cache(cache, registry):
    config = registry.resolve(CHAT_MODEL)
    backend = cache.get(config)
    weights = config.locate_model().stat().st_size
    # SmolLM2-135M: 30 layers, 3 KV heads of 64; 4 slots of 2048 tokens, 16-bit keys and values
    assert backend.engine.kv_bytes == 4 * 2048 * 30 * 2 * 192 * 2
    assert backend.memory_bytes == weights + backend.engine.kv_bytes
    assert cache.used_bytes >= backend.memory_bytes


def test_the_opening_chunk_goes_out_with_the_first_token(registry, cache):
    """The role chunk is emitted with the first content chunk, not while the first token is being
    computed (it woke the publisher, Redis, the API and the client then, on a small machine taking
    CPU time from the first token). The job asks `cancelled()` while it waits for each token:
    no such wait may fall between the two chunks."""
    trace: list[str] = []

    def emit(kind, data):
        if kind == "delta" and data["choices"]:
            delta = data["choices"][0]["delta"]
            trace.append("role" if "role" in delta else "content" if delta.get("content") else "other")

    def cancelled():
        trace.append("wait")
        return False

    job = {"id": f"job{next(_ids)}", "kind": "chat", "model": CHAT_MODEL, "created": 1700000000,
           "request": {"model": CHAT_MODEL, "messages": HELLO, "max_tokens": 4, "temperature": 0, "stream": True}}
    execute(job, emit, cancelled, registry=registry, cache=cache)
    opening = trace.index("role")
    assert "wait" in trace[:opening]  # the job did wait for its first token before the chunk
    assert trace[opening + 1] == "content", trace
