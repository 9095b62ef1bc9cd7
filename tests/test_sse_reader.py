"""tests/sse.py, the one SSE reader the integration tests use: it must read localq's streams right."""

from __future__ import annotations

from tests import sse

STREAM = (": keep-alive\n\n"
          "id: 1-0\ndata: {\"n\": 1}\n\n"
          "id: 1-1\nevent: progress\ndata:{\"step\": 2}\n\n"
          "data: line one\ndata: line two\n\n"
          "id: 1-2\n\n"  # no data: no event
          "id: 1-3\ndata: [DONE]\n\n")


def test_a_whole_body_gives_each_event_with_its_fields():
    assert sse.parse(STREAM) == [
        sse.Event('{"n": 1}', None, "1-0"),
        sse.Event('{"step": 2}', "progress", "1-1"),
        sse.Event("line one\nline two"),
        sse.Event("[DONE]", None, "1-3"),
    ]
    assert sse.parse(STREAM)[-1].done


def test_lines_as_they_arrive_give_each_event_once_its_blank_line_came():
    lines = iter(STREAM.split("\n"))
    first = next(sse.events(lines))
    assert first.id == "1-0" and next(lines) == "id: 1-1"  # read no further than the first event


def test_raw_blocks_keep_the_wire_text():
    assert sse.blocks(STREAM)[0] == 'id: 1-0\ndata: {"n": 1}'
    assert sse.blocks(STREAM, comments=True)[0] == ": keep-alive"


def test_keep_alives_never_reach_the_openai_sdk_as_events():
    """The openai SDK keeps the last event id across events, so a blank-line-ended comment after an
    `id:` event reached it as an event with empty data, which it failed to decode (JSONDecodeError
    mid-stream). Keep-alives are single comment lines: no client dispatches anything for them."""
    from openai._streaming import SSEDecoder

    from api.sse import DONE, KEEPALIVE, frame

    chunk = '{"object":"chat.completion.chunk","choices":[]}'
    wire = KEEPALIVE + frame(chunk, event_id="1-0") + KEEPALIVE + KEEPALIVE + frame(chunk, event_id="2-0") + DONE
    decoded = list(SSEDecoder().iter_bytes(iter([wire.encode()])))
    assert [event.data for event in decoded] == [chunk, chunk, "[DONE]"]
