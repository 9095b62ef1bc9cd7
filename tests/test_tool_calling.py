"""Tool calling through the unmodified `openai` SDK on the default model (SmolLM2-135M): the
constrained way, where a grammar built from the tools' schemas makes every call valid.

One service for the module (embedded Redis, one CPU worker, the API); greedy sampling, so each
answer is the same on every run.
"""

from __future__ import annotations

import json
import time

import httpx
import jsonschema
import pytest
from openai import OpenAI

from tests.service import CHAT, only_models, running_service

MODEL = "gpt-4o-mini"
GREEDY = {"temperature": 0, "seed": 7}
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 40},
                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                            "parameters": WEATHER_PARAMETERS}}
TIME_PARAMETERS = {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 40}},
                   "required": ["timezone"], "additionalProperties": False}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Current time in a timezone",
                                         "parameters": TIME_PARAMETERS}}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tools")
    with running_service(tmp, only_models(tmp / "models", CHAT)) as svc:
        yield svc


@pytest.fixture(scope="module")
def client(service):
    return OpenAI(base_url=service.base_url + "/v1", api_key="unused", timeout=120, max_retries=0)


def streamed(client, **body):
    """The stream's chunks, and the calls and content they add up to (as an SDK user would accumulate them)."""
    chunks = list(client.chat.completions.create(stream=True, **body))
    calls: dict[int, dict] = {}
    content, finish = "", None
    for chunk in chunks:
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            for call in delta.tool_calls or ():
                entry = calls.setdefault(call.index, {"id": None, "name": None, "arguments": ""})
                if call.id:
                    assert entry["id"] is None, "a call's id comes once, in its first fragment"
                    entry["id"] = call.id
                if call.function and call.function.name:
                    assert entry["name"] is None, "a call's name comes once, in its first fragment"
                    entry["name"] = call.function.name
                if call.function and call.function.arguments:
                    entry["arguments"] += call.function.arguments
            finish = choice.finish_reason or finish
    return chunks, [calls[i] for i in sorted(calls)], content, finish


def valid_call(call, schemas: dict) -> dict:
    arguments = json.loads(call.function.arguments if hasattr(call, "function") else call["arguments"])
    name = call.function.name if hasattr(call, "function") else call["name"]
    jsonschema.validate(arguments, schemas[name])
    return arguments


SCHEMAS = {"get_weather": WEATHER_PARAMETERS, "get_time": TIME_PARAMETERS}


def test_required_returns_a_call_whose_arguments_validate(client):
    response = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required",
                                              max_tokens=80, **GREEDY)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert len(choice.message.tool_calls) >= 1
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    valid_call(call, SCHEMAS)


def test_a_streamed_call_adds_up_to_the_same_call(client):
    body = {"model": MODEL, "messages": ASK, "tools": [WEATHER], "tool_choice": "required", "max_tokens": 80, **GREEDY}
    whole = client.chat.completions.create(**body).choices[0].message.tool_calls
    chunks, calls, content, finish = streamed(client, **body)
    assert finish == "tool_calls" and content == ""
    assert [(c["name"], c["arguments"]) for c in calls] == [(c.function.name, c.function.arguments) for c in whole]
    for call in calls:
        valid_call(call, SCHEMAS)
    first = chunks[0].choices[0].delta
    assert first.role == "assistant" and first.tool_calls[0].function.arguments == ""
    assert sum(1 for chunk in chunks for choice in chunk.choices if choice.delta.tool_calls) > len(calls), \
        "arguments arrive in pieces, not in one chunk"


def test_a_named_tool_choice_calls_that_tool(client):
    response = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER, TIME], max_tokens=80, **GREEDY,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    calls = response.choices[0].message.tool_calls
    assert calls and all(call.function.name == "get_time" for call in calls)
    for call in calls:
        valid_call(call, SCHEMAS)


def test_auto_returns_text_or_a_valid_call(client):
    for messages in (ASK, [{"role": "user", "content": "Say hello to me."}]):
        choice = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER, TIME],
                                                max_tokens=80, **GREEDY).choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls"
            for call in choice.message.tool_calls:
                valid_call(call, SCHEMAS)
        else:
            assert choice.finish_reason in ("stop", "length") and choice.message.content


def test_a_two_turn_loop_completes(client):
    messages = list(ASK)
    first = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="required",
                                           max_tokens=80, **GREEDY).choices[0].message
    messages.append(first.model_dump(exclude_none=True))
    for call in first.tool_calls:
        arguments = valid_call(call, SCHEMAS)
        messages.append({"role": "tool", "tool_call_id": call.id,
                         "content": json.dumps({"city": arguments["city"], "temperature": 18, "sky": "clear"})})
    final = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="none",
                                           max_tokens=40, **GREEDY).choices[0]
    assert final.message.tool_calls is None and final.message.content
    assert final.finish_reason in ("stop", "length")


def test_legacy_functions_answer_with_function_call(client):
    response = client.chat.completions.create(
        model=MODEL, messages=ASK, functions=[WEATHER["function"]], function_call={"name": "get_weather"},
        max_tokens=80, **GREEDY)
    choice = response.choices[0]
    assert choice.finish_reason == "function_call" and choice.message.tool_calls is None
    assert choice.message.function_call.name == "get_weather"
    jsonschema.validate(json.loads(choice.message.function_call.arguments), WEATHER_PARAMETERS)


def test_one_call_at_most_without_parallel_tool_calls(client):
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Weather in Paris, Rome and Oslo?"}], tools=[WEATHER],
        tool_choice="required", parallel_tool_calls=False, max_tokens=120, **GREEDY)
    assert len(response.choices[0].message.tool_calls) == 1


@pytest.mark.parametrize(("extra", "param"), [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name"),
    ({"tools": [{"type": "custom", "custom": {"name": "grep"}}]}, "tools[0].type"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format"),
])
def test_tool_requests_that_cannot_be_honoured_are_400_before_queueing(service, extra, param):
    response = httpx.post(service.base_url + "/v1/chat/completions",
                          json={"model": MODEL, "messages": ASK, **extra}, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_several_calls_when_asked_for_several(client):
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Get the weather for Paris, London and Rome."}],
        tools=[WEATHER, TIME], tool_choice="required", max_tokens=300, **GREEDY)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert len(choice.message.tool_calls) >= 2
    assert len({call.id for call in choice.message.tool_calls}) == len(choice.message.tool_calls)
    for call in choice.message.tool_calls:
        valid_call(call, SCHEMAS)


def test_every_choice_of_n_calls_on_its_own(client):
    response = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required",
                                              max_tokens=80, n=2, temperature=0.9, seed=3)
    ids = set()
    for choice in response.choices:
        assert choice.finish_reason == "tool_calls"
        for call in choice.message.tool_calls:
            valid_call(call, SCHEMAS)
            ids.add(call.id)
    assert len(ids) == sum(len(choice.message.tool_calls) for choice in response.choices)


def test_a_batch_line_with_tools_answers_as_the_synchronous_call(client):
    body = {"model": MODEL, "messages": ASK, "tools": [WEATHER, TIME], "tool_choice": "required", "max_tokens": 80,
            **GREEDY}
    direct = client.chat.completions.create(**body).choices[0]
    line = json.dumps({"custom_id": "tools-1", "method": "POST", "url": "/v1/chat/completions", "body": body})
    upload = client.files.create(file=("tools.jsonl", line.encode()), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.time() + 120
    while batch.status not in ("completed", "failed", "expired", "cancelled") and time.time() < deadline:
        time.sleep(0.2)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed" and batch.request_counts.completed == 1
    output = json.loads(client.files.content(batch.output_file_id).text)
    choice = output["response"]["body"]["choices"][0]
    assert choice["finish_reason"] == direct.finish_reason == "tool_calls"
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in choice["message"]["tool_calls"]] == [
        (c.function.name, c.function.arguments) for c in direct.message.tool_calls]


def test_an_openai_agents_sdk_agent_runs_a_function_tool(service):
    import agents
    from openai import AsyncOpenAI

    agents.set_tracing_disabled(True)
    seen = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        seen.append(city)
        return f"It is 18C and sunny in {city}."

    model = agents.OpenAIChatCompletionsModel(
        model=MODEL, openai_client=AsyncOpenAI(base_url=service.base_url + "/v1", api_key="unused", max_retries=0))
    agent = agents.Agent(name="weather", instructions="Answer questions about the weather.", tools=[get_weather],
                         model=model, tool_use_behavior="stop_on_first_tool",
                         model_settings=agents.ModelSettings(tool_choice="required", temperature=0, max_tokens=80))
    result = agents.Runner.run_sync(agent, "What is the weather like in Paris?", max_turns=3)
    assert len(seen) == 1 and seen[0]
    assert result.final_output == f"It is 18C and sunny in {seen[0]}."


# -- structured outputs ---------------------------------------------------------------------------

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "age": {"type": "integer"},
        "role": {"type": "string", "enum": ["captain", "keeper", "cook"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        "home": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/place"}]},
        "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
    },
    "required": ["name", "age", "role", "tags", "home", "code"],
    "additionalProperties": False,
    "$defs": {"place": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                        "required": ["city"], "additionalProperties": False}},
}


@pytest.mark.parametrize("stream", [False, True])
def test_a_strict_json_schema_answer_validates_against_its_schema(client, stream):
    body = {"model": MODEL, "max_tokens": 200, **GREEDY,
            "messages": [{"role": "user", "content": "Describe the keeper of a lighthouse as JSON."}],
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": "person", "schema": PERSON, "strict": True}}}
    if stream:
        _, _, content, finish = streamed(client, **body)
    else:
        choice = client.chat.completions.create(**body).choices[0]
        content, finish = choice.message.content, choice.finish_reason
    assert finish == "stop"
    jsonschema.validate(json.loads(content), PERSON)


def test_a_strict_schema_the_grammar_cannot_enforce_is_a_400_naming_the_part(service):
    schema = {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0}}, "required": ["age"],
              "additionalProperties": False}
    response = httpx.post(service.base_url + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": ASK, "max_tokens": 20,
        "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}}})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "response_format.json_schema.schema.properties.age.minimum"
    assert "minimum" in error["message"] and error["type"] == "invalid_request_error"


def test_a_non_strict_schema_the_grammar_cannot_enforce_still_gets_json(client):
    schema = {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0}}}
    choice = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "How old are you? Answer in JSON."}], max_tokens=200,
        **GREEDY, response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
    ).choices[0]
    assert choice.finish_reason == "stop"
    json.loads(choice.message.content)


def test_a_strict_tool_the_grammar_cannot_enforce_is_a_400_naming_the_part(service):
    tool = {"type": "function", "function": {"name": "count", "strict": True, "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "multipleOf": 2}}, "required": ["n"],
        "additionalProperties": False}}}
    response = httpx.post(service.base_url + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": ASK, "max_tokens": 20, "tools": [WEATHER, tool]})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "tools[1].function.parameters.properties.n.multipleOf"


@pytest.mark.parametrize("legacy", [False, True])
def test_tool_call_responses_and_chunks_conform_to_the_upstream_schemas(service, legacy):
    from tests.contract import upstream

    tools = {"functions": [WEATHER["function"]]} if legacy else {"tools": [WEATHER], "tool_choice": "required"}
    body = {"model": MODEL, "messages": ASK, "max_tokens": 80, **GREEDY, **tools}
    whole = httpx.post(service.base_url + "/v1/chat/completions", json=body, timeout=60)
    assert whole.status_code == 200, whole.text
    upstream().assert_conforms("CreateChatCompletionResponse", whole.json(), "a tool call answer")
    with httpx.stream("POST", service.base_url + "/v1/chat/completions", json={**body, "stream": True},
                      timeout=60) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    assert chunks
    for chunk in chunks:
        upstream().assert_conforms("CreateChatCompletionStreamResponse", chunk, "a tool call chunk")
