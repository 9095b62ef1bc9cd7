"""tasks/responses/events.py: a chat job's chunks and completion turned into Responses API events.

The chunks are written by hand in the shapes workers/execute.py emits (`_chat_choice` for plain
text: an opening `{"role", "content": ""}` delta; `ChatAnswer` for reasoning and tool calls: the
role on the first delta, `content: null` when it carries none; tool call fragments keyed by
`index`; a finish chunk with an empty delta; a usage chunk without choices when asked for).
Every event emitted is validated against its own schema in the upstream spec, and the final
object against `Response`.
"""

from __future__ import annotations

import copy
import json

import pytest

from tasks.responses.events import ResponseEvents, error_code, response_usage
from tests.contract import upstream

RESPONSE_ID = "resp_0123456789abcdef0123456789abcdef"
HEX = RESPONSE_ID[len("resp_"):]
NOW = 1_700_000_123
BASE = {"id": "chatcmpl-job-1", "object": "chat.completion.chunk", "created": 1_700_000_000,
        "model": "gpt-4o-mini", "system_fingerprint": "fp_localq"}


def created_response(**overrides) -> dict:
    """A Response as the request handler creates it: in progress, no output, parameters echoed."""
    response = {
        "id": RESPONSE_ID, "object": "response", "created_at": 1_700_000_000, "status": "in_progress",
        "error": None, "incomplete_details": None, "instructions": None, "max_output_tokens": None,
        "model": "gpt-4o-mini", "output": [], "parallel_tool_calls": True, "previous_response_id": None,
        "reasoning": None, "temperature": 1.0, "top_p": 1.0, "text": {"format": {"type": "text"}},
        "tool_choice": "auto", "tools": [], "truncation": "disabled", "metadata": {}, "store": False,
        "background": False,
    }
    response.update(overrides)
    return response


WEATHER_TOOL = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                               "required": ["city"]}, "strict": False}


def chunk(delta: dict, finish: str | None = None, usage: bool = False) -> dict:
    body = {**BASE, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    if usage:
        body["usage"] = None
    return body


def usage_chunk(usage: dict) -> dict:
    return {**BASE, "choices": [], "usage": usage}


def usage(prompt: int, completion: int, cached: int = 0, reasoning: int | None = None) -> dict:
    body = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}
    if reasoning is not None:
        body["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return body


def completion(message: dict, finish: str, used: dict) -> dict:
    return {**BASE, "object": "chat.completion", "usage": used,
            "choices": [{"index": 0, "message": {"role": "assistant", "refusal": None, "annotations": [], **message},
                         "logprobs": None, "finish_reason": finish}]}


def call_fragments(index: int, call_id: str, name: str, pieces: list[str], *, first: bool) -> list[dict]:
    """One tool call as ChatAnswer streams it: the opening fragment, then argument pieces."""
    opening = {"tool_calls": [{"index": index, "id": call_id, "type": "function",
                               "function": {"name": name, "arguments": ""}}]}
    if first:
        opening = {"role": "assistant", "content": None, **opening}
    return [chunk(opening)] + [chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
                               for piece in pieces]


# ---------------------------------------------------------------------------------------------
# running a translator and checking what it emitted
# ---------------------------------------------------------------------------------------------


def event_schemas() -> dict[str, str]:
    """Each stream event type -> its component schema, read from ResponseStreamEvent."""
    schemas = upstream().document["components"]["schemas"]
    names = {}
    for branch in schemas["ResponseStreamEvent"]["anyOf"]:
        name = branch["$ref"].rsplit("/", 1)[-1]
        for event_type in schemas[name]["properties"]["type"].get("enum", ()):
            names[event_type] = name
    return names


def run(events: list[tuple[str, object]], response: dict | None = None) -> tuple[list, ResponseEvents]:
    emitted: list[tuple[str, object]] = []
    translator = ResponseEvents(response or created_response(), lambda t, d: emitted.append((t, d)),
                                clock=lambda: NOW + 0.75)
    translator.start()
    for type_, data in events:
        translator(type_, data)
    return emitted, translator


def stream_events(emitted: list) -> list[dict]:
    return [data for type_, data in emitted if type_ == "delta"]


def types(emitted: list) -> list[str]:
    return [event["type"] for event in stream_events(emitted)]


def check_stream(emitted: list) -> None:
    """Sequence numbers 0..n, every event valid against its schema, deltas adding up to the
    done texts and arguments, the `result` last and equal to the terminal event's response."""
    contract, schemas = upstream(), event_schemas()
    events = stream_events(emitted)
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    for event in events:
        contract.assert_conforms(schemas[event["type"]], event, what=event["type"])
    texts: dict[tuple, str] = {}
    for event in events:
        if event["type"].endswith(".delta"):
            key = (event["type"].rsplit(".", 1)[0], event["item_id"])
            texts[key] = texts.get(key, "") + event["delta"]
    for event in events:
        kind = event["type"].rsplit(".", 1)[0]
        if event["type"] in ("response.output_text.done", "response.reasoning_text.done"):
            assert texts.get((kind, event["item_id"]), "") == event["text"]
        if event["type"] == "response.function_call_arguments.done":
            assert texts.get((kind, event["item_id"]), "") == event["arguments"]
    # items are added at output indexes 0, 1, ...; at the end each is done once, in order, and
    # the done items are the final output
    added = [e for e in events if e["type"] == "response.output_item.added"]
    done = [e for e in events if e["type"] == "response.output_item.done"]
    assert [e["output_index"] for e in added] == list(range(len(added)))
    terminal = events[-1]
    if terminal["type"] in ("response.completed", "response.incomplete"):
        assert [e["output_index"] for e in done] == list(range(len(added)))
        assert emitted[-1] == ("result", terminal["response"])
        final = terminal["response"]
        contract.assert_conforms("Response", final, what="the final response")
        assert final["output"] == [e["item"] for e in done]
        for item in final["output"]:
            if item["type"] == "message":
                text = item["content"][0]["text"]
                assert texts.get(("response.output_text", item["id"]), "") == text


def final_of(emitted: list) -> dict:
    assert emitted[-1][0] == "result"
    return emitted[-1][1]


START = ["response.created", "response.in_progress"]
MESSAGE_OPEN = ["response.output_item.added", "response.content_part.added"]
MESSAGE_CLOSE = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
REASONING_CLOSE = ["response.reasoning_text.done", "response.content_part.done", "response.output_item.done"]
CALL_CLOSE = ["response.function_call_arguments.done", "response.output_item.done"]


# ---------------------------------------------------------------------------------------------
# the answers
# ---------------------------------------------------------------------------------------------


TEXT = ["Hello", ", wor", "ld", "!"]


def text_answer(finish: str = "stop", include_usage: bool = False) -> list[tuple[str, object]]:
    chunks = [chunk({"role": "assistant", "content": ""}, usage=include_usage)]
    chunks += [chunk({"content": piece}, usage=include_usage) for piece in TEXT]
    chunks.append(chunk({}, finish, usage=include_usage))
    used = usage(12, 4, cached=8)
    if include_usage:
        chunks.append(usage_chunk(used))
    return [("delta", c) for c in chunks] + [("result", completion({"content": "".join(TEXT)}, finish, used))]


def test_text_answer():
    emitted, translator = run(text_answer())
    assert types(emitted) == (START + MESSAGE_OPEN + ["response.output_text.delta"] * 4 + MESSAGE_CLOSE
                              + ["response.completed"])
    check_stream(emitted)
    final = final_of(emitted)
    assert translator.final == final
    assert final["status"] == "completed" and final["completed_at"] == NOW
    assert final["error"] is None and final["incomplete_details"] is None
    assert final["output"] == [{"id": f"msg_{HEX}_0", "type": "message", "status": "completed", "role": "assistant",
                                "content": [{"type": "output_text", "text": "Hello, world!", "annotations": [],
                                             "logprobs": []}]}]
    assert final["usage"] == {"input_tokens": 12, "input_tokens_details": {"cached_tokens": 8, "cache_write_tokens": 0},
                              "output_tokens": 4, "output_tokens_details": {"reasoning_tokens": 0},
                              "total_tokens": 16}
    events = stream_events(emitted)
    added = events[2]
    assert added["item"] == {"id": f"msg_{HEX}_0", "type": "message", "status": "in_progress",
                             "role": "assistant", "content": []}
    assert events[3]["part"] == {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    assert [e["delta"] for e in events if e["type"] == "response.output_text.delta"] == TEXT
    assert all(e["content_index"] == 0 and e["output_index"] == 0 and e["logprobs"] == []
               for e in events if e["type"] == "response.output_text.delta")


def test_usage_chunk_changes_nothing():
    with_usage, _ = run(text_answer(include_usage=True))
    without, _ = run(text_answer())
    assert with_usage == without


def test_snapshots_are_copies_of_their_moment():
    response = created_response()
    emitted, _ = run(text_answer(), response)
    created, in_progress = stream_events(emitted)[:2]
    for event in (created, in_progress):
        assert event["response"]["status"] == "in_progress"
        assert event["response"]["output"] == []
        assert "usage" not in event["response"] and "completed_at" not in event["response"]
        assert event["response"] == response
    assert created["response"] is not in_progress["response"]
    assert response == created_response()  # the caller's object is left alone
    final = final_of(emitted)
    final["output"].clear()  # what the caller does with the result touches no event
    assert stream_events(emitted)[-1]["response"]["output"]


def test_text_cut_by_length():
    chunks = [chunk({"role": "assistant", "content": ""}), chunk({"content": "Once upon"}),
              chunk({"content": " a time"}), chunk({}, "length")]
    used = usage(5, 3)
    emitted, translator = run([("delta", c) for c in chunks]
                              + [("result", completion({"content": "Once upon a time"}, "length", used))])
    assert types(emitted) == (START + MESSAGE_OPEN + ["response.output_text.delta"] * 2 + MESSAGE_CLOSE
                              + ["response.incomplete"])
    check_stream(emitted)
    final = final_of(emitted)
    assert final["status"] == "incomplete"
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert "completed_at" not in final
    assert final["output"][0]["status"] == "incomplete"
    assert final["output"][0]["content"][0]["text"] == "Once upon a time"
    assert final["usage"]["output_tokens"] == 3 and final["usage"]["total_tokens"] == 8


ARGS = ['{"ci', 'ty": "Par', 'is"}']
ARGS_2 = ['{"city": ', '"Oslo"}']


def test_one_tool_call():
    chunks = call_fragments(0, "call_aaa", "get_weather", ARGS, first=True) + [chunk({}, "tool_calls")]
    message = {"content": None, "tool_calls": [
        {"id": "call_aaa", "type": "function", "function": {"name": "get_weather", "arguments": "".join(ARGS)}}]}
    emitted, _ = run([("delta", c) for c in chunks] + [("result", completion(message, "tool_calls", usage(30, 9)))],
                     created_response(tools=[WEATHER_TOOL]))
    assert types(emitted) == (START + ["response.output_item.added"]
                              + ["response.function_call_arguments.delta"] * 3 + CALL_CLOSE + ["response.completed"])
    check_stream(emitted)
    events = stream_events(emitted)
    assert events[2]["item"] == {"id": f"fc_{HEX}_0", "type": "function_call", "status": "in_progress",
                                 "arguments": "", "call_id": "call_aaa", "name": "get_weather"}
    done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
    assert done == {"type": "response.function_call_arguments.done", "item_id": f"fc_{HEX}_0", "output_index": 0,
                    "name": "get_weather", "arguments": '{"city": "Paris"}', "sequence_number": done["sequence_number"]}
    final = final_of(emitted)
    assert final["status"] == "completed"
    assert final["output"] == [{"id": f"fc_{HEX}_0", "type": "function_call", "status": "completed",
                                "arguments": '{"city": "Paris"}', "call_id": "call_aaa", "name": "get_weather"}]


def test_two_parallel_tool_calls():
    chunks = (call_fragments(0, "call_aaa", "get_weather", ARGS, first=True)
              + call_fragments(1, "call_bbb", "get_weather", ARGS_2, first=False) + [chunk({}, "tool_calls")])
    message = {"content": None, "tool_calls": [
        {"id": "call_aaa", "type": "function", "function": {"name": "get_weather", "arguments": "".join(ARGS)}},
        {"id": "call_bbb", "type": "function", "function": {"name": "get_weather", "arguments": "".join(ARGS_2)}}]}
    emitted, _ = run([("delta", c) for c in chunks] + [("result", completion(message, "tool_calls", usage(30, 20)))],
                     created_response(tools=[WEATHER_TOOL]))
    # each call is done before the next one is added, as OpenAI streams them
    assert types(emitted) == (START
                              + ["response.output_item.added"] + ["response.function_call_arguments.delta"] * 3
                              + CALL_CLOSE
                              + ["response.output_item.added"] + ["response.function_call_arguments.delta"] * 2
                              + CALL_CLOSE + ["response.completed"])
    check_stream(emitted)
    final = final_of(emitted)
    assert [(item["id"], item["call_id"], item["arguments"], item["status"]) for item in final["output"]] == [
        (f"fc_{HEX}_0", "call_aaa", '{"city": "Paris"}', "completed"),
        (f"fc_{HEX}_1", "call_bbb", '{"city": "Oslo"}', "completed")]


def test_reasoning_then_text():
    thinking = ["The user ", "greets me.", " Answer."]
    chunks = [chunk({"role": "assistant", "content": None, "reasoning_content": thinking[0]})]
    chunks += [chunk({"reasoning_content": piece}) for piece in thinking[1:]]
    chunks += [chunk({"content": "Hi"}), chunk({"content": " there"}), chunk({}, "stop")]
    message = {"content": "Hi there", "reasoning_content": "".join(thinking)}
    emitted, _ = run([("delta", c) for c in chunks]
                     + [("result", completion(message, "stop", usage(7, 11, reasoning=6)))])
    assert types(emitted) == (START + ["response.output_item.added", "response.content_part.added"]
                              + ["response.reasoning_text.delta"] * 3 + REASONING_CLOSE
                              + MESSAGE_OPEN + ["response.output_text.delta"] * 2 + MESSAGE_CLOSE
                              + ["response.completed"])
    check_stream(emitted)
    events = stream_events(emitted)
    assert events[2]["item"] == {"id": f"rs_{HEX}_0", "type": "reasoning", "summary": [], "content": [],
                                 "status": "in_progress"}
    assert events[3]["part"] == {"type": "reasoning_text", "text": ""}
    reasoning_done = next(e for e in events if e["type"] == "response.reasoning_text.done")
    assert reasoning_done["text"] == "The user greets me. Answer."
    final = final_of(emitted)
    assert final["output"] == [
        {"id": f"rs_{HEX}_0", "type": "reasoning", "summary": [],
         "content": [{"type": "reasoning_text", "text": "The user greets me. Answer."}], "status": "completed"},
        {"id": f"msg_{HEX}_1", "type": "message", "status": "completed", "role": "assistant",
         "content": [{"type": "output_text", "text": "Hi there", "annotations": [], "logprobs": []}]}]
    assert final["usage"]["output_tokens_details"] == {"reasoning_tokens": 6}


def test_text_then_tool_call():
    chunks = [chunk({"role": "assistant", "content": "Let me "}), chunk({"content": "check."})]
    chunks += call_fragments(0, "call_ccc", "get_weather", ARGS, first=False) + [chunk({}, "tool_calls")]
    message = {"content": "Let me check.", "tool_calls": [
        {"id": "call_ccc", "type": "function", "function": {"name": "get_weather", "arguments": "".join(ARGS)}}]}
    emitted, _ = run([("delta", c) for c in chunks] + [("result", completion(message, "tool_calls", usage(30, 15)))],
                     created_response(tools=[WEATHER_TOOL]))
    assert types(emitted) == (START + MESSAGE_OPEN + ["response.output_text.delta"] * 2 + MESSAGE_CLOSE
                              + ["response.output_item.added"] + ["response.function_call_arguments.delta"] * 3
                              + CALL_CLOSE + ["response.completed"])
    check_stream(emitted)
    final = final_of(emitted)
    assert [(item["type"], item["id"], item["status"]) for item in final["output"]] == [
        ("message", f"msg_{HEX}_0", "completed"), ("function_call", f"fc_{HEX}_1", "completed")]
    assert final["output"][0]["content"][0]["text"] == "Let me check."


def test_tool_call_cut_by_length():
    """Stopped at the token limit in a call: the call ends incomplete, and so does the response
    (the completion drops a call whose arguments are not whole; the stream already carried it)."""
    chunks = call_fragments(0, "call_ddd", "get_weather", ARGS[:2], first=True) + [chunk({}, "length")]
    emitted, _ = run([("delta", c) for c in chunks]
                     + [("result", completion({"content": None}, "length", usage(30, 8)))],
                     created_response(tools=[WEATHER_TOOL]))
    assert types(emitted) == (START + ["response.output_item.added"] + ["response.function_call_arguments.delta"] * 2
                              + CALL_CLOSE + ["response.incomplete"])
    check_stream(emitted)
    final = final_of(emitted)
    assert final["output"][0]["status"] == "incomplete" and final["output"][0]["arguments"] == '{"city": "Par'
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}


def test_empty_answer_is_an_empty_message():
    chunks = [chunk({"role": "assistant", "content": ""}), chunk({}, "stop")]
    emitted, _ = run([("delta", c) for c in chunks] + [("result", completion({"content": ""}, "stop", usage(3, 1)))])
    assert types(emitted) == START + MESSAGE_OPEN + MESSAGE_CLOSE + ["response.completed"]
    check_stream(emitted)
    assert final_of(emitted)["output"][0]["content"][0]["text"] == ""


def test_result_without_a_stream_is_streamed_from_the_message():
    message = {"content": "Done.", "reasoning_content": "Quick.", "tool_calls": [
        {"id": "call_eee", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]}
    emitted, _ = run([("result", completion(message, "tool_calls", usage(4, 9)))],
                     created_response(tools=[WEATHER_TOOL]))
    assert types(emitted) == (START + ["response.output_item.added", "response.content_part.added",
                                       "response.reasoning_text.delta"] + REASONING_CLOSE
                              + MESSAGE_OPEN + ["response.output_text.delta"] + MESSAGE_CLOSE
                              + ["response.output_item.added", "response.function_call_arguments.delta"]
                              + CALL_CLOSE + ["response.completed"])
    check_stream(emitted)
    final = final_of(emitted)
    assert [item["type"] for item in final["output"]] == ["reasoning", "message", "function_call"]
    assert final["output"][2]["call_id"] == "call_eee"


def test_stream_without_finish_is_completed_from_the_message():
    """The stream stopped short of the message (no finish chunk): the rest is sent as a delta."""
    chunks = [chunk({"role": "assistant", "content": ""}), chunk({"content": "Hel"})]
    result = completion({"content": "Hello"}, "stop", usage(2, 2))
    emitted, _ = run([("delta", c) for c in chunks] + [("result", result)])
    assert types(emitted) == (START + MESSAGE_OPEN + ["response.output_text.delta"] * 2 + MESSAGE_CLOSE
                              + ["response.completed"])
    check_stream(emitted)
    assert [e["delta"] for e in stream_events(emitted) if e["type"] == "response.output_text.delta"] == ["Hel", "lo"]


def test_other_events_pass_through_without_a_sequence_number():
    events = text_answer()
    events.insert(0, ("status", {"status": "running"}))
    events.insert(3, ("progress", {"done": 1, "total": 4}))
    emitted, _ = run(events)
    assert ("status", {"status": "running"}) in emitted and ("progress", {"done": 1, "total": 4}) in emitted
    check_stream(emitted)
    plain, _ = run(text_answer())
    assert stream_events(emitted) == stream_events(plain)


def test_other_choices_are_ignored():
    events = text_answer()
    stray = {**BASE, "choices": [{"index": 1, "delta": {"content": "other"}, "logprobs": None, "finish_reason": None}]}
    events.insert(2, ("delta", stray))
    emitted, _ = run(events)
    plain, _ = run(text_answer())
    assert emitted == plain


def test_same_input_same_events():
    """A redelivered job replays the same stream: the translated events must match exactly."""
    chunks = ([chunk({"role": "assistant", "content": None, "reasoning_content": "Hm."}), chunk({"content": "Ok"})]
              + call_fragments(0, "call_fff", "get_weather", ARGS, first=False) + [chunk({}, "tool_calls")])
    message = {"content": "Ok", "reasoning_content": "Hm.", "tool_calls": [
        {"id": "call_fff", "type": "function", "function": {"name": "get_weather", "arguments": "".join(ARGS)}}]}
    events = [("delta", c) for c in chunks] + [("result", completion(message, "tool_calls", usage(9, 9)))]
    first, _ = run(copy.deepcopy(events), created_response(tools=[WEATHER_TOOL]))
    second, _ = run(copy.deepcopy(events), created_response(tools=[WEATHER_TOOL]))
    assert json.dumps(first) == json.dumps(second)
    check_stream(first)
    other, _ = run(copy.deepcopy(events), created_response(id="resp_" + "f" * 32, tools=[WEATHER_TOOL]))
    ids = {e["item"]["id"] for _, e in other if isinstance(e, dict) and e.get("type") == "response.output_item.added"}
    assert ids == {f"rs_{'f' * 32}_0", f"msg_{'f' * 32}_1", f"fc_{'f' * 32}_2"}


def test_start_is_sent_once_and_before_anything():
    emitted: list = []
    translator = ResponseEvents(created_response(), lambda t, d: emitted.append((t, d)), clock=lambda: NOW)
    for type_, data in text_answer():  # no start(): the first chunk starts the stream
        translator(type_, data)
    translator.start()
    assert types(emitted)[:2] == START and types(emitted).count("response.created") == 1
    check_stream(emitted)


def test_fail():
    emitted, translator = run([("delta", chunk({"role": "assistant", "content": "Par"}))])
    translator.fail({"code": "worker_lost", "message": "The job stopped its worker 3 times and was given up."})
    assert types(emitted) == START + MESSAGE_OPEN + ["response.output_text.delta", "response.failed"]
    check_stream(emitted)
    failed = stream_events(emitted)[-1]
    assert emitted[-1][0] == "delta"  # no result: the caller fails the job itself
    response = failed["response"]
    upstream().assert_conforms("Response", response)
    assert response["status"] == "failed"
    assert response["error"] == {"code": "server_error",
                                 "message": "The job stopped its worker 3 times and was given up."}
    assert response["output"][0]["status"] == "in_progress" and "usage" not in response
    assert translator.final is None


def test_fail_through_another_emit():
    """The caller may send `response.failed` elsewhere (straight to the job's events, its emit
    being closed): the sequence numbers go on from the translator's."""
    emitted, translator = run([("delta", chunk({"role": "assistant", "content": "Par"}))])
    elsewhere: list = []
    translator.fail({"code": "invalid_prompt", "message": "Too long."}, emit=lambda t, d: elsewhere.append((t, d)))
    assert types(emitted) == START + MESSAGE_OPEN + ["response.output_text.delta"]
    assert types(elsewhere) == ["response.failed"]
    check_stream(emitted + elsewhere)
    assert elsewhere[0][1]["response"]["error"] == {"code": "invalid_prompt", "message": "Too long."}


def test_fail_before_start_opens_the_stream():
    emitted: list = []
    translator = ResponseEvents(created_response(), lambda t, d: emitted.append((t, d)), clock=lambda: NOW)
    translator.fail({"code": "server_error", "message": "Boom."})
    assert types(emitted) == START + ["response.failed"]
    check_stream(emitted)


def test_created_as_queued_starts_in_progress():
    emitted, _ = run(text_answer(), created_response(status="queued"))
    assert [e["response"]["status"] for e in stream_events(emitted)[:2]] == ["in_progress", "in_progress"]
    check_stream(emitted)


@pytest.mark.parametrize(("code", "expected"), [
    ("rate_limit_exceeded", "rate_limit_exceeded"), ("invalid_image", "invalid_image"),
    ("context_length_exceeded", "invalid_prompt"), ("job_timeout", "server_error"), (None, "server_error")])
def test_error_codes(code, expected):
    assert error_code(code) == expected
    enum = upstream().document["components"]["schemas"]["ResponseErrorCode"]
    upstream().assert_conforms("ResponseErrorCode", expected)
    assert expected in (enum.get("enum") or [])


def test_usage_without_details():
    converted = response_usage({"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})
    assert converted == {"input_tokens": 3, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                         "output_tokens": 2, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 5}
    upstream().assert_conforms("ResponseUsage", converted)
