"""The native way to call tools, and reasoning: a model whose chat template renders tools and
their results itself (Hermes / Qwen style), whose `<tool_call>` output localq parses, and whose
`<think>` text goes to `reasoning_content`.

The model is the small default GGUF with such a template written in (tests/gguf_template.py).
A 135M model does not call tools or think aloud on its own; a few earlier turns in the
conversation show it how, and at temperature 0 it follows them, so the real parsing path runs on
real output.
"""

from __future__ import annotations

import json

import pytest
import yaml
from openai import OpenAI

from ops.bench.llm import model_path
from tests.gguf_template import TEMPLATES, with_chat_template
from tests.service import running_service
from tests.test_tool_calling import SCHEMAS, TIME, WEATHER, streamed, valid_call

MODEL = "hermes-smol"
GREEDY = {"temperature": 0, "seed": 7}


def _call(index: int, city: str) -> dict:
    return {"role": "assistant", "content": None, "tool_calls": [{
        "id": f"call_{index}", "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps({"city": city, "unit": "celsius"})}}]}


# earlier turns that show the model how to call (rendered by its template as <tool_call> blocks)
SHOWN_CALLS = [message for index, city in enumerate(["Rome", "Oslo", "Lima", "Cairo"])
               for message in ({"role": "user", "content": f"Weather in {city}?"}, _call(index, city))]
ASK_CALL = [*SHOWN_CALLS, {"role": "user", "content": "Weather in Paris?"}]
SHOWN_THINKING = [message for question, thought, answer in [
    ("What is 2+2?", "Two plus two is four.", "4"), ("What is 3+3?", "Three plus three is six.", "6"),
    ("What is 5+5?", "Five plus five is ten.", "10")]
    for message in ({"role": "user", "content": question},
                    {"role": "assistant", "content": f"<think>{thought}</think>{answer}"})]
ASK_THINKING = [*SHOWN_THINKING, {"role": "user", "content": "What is 4+4?"}]


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    return with_chat_template(model_path(), tmp_path_factory.mktemp("gguf") / "hermes.gguf",
                              TEMPLATES / "hermes_think.jinja")


@pytest.fixture(scope="module")
def service(tmp_path_factory, gguf):
    tmp = tmp_path_factory.mktemp("native")
    (tmp / "models").mkdir()
    (tmp / "models" / "hermes.yaml").write_text(yaml.safe_dump({
        "name": MODEL, "backend": "llama-cpp", "context_size": 2048, "preload": True,
        "parameters": {"model": str(gguf)}}))
    with running_service(tmp, {"LOCALQ_MODELS_DIR": str(tmp / "models")}) as svc:
        yield svc


@pytest.fixture(scope="module")
def client(service):
    return OpenAI(base_url=service.base_url + "/v1", api_key="unused", timeout=120, max_retries=0)


@pytest.fixture(scope="module")
def backend(gguf, tmp_path_factory):
    from workers.backends.llama_cpp import LlamaCppBackend
    from workers.config import load_model_config

    folder = tmp_path_factory.mktemp("backend")
    (folder / "hermes.yaml").write_text(yaml.safe_dump({
        "name": MODEL, "backend": "llama-cpp", "context_size": 1024, "parallel": 1, "parameters": {"model": str(gguf)}}))
    loaded = LlamaCppBackend(load_model_config(folder / "hermes.yaml", folder))
    yield loaded
    loaded.close()


def test_the_format_and_the_markers_are_read_from_the_template(backend):
    assert backend.tool_format == "hermes"
    assert backend.reasoning_markers == ("<think>", "</think>")


def test_the_template_renders_the_tools_the_calls_and_the_results(backend):
    conversation = [*ASK_CALL[:2], {"role": "tool", "tool_call_id": "call_0", "content": "20C and sunny"},
                    {"role": "user", "content": "And Paris?"}]
    text = backend.detokenize(backend.chat_prompt(conversation, native=True, tools=[WEATHER]))
    assert "<tools>\n" + json.dumps(WEATHER, ensure_ascii=False) + "\n</tools>" in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "unit": "celsius"}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\n20C and sunny\n</tool_response><|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    closed = backend.chat_prompt(ASK_THINKING, native=True, options={"enable_thinking": False})
    assert backend.detokenize(closed).endswith("<think>\n\n</think>\n\n")


def test_native_calls_are_parsed_and_their_streamed_fragments_add_up(client):
    body = {"model": MODEL, "messages": ASK_CALL, "tools": [WEATHER, TIME], "max_tokens": 80, **GREEDY}
    choice = client.chat.completions.create(**body).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert (call.function.name, valid_call(call, SCHEMAS)) == ("get_weather", {"city": "Paris", "unit": "celsius"})
    chunks, calls, content, finish = streamed(client, **body)
    assert (finish, content) == ("tool_calls", "")
    assert [(c["name"], c["arguments"]) for c in calls] == [("get_weather", call.function.arguments)]
    assert sum(1 for chunk in chunks if chunk.choices and chunk.choices[0].delta.tool_calls) > 3
    raw = "".join(chunk.model_dump_json() for chunk in chunks)
    assert "<tool_call>" not in raw and "</tool_call>" not in raw


def test_required_goes_the_constrained_way_on_a_native_model(client):
    choice = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}],
                                            tools=[WEATHER], tool_choice="required", max_tokens=80,
                                            **GREEDY).choices[0]
    assert choice.finish_reason == "tool_calls"
    valid_call(choice.message.tool_calls[0], SCHEMAS)


def test_thinking_goes_to_reasoning_content_never_to_content(client):
    body = {"model": MODEL, "messages": ASK_THINKING, "max_tokens": 60, **GREEDY}
    message = client.chat.completions.create(**body).choices[0].message
    thinking = message.model_extra["reasoning_content"]
    assert thinking and "<think>" not in thinking and "</think>" not in thinking
    assert message.content and "<think>" not in message.content and "</think>" not in message.content
    chunks = list(client.chat.completions.create(stream=True, **body))
    deltas = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
    assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == thinking
    assert "".join(d.content or "" for d in deltas) == message.content


def test_answers_with_reasoning_and_native_calls_conform_to_the_upstream_schemas(service):
    import httpx

    from tests.contract import upstream

    for body in ({"messages": ASK_THINKING}, {"messages": ASK_CALL, "tools": [WEATHER]}):
        body = {"model": MODEL, "max_tokens": 60, **GREEDY, **body}
        whole = httpx.post(service.base_url + "/v1/chat/completions", json=body, timeout=60)
        assert whole.status_code == 200, whole.text
        upstream().assert_conforms("CreateChatCompletionResponse", whole.json(), "a native answer")
        with httpx.stream("POST", service.base_url + "/v1/chat/completions", json={**body, "stream": True},
                          timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    upstream().assert_conforms("CreateChatCompletionStreamResponse", json.loads(line[6:]), "a chunk")
