"""The Responses API end to end (issue 15) through the unmodified `openai` SDK, on the session's
shared service: every Response object and every streamed event checked against its schema in the
upstream spec."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest
from openai import BadRequestError, NotFoundError, OpenAI

from tests.contract import upstream
from tests.service import CHAT, wait_until

EVENT_SCHEMAS = {
    "response.created": "ResponseCreatedEvent",
    "response.in_progress": "ResponseInProgressEvent",
    "response.queued": "ResponseQueuedEvent",
    "response.output_item.added": "ResponseOutputItemAddedEvent",
    "response.output_item.done": "ResponseOutputItemDoneEvent",
    "response.content_part.added": "ResponseContentPartAddedEvent",
    "response.content_part.done": "ResponseContentPartDoneEvent",
    "response.output_text.delta": "ResponseTextDeltaEvent",
    "response.output_text.done": "ResponseTextDoneEvent",
    "response.reasoning_text.delta": "ResponseReasoningTextDeltaEvent",
    "response.reasoning_text.done": "ResponseReasoningTextDoneEvent",
    "response.function_call_arguments.delta": "ResponseFunctionCallArgumentsDeltaEvent",
    "response.function_call_arguments.done": "ResponseFunctionCallArgumentsDoneEvent",
    "response.completed": "ResponseCompletedEvent",
    "response.incomplete": "ResponseIncompleteEvent",
    "response.failed": "ResponseFailedEvent",
}
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city.", "strict": True,
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                          "additionalProperties": False}}


@pytest.fixture(scope="module")
def service(stack):
    return stack


@pytest.fixture(scope="module")
def client(service):
    return OpenAI(base_url=service.base_url + "/v1", api_key="unused", timeout=180, max_retries=0)


@pytest.fixture(scope="module")
def http(service):
    with httpx.Client(base_url=service.base_url + "/v1", timeout=180) as session:
        yield session


def conforms(response: dict) -> dict:
    upstream().assert_conforms("Response", response, "a Response")
    return response


def streamed(http: httpx.Client, method: str, url: str, **kwargs) -> list[dict]:
    """Every event of a Responses stream, each checked against its schema; their SSE names match."""
    events = []
    with http.stream(method, url, **kwargs) as answer:
        assert answer.status_code == 200, answer.read()
        name = None
        for line in answer.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                assert event["type"] == name
                upstream().assert_conforms(EVENT_SCHEMAS[event["type"]], event, event["type"])
                events.append(event)
    return events


def test_a_text_response_and_what_is_stored(client):
    made = client.responses.create(model=CHAT, input="Say hello.", instructions="Be brief.", max_output_tokens=16,
                                   temperature=0, metadata={"run": "1"})
    body = conforms(made.model_dump(exclude_unset=True, mode="json"))
    assert made.status in ("completed", "incomplete") and made.output_text
    assert made.object == "response" and made.instructions == "Be brief." and made.metadata == {"run": "1"}
    assert made.usage.input_tokens > 0 and 0 < made.usage.output_tokens <= 16
    assert made.usage.total_tokens == made.usage.input_tokens + made.usage.output_tokens
    fetched = client.responses.retrieve(made.id)
    assert fetched.model_dump(mode="json") == made.model_dump(mode="json")
    items = client.responses.input_items.list(made.id)
    assert [(item.type, item.role, item.content[0].text) for item in items.data] == [("message", "user", "Say hello.")]
    client.responses.delete(made.id)
    with pytest.raises(NotFoundError):
        client.responses.retrieve(made.id)
    assert body["id"].startswith("resp_")


def test_a_streamed_response_is_openai_s_event_sequence(http):
    events = streamed(http, "POST", "/responses", json={"model": CHAT, "input": "Count to three.",
                                                         "max_output_tokens": 16, "temperature": 0, "stream": True})
    types = [event["type"] for event in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          types[-1]] and types[-1] in ("response.completed", "response.incomplete")
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    text = "".join(event["delta"] for event in events if event["type"] == "response.output_text.delta")
    final = conforms(events[-1]["response"])
    assert final["output"][0]["content"][0]["text"] == text != ""
    stored = http.get(f"/responses/{final['id']}").json()
    assert stored == final


def test_previous_response_id_carries_the_conversation(client):
    first = client.responses.create(model=CHAT, input="My name is Ada.", max_output_tokens=16, temperature=0)
    second = client.responses.create(model=CHAT, input="What is my name?", previous_response_id=first.id,
                                     max_output_tokens=16, temperature=0)
    third = client.responses.create(model=CHAT, input="Say it again.", previous_response_id=second.id,
                                    max_output_tokens=16, temperature=0)
    assert second.previous_response_id == first.id
    # each turn's prompt holds every earlier turn: more input tokens each time
    assert first.usage.input_tokens < second.usage.input_tokens < third.usage.input_tokens
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    client.responses.delete(first.id)
    with pytest.raises(NotFoundError) as gone:
        client.responses.create(model=CHAT, input="And now?", previous_response_id=second.id)
    assert gone.value.code == "previous_response_not_found"


def test_a_function_tool_round_trip(client):
    called = client.responses.create(model=CHAT, input="What is the weather in Paris?", tools=[WEATHER],
                                     tool_choice="required", temperature=0)
    conforms(called.model_dump(exclude_unset=True, mode="json"))
    [call] = [item for item in called.output if item.type == "function_call"]
    assert call.name == "get_weather" and isinstance(json.loads(call.arguments)["city"], str)
    assert call.call_id and call.id.startswith("fc_")
    answered = client.responses.create(model=CHAT, previous_response_id=called.id, tools=[WEATHER], temperature=0,
                                       tool_choice="none", max_output_tokens=16, input=[{"type": "function_call_output",
                                                                     "call_id": call.call_id, "output": "Sunny, 24 C"}])
    assert answered.output_text and answered.output[0].type == "message"
    assert answered.usage.input_tokens > called.usage.input_tokens


def test_json_schema_output_validates(client):
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "sure": {"type": "boolean"}},
              "required": ["answer", "sure"], "additionalProperties": False}
    made = client.responses.create(model=CHAT, input="Is the sky blue?", temperature=0, max_output_tokens=60,
                                   text={"format": {"type": "json_schema", "name": "verdict", "schema": schema,
                                                    "strict": True}})
    jsonschema.validate(json.loads(made.output_text), schema)
    assert made.text.format.type == "json_schema"


def test_a_background_response_is_polled_and_its_stream_resumed(client, http):
    made = client.responses.create(model=CHAT, input="Tell me about the sea.", max_output_tokens=16, temperature=0,
                                   background=True)
    assert made.status in ("queued", "in_progress") and made.background is True
    done = wait_until(lambda: (found := client.responses.retrieve(made.id)).status not in ("queued", "in_progress")
                      and found, 120, "the background response to finish")
    assert done.status in ("completed", "incomplete")
    conforms(done.model_dump(exclude_unset=True, mode="json"))
    every = streamed(http, "GET", f"/responses/{made.id}", params={"stream": "true"})
    assert [event["sequence_number"] for event in every] == list(range(len(every)))
    later = streamed(http, "GET", f"/responses/{made.id}", params={"stream": "true", "starting_after": 3})
    assert later == every[4:], "resumed after event 3: no gap, no duplicate"


def test_refusals_name_their_parameter(client):
    with pytest.raises(BadRequestError) as refused:
        client.responses.create(model=CHAT, input="hi", tools=[{"type": "web_search"}])
    assert refused.value.param == "tools[0].type"
    with pytest.raises(BadRequestError) as refused:
        client.responses.create(model=CHAT, input="hi", background=True, store=False)
    assert refused.value.param == "store"
    with pytest.raises(BadRequestError) as refused:
        made = client.responses.create(model=CHAT, input="hi", max_output_tokens=16)
        client.responses.cancel(made.id)
    with pytest.raises(NotFoundError):
        client.responses.retrieve("resp_" + "0" * 48)
    with pytest.raises(BadRequestError) as refused:  # a text model, given an image
        client.responses.create(model=CHAT, instructions="Look.", input=[
            {"role": "user", "content": "Hello"},
            {"role": "user", "content": [{"type": "input_text", "text": "What is this?"},
                                         {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo="}]}])
    assert refused.value.param.startswith("input[1].content"), refused.value.param


def test_schema_check_is_real():
    with pytest.raises(AssertionError):
        upstream().assert_conforms("ResponseTextDeltaEvent", {"type": "response.output_text.delta"}, "broken")


def test_input_tokens_counts_the_prompt_a_response_reads(client, http):
    body = {"model": CHAT, "input": "How many tokens is this?", "instructions": "Answer briefly."}
    counted = http.post("/responses/input_tokens", json=body)
    assert counted.status_code == 200, counted.text
    upstream().assert_conforms("TokenCountsResource", counted.json(), "the count")
    made = client.responses.create(**body, max_output_tokens=16, temperature=0)
    assert counted.json() == {"object": "response.input_tokens", "input_tokens": made.usage.input_tokens}
    with_tools = http.post("/responses/input_tokens", json={**body, "tools": [WEATHER]}).json()["input_tokens"]
    assert with_tools > made.usage.input_tokens, "the tool definitions are part of the prompt"


def test_responses_as_batch_lines(client):
    lines = [{"custom_id": f"r-{i}", "method": "POST", "url": "/v1/responses",
              "body": {"model": CHAT, "input": f"Say the number {i}.", "max_output_tokens": 16, "temperature": 0}}
             for i in range(2)]
    source = client.files.create(file=("responses.jsonl", "".join(json.dumps(line) + "\n" for line in lines)),
                                 purpose="batch")
    batch = client.batches.create(input_file_id=source.id, endpoint="/v1/responses", completion_window="24h")
    done = wait_until(lambda: (found := client.batches.retrieve(batch.id)).status in
                      ("completed", "failed", "expired", "cancelled") and found, 120, "the batch to finish")
    assert done.status == "completed" and done.request_counts.completed == 2, done
    output = [json.loads(line) for line in client.files.content(done.output_file_id).text.splitlines()]
    bodies = [line["response"]["body"] for line in output]
    for body in bodies:
        conforms(body)
        assert body["object"] == "response" and body["output"][0]["content"][0]["text"]
    direct = client.responses.create(**lines[0]["body"])
    assert bodies[0]["output"][0]["content"][0]["text"] == direct.output_text, "a line answers as a call would"
    assert done.usage.input_tokens == sum(body["usage"]["input_tokens"] for body in bodies) > 0
    assert done.usage.output_tokens == sum(body["usage"]["output_tokens"] for body in bodies) > 0


def test_truncation_auto_drops_the_oldest_items_to_fit(client, http):
    long_turns = [{"role": "user", "content": f"Turn {i}: " + "the sea is wide and blue " * 50} for i in range(12)]
    body = {"model": CHAT, "input": long_turns + [{"role": "user", "content": "Say hi."}], "max_output_tokens": 16,
            "temperature": 0}
    with pytest.raises(BadRequestError) as refused:
        client.responses.create(**body)
    assert refused.value.code == "context_length_exceeded"
    made = client.responses.create(**body, truncation="auto")
    assert made.status in ("completed", "incomplete") and made.truncation == "auto"
    assert 1000 < made.usage.input_tokens < 2048, "as much of the conversation as fits"
    counted = http.post("/responses/input_tokens", json={"model": CHAT, "input": body["input"],
                                                          "truncation": "auto"}).json()
    assert counted["input_tokens"] == made.usage.input_tokens


def test_the_sdk_reads_the_streams(client):
    with client.responses.create(model=CHAT, input="Name a colour.", max_output_tokens=16, temperature=0,
                                 stream=True) as stream:
        events = list(stream)
    assert events[0].type == "response.created" and events[-1].type in ("response.completed", "response.incomplete")
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert text == events[-1].response.output_text
    again = client.responses.retrieve(events[-1].response.id, stream=True, starting_after=2)
    assert [event.sequence_number for event in again] == [event.sequence_number for event in events[3:]]
