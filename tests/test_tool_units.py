"""Tool calling's pure parts: the request's tools, the constrained answer's schema, the prompt's
messages, and an answer's deltas and message (workers/tools)."""

from __future__ import annotations

import json

import pytest

from workers.tools.answer import ChatAnswer, ToolCallError
from workers.tools.formats.generic import GenericParser
from workers.tools.grammar import MAX_PARALLEL_CALLS, UnenforceableTool, answer_schema
from workers.tools.prompt import generic_messages
from workers.tools.request import AUTO, NONE, REQUIRED, ToolRequestError, tool_request

pytestmark = pytest.mark.unit

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


# -- the request ----------------------------------------------------------------------------------


def test_tools_default_to_auto_and_parallel():
    tools = tool_request({"tools": [WEATHER, TIME]})
    assert (tools.mode, tools.parallel, tools.legacy, tools.active) == (AUTO, True, False, True)
    assert [f.name for f in tools.functions] == ["get_weather", "get_time"]
    assert tools.functions[0].parameters["required"] == ["city"]


def test_a_named_choice_keeps_only_that_function_and_requires_it():
    tools = tool_request({"tools": [WEATHER, TIME], "tool_choice": {"type": "function", "function": {"name": "get_time"}},
                          "parallel_tool_calls": False})
    assert ([f.name for f in tools.functions], tools.mode, tools.parallel) == (["get_time"], REQUIRED, False)


def test_allowed_tools_narrow_the_functions_with_their_mode():
    choice = {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [
        {"type": "function", "function": {"name": "get_weather"}}]}}
    tools = tool_request({"tools": [WEATHER, TIME], "tool_choice": choice})
    assert ([f.name for f in tools.functions], tools.mode) == (["get_weather"], REQUIRED)


def test_none_is_inactive_and_no_tools_is_none():
    assert not tool_request({"tools": [WEATHER], "tool_choice": "none"}).active
    assert tool_request({"tools": [WEATHER], "tool_choice": "none"}).mode == NONE
    assert tool_request({"messages": []}) is None
    assert tool_request({"tools": []}) is None


def test_legacy_functions_call_one_function_at_a_time():
    tools = tool_request({"functions": [WEATHER["function"]], "function_call": {"name": "get_weather"}})
    assert (tools.legacy, tools.parallel, tools.mode) == (True, False, REQUIRED)
    assert tool_request({"functions": [WEATHER["function"]]}).mode == AUTO


@pytest.mark.parametrize(("request_body", "param"), [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name"),
    ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools[0].type"),
    ({"tools": [WEATHER], "tool_choice": {"type": "custom", "custom": {"name": "x"}}}, "tool_choice"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1]"),
    ({"functions": [WEATHER["function"]], "function_call": {"name": "other"}}, "function_call.name"),
    ({"tools": [WEATHER], "tool_choice": {"type": "allowed_tools", "allowed_tools": {
        "mode": "auto", "tools": [{"type": "function", "function": {"name": "zzz"}}]}}},
     "tool_choice.allowed_tools.tools[0].function.name"),
])
def test_requests_that_cannot_be_honoured_name_the_field(request_body, param):
    with pytest.raises(ToolRequestError) as error:
        tool_request(request_body)
    assert error.value.param == param


# -- the constrained answer's schema -------------------------------------------------------------


def test_required_answers_are_calls_only_and_auto_may_be_text():
    required = answer_schema(tool_request({"tools": [WEATHER], "tool_choice": "required"}))
    assert required["required"] == ["tool_calls"]
    calls = required["properties"]["tool_calls"]
    assert (calls["minItems"], calls["maxItems"]) == (1, MAX_PARALLEL_CALLS)
    assert calls["items"]["properties"]["name"] == {"const": "get_weather"}
    assert calls["items"]["properties"]["arguments"] == WEATHER["function"]["parameters"]
    auto = answer_schema(tool_request({"tools": [WEATHER, TIME], "parallel_tool_calls": False}))
    wrapper, text = auto["anyOf"]
    assert wrapper["properties"]["tool_calls"]["maxItems"] == 1
    assert len(wrapper["properties"]["tool_calls"]["items"]["anyOf"]) == 2
    assert text["properties"] == {"response": {"type": "string"}}


def test_each_tools_definitions_are_hoisted_under_their_own_names():
    def tool(name, zip_type):
        return {"type": "function", "function": {"name": name, "parameters": {
            "type": "object", "properties": {"address": {"$ref": "#/$defs/Address"}, "again": {"$ref": "#/properties/address"}},
            "$defs": {"Address": {"type": "object", "properties": {"zip": {"type": zip_type}}}}}}}

    schema = answer_schema(tool_request({"tools": [tool("a", "string"), tool("b", "integer")]}))
    defs = schema["$defs"]
    assert defs["f0-Address"]["properties"]["zip"]["type"] == "string"
    assert defs["f1-Address"]["properties"]["zip"]["type"] == "integer"
    assert defs["f0"]["properties"]["address"] == {"$ref": "#/$defs/f0-Address"}
    assert defs["f1"]["properties"]["again"] == {"$ref": "#/$defs/f1/properties/address"}
    items = schema["anyOf"][0]["properties"]["tool_calls"]["items"]["anyOf"]
    assert [item["properties"]["arguments"] for item in items] == [{"$ref": "#/$defs/f0"}, {"$ref": "#/$defs/f1"}]


def test_a_strict_tool_the_grammar_cannot_enforce_is_refused_and_others_are_relaxed():
    parameters = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}, "required": ["n"]}
    loose = {"type": "function", "function": {"name": "f", "parameters": parameters}}
    schema = answer_schema(tool_request({"tools": [loose], "tool_choice": "required"}))
    assert schema["properties"]["tool_calls"]["items"]["properties"]["arguments"] == {
        "type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    strict = {"type": "function", "function": {"name": "f", "parameters": parameters, "strict": True}}
    with pytest.raises(UnenforceableTool) as error:
        answer_schema(tool_request({"tools": [TIME, strict]}))
    assert error.value.param == "tools[1].function.parameters.properties.n.minimum"


def test_relaxing_drops_keywords_never_names():
    from workers.tools.schema_grammar import relaxed

    schema = {"type": "object", "properties": {"minimum": {"type": "integer", "maximum": 3}}, "required": ["minimum"]}
    assert relaxed(schema) == {"type": "object", "properties": {"minimum": {"type": "integer"}}, "required": ["minimum"]}
    assert relaxed({"type": "object", "properties": {"a": {"$ref": "https://example.com/x"}}}) is None


def test_the_answer_schema_compiles_to_a_grammar_llama_cpp_parses():
    import llama_cpp
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    schema = answer_schema(tool_request({"tools": [WEATHER, TIME]}))
    text = json_schema_to_gbnf(json.dumps(schema))
    assert '\\"tool_calls\\"' in text and '\\"response\\"' in text and '\\"get_weather\\"' in text
    from ops.bench.llm import model_path

    model = llama_cpp.Llama(model_path=str(model_path()), vocab_only=True, verbose=False)
    sampler = llama_cpp.llama_sampler_init_grammar(model._model.vocab, text.encode(), b"root")
    assert sampler
    llama_cpp.llama_sampler_free(sampler)


# -- the prompt ------------------------------------------------------------------------------------


def test_tools_are_described_in_the_system_message_with_the_format():
    tools = tool_request({"tools": [WEATHER]})
    messages = generic_messages([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Paris?"}], tools)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"].startswith("Be brief.\n\nYou can call these tools:\n")
    assert '"name": "get_weather"' in messages[0]["content"]
    assert '{"response":' in messages[0]["content"]  # auto: text is allowed
    required = generic_messages([{"role": "user", "content": "x"}],
                                tool_request({"tools": [WEATHER], "tool_choice": "required"}))
    assert required[0]["role"] == "system" and "You must call the tool get_weather." in required[0]["content"]
    assert '{"response":' not in required[0]["content"]


def test_earlier_calls_and_results_become_text_in_the_same_format():
    conversation = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "18C"}]},
        {"role": "assistant", "content": "It is 18C."},
    ]
    plain = generic_messages(conversation, tool_request({"tools": [WEATHER]}))[1:]
    assert plain[1] == {"role": "assistant", "content": json.dumps(
        {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]})}
    assert plain[2]["role"] == "user"
    assert json.loads(plain[2]["content"]) == {"tool_response": {"tool_call_id": "call_1", "name": "get_weather",
                                                                 "content": "18C"}}
    assert json.loads(plain[3]["content"]) == {"response": "It is 18C."}
    without = generic_messages(conversation, None)  # no tools any more: the history still renders
    assert without[3]["content"] == "It is 18C." and all(set(m) == {"role", "content"} for m in without)


# -- an answer --------------------------------------------------------------------------------------


def _answer(request: dict, output: str, pieces: int = 3, finish: str = "stop"):
    tools = tool_request(request)
    answer = ChatAnswer(tools, GenericParser(), lambda i: f"call_{i}")
    deltas = []
    size = max(1, len(output) // pieces)
    for start in range(0, len(output), size):
        deltas += answer.feed(output[start:start + size])
    deltas += answer.close(finish)
    return answer, deltas


def test_calls_stream_as_openai_deltas_and_end_as_tool_calls():
    output = '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}, ' \
             '{"name": "get_time", "arguments": {}}]}'
    answer, deltas = _answer({"tools": [WEATHER, TIME]}, output, pieces=17)
    answer.check()
    assert deltas[0]["role"] == "assistant" and deltas[0]["content"] is None
    assert deltas[0]["tool_calls"] == [{"index": 0, "id": "call_0", "type": "function",
                                        "function": {"name": "get_weather", "arguments": ""}}]
    pieces = {0: "", 1: ""}
    for delta in deltas:
        for call in delta.get("tool_calls", []):
            pieces[call["index"]] += call["function"].get("arguments", "")
    assert pieces == {0: '{"city": "Paris"}', 1: "{}"}
    message = answer.message()
    assert message["content"] is None
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]] == [
        ("call_0", "get_weather", '{"city": "Paris"}'), ("call_1", "get_time", "{}")]
    assert answer.finish_reason("stop") == "tool_calls"


def test_a_text_answer_streams_as_content():
    answer, deltas = _answer({"tools": [WEATHER]}, '{"response": "Hello \\"you\\"\\n"}', pieces=9)
    assert deltas[0]["role"] == "assistant"
    assert "".join(d.get("content") or "" for d in deltas) == 'Hello "you"\n'
    assert answer.message() == {"role": "assistant", "content": 'Hello "you"\n', "refusal": None, "annotations": []}
    assert answer.finish_reason("stop") == "stop"


def test_the_legacy_vocabulary_streams_function_call():
    answer, deltas = _answer({"functions": [WEATHER["function"]]},
                             '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]}')
    assert deltas[0]["function_call"] == {"name": "get_weather", "arguments": ""}
    assert "".join(d["function_call"].get("arguments", "") for d in deltas) == '{"city": "Oslo"}'
    assert answer.message()["function_call"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    assert "tool_calls" not in answer.message()
    assert answer.finish_reason("stop") == "function_call"


def test_arguments_that_break_the_schema_never_become_a_call():
    answer, _ = _answer({"tools": [WEATHER]}, '{"tool_calls": [{"name": "get_weather", "arguments": {"days": 2}}]}')
    with pytest.raises(ToolCallError, match="city"):
        answer.check()


def test_an_answer_cut_by_the_token_limit_keeps_only_whole_calls():
    output = '{"tool_calls": [{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": {"ci'
    answer, _ = _answer({"tools": [WEATHER, TIME]}, output, finish="length")
    assert [c["name"] for c in answer.calls] == ["get_time"]
    assert answer.finish_reason("length") == "length"
    tools = tool_request({"tools": [WEATHER]})
    broken = ChatAnswer(tools, GenericParser(), lambda i: "x")
    broken.feed('{"tool_calls": [{"name": "get_weather", "arguments": {')
    with pytest.raises(ToolCallError):
        broken.close("stop")
