"""A Responses request as the chat request that answers it (tasks/responses/request.py)."""

from __future__ import annotations

import pytest

from schemas.openai_errors import OpenAIError
from tasks.responses.request import chat_request, initial_response, input_items, input_param

CALLS = [
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": '{"city":"Paris"}'},
    {"type": "function_call", "call_id": "c2", "name": "weather", "arguments": '{"city":"Rome"}'},
    {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
    {"type": "function_call_output", "call_id": "c2", "output": "rain"},
    {"role": "user", "content": [{"type": "input_text", "text": "And "}, {"type": "input_text", "text": "so?"}]},
]


def test_items_become_chat_messages():
    body = {"model": "m", "instructions": "Be brief.", "input": CALLS, "max_output_tokens": 40,
            "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}, "strict": True}},
            "tools": [{"type": "function", "name": "weather", "parameters": {"type": "object"}}],
            "tool_choice": {"type": "function", "name": "weather"}}
    chat = chat_request(body, input_items(body), [])
    assert [m["role"] for m in chat["messages"]] == ["system", "user", "assistant", "tool", "tool", "user"]
    assert [call["id"] for call in chat["messages"][2]["tool_calls"]] == ["c1", "c2"], "parallel calls: one message"
    assert chat["messages"][5]["content"] == "And so?"
    assert chat["max_completion_tokens"] == 40
    assert chat["response_format"] == {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"},
                                                                               "strict": True}}
    assert chat["tools"] == [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"},
                                                               "strict": True}}]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "weather"}}


def test_chat_parameters_are_named_as_the_response_request_sent_them():
    body = {"model": "m", "instructions": "Be brief.", "input": CALLS}
    history = input_items({"input": "earlier"})
    assert input_param("messages[0]", body, history) == "instructions"
    assert input_param("messages[1].content", body, history) == "previous_response_id"
    assert input_param("messages[3].tool_calls[1]", body, history) == "input[1].tool_calls[1]"
    assert input_param("messages[4]", body, history) == "input[3]"
    assert input_param("messages[6].content[1]", body, history) == "input[5].content[1]"
    assert input_param("max_completion_tokens", body, history) == "max_output_tokens"


@pytest.mark.parametrize("body, param", [
    ({"model": "m", "input": "hi", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"model": "m", "input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
    ({"model": "m", "input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
     "input[0].content[0].type"),
    ({"model": "m", "input": "hi", "tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": []}},
     "tool_choice"),
    ({"model": "m", "input": "hi", "include": ["message.output_text.logprobs"]}, "include"),
    ({"model": "m", "input": "hi", "top_logprobs": 3}, "top_logprobs"),
    ({"model": "m", "input": "hi", "max_tool_calls": 3}, "max_tool_calls"),
])
def test_what_the_chat_engine_cannot_do_is_refused_by_name(body, param):
    with pytest.raises(OpenAIError) as refused:
        chat_request(body, input_items(body), [])
    assert refused.value.status == 400 and refused.value.param == param


def test_the_response_starts_with_every_parameter_echoed():
    response = initial_response({"model": "m", "input": "hi", "background": True, "metadata": {"a": "b"}},
                                "resp_" + "a" * 48, 100)
    assert response["status"] == "queued" and response["background"] is True and response["metadata"] == {"a": "b"}
    assert response["tool_choice"] == "auto" and response["truncation"] == "disabled" and response["output"] == []
    assert "store" not in response, "the Response schema has no `store`"


def test_one_tool_call_at_most_is_no_parallel_calls():
    body = {"model": "m", "input": "hi", "max_tool_calls": 1, "include": []}
    assert chat_request(body, input_items(body), [])["parallel_tool_calls"] is False
