"""The real all-MiniLM-L6-v2 sentence-transformers model run through `workers.execute.execute`."""

from __future__ import annotations

import base64
import math
import struct
from dataclasses import replace
from itertools import count

import pytest

from api.settings import DEFAULT_MODELS_DIR
from schemas.generated import SCHEMAS
from workers.cache import ModelCache
from workers.errors import JobError
from workers.execute import execute
from workers.registry import ModelRegistry

MODEL = "text-embedding-3-small"
EXT = "x-localai-extensions"
_ids = count()


@pytest.fixture(scope="module")
def registry() -> ModelRegistry:
    return ModelRegistry([replace(c, threads=1) for c in ModelRegistry.load(DEFAULT_MODELS_DIR).list()])


@pytest.fixture(scope="module")
def cache() -> ModelCache:
    cache = ModelCache(max_models=1)
    yield cache
    cache.clear()


@pytest.fixture
def run(registry, cache):
    def run_job(kind: str, request: dict, *, model: str = MODEL, cancelled=lambda: False):
        events = []
        job = {"id": f"e{next(_ids)}", "kind": kind, "model": model, "request": {"model": model, **request},
               "created": 1700000000}
        execute(job, lambda kind, data: events.append((kind, data)), cancelled, registry=registry, cache=cache)
        assert all(kind == "result" for kind, _ in events) and len(events) <= 1
        return events[0][1] if events else None

    return run_job


def decode(encoded: str) -> list[float]:
    raw = base64.b64decode(encoded)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def norm(vector: list[float]) -> float:
    return math.sqrt(sum(x * x for x in vector))


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b)) / (norm(a) * norm(b))


def test_float_embeddings(run):
    result = run("embedding", {"input": ["The cat sits on the mat.", "A cat is sitting on a mat.", "Stock prices fell."]})
    SCHEMAS["CreateEmbeddingResponse"]().load(result)
    assert result["object"] == "list" and result["model"] == MODEL
    vectors = [item["embedding"] for item in result["data"]]
    assert [item["index"] for item in result["data"]] == [0, 1, 2]
    assert all(item["object"] == "embedding" for item in result["data"])
    assert all(len(v) == 384 and norm(v) == pytest.approx(1.0, abs=1e-5) for v in vectors)
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2]) + 0.3
    usage = result["usage"]
    assert usage["prompt_tokens"] == usage["total_tokens"] > 3 * 2


def test_base64_decodes_to_the_float_vectors(run):
    texts = ["hello world", "second"]
    floats = run("embedding", {"input": texts, "encoding_format": "float"})
    packed = run("embedding", {"input": texts, "encoding_format": "base64"})
    for plain, encoded in zip(floats["data"], packed["data"]):
        assert isinstance(encoded["embedding"], str)
        assert decode(encoded["embedding"]) == plain["embedding"]
    assert packed["usage"] == floats["usage"]


def test_single_string_input(run):
    result = run("embedding", {"input": "just one"}, model="text-embedding-ada-002")
    assert len(result["data"]) == 1 and result["model"] == "text-embedding-ada-002"


def test_dimensions_shorten_and_renormalise(run):
    full = run("embedding", {"input": "shorter please"})["data"][0]["embedding"]
    short = run("embedding", {"input": "shorter please", "dimensions": 32})["data"][0]["embedding"]
    assert len(short) == 32
    assert norm(short) == pytest.approx(1.0, abs=1e-5)
    scale = norm(full[:32])
    assert short == pytest.approx([x / scale for x in full[:32]], abs=1e-6)


def test_token_inputs_match_text(run):
    text = "tokens in, vectors out"
    tokens = run("tokenize", {"content": text})["tokens"]
    assert tokens[0] == 101 and tokens[-1] == 102  # [CLS] ... [SEP]
    from_text = run("embedding", {"input": text})
    from_tokens = run("embedding", {"input": tokens})
    from_lists = run("embedding", {"input": [tokens, tokens[:3] + [102]]})
    assert from_tokens["data"][0]["embedding"] == pytest.approx(from_text["data"][0]["embedding"], abs=1e-5)
    assert from_lists["data"][0]["embedding"] == pytest.approx(from_text["data"][0]["embedding"], abs=1e-5)
    assert from_tokens["usage"]["prompt_tokens"] == len(tokens) == from_text["usage"]["prompt_tokens"]


def test_tokenize_detokenize_round_trip(run):
    result = run("tokenize", {"content": "Hello world"})
    assert result["model"] == MODEL
    bare = run("tokenize", {"content": "Hello world", "add_special": False})["tokens"]
    assert result["tokens"] == [101, *bare, 102]
    back = run("detokenize", {"tokens": bare})
    assert back == {"content": "hello world", "model": MODEL}  # an uncased tokenizer
    assert run("detokenize", {"tokens": result["tokens"]})["content"] == "[CLS] hello world [SEP]"


def test_input_longer_than_the_model_takes(run):
    with pytest.raises(JobError) as error:
        run("embedding", {"input": ["short", "word " * 300]})
    assert (error.value.status, error.value.code, error.value.param) == (400, "context_length_exceeded", "input")
    assert "input 1" in error.value.message


def test_unknown_token_id(run):
    with pytest.raises(JobError) as error:
        run("embedding", {"input": [101, 10**6, 102]})
    assert (error.value.status, error.value.param) == (400, "input")
    with pytest.raises(JobError) as error:
        run("detokenize", {"tokens": [10**6]})
    assert (error.value.status, error.value.param) == (400, "tokens")


@pytest.mark.parametrize(
    ("kind", "request_body", "param"),
    [
        ("embedding", {"input": "x", "dimensions": 385}, "dimensions"),
        ("embedding", {"input": "x", EXT: {"mirostat": 2}}, f"{EXT}.mirostat"),
        ("chat", {"messages": [{"role": "user", "content": "hi"}]}, "model"),
        ("completion", {"prompt": "hi"}, "model"),
    ],
)
def test_rejections(run, kind, request_body, param):
    with pytest.raises(JobError) as error:
        run(kind, request_body)
    assert (error.value.status, error.value.param) == (400, param)


def test_cancelled_embedding_emits_no_result(run):
    assert run("embedding", {"input": ["a"] * 40}, cancelled=lambda: True) is None
    calls = count()
    assert run("embedding", {"input": ["a"] * 40}, cancelled=lambda: next(calls) >= 2) is None
