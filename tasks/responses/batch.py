"""`/v1/responses` lines in a batch: each runs as the chat job its body makes, and its output line
holds the Response object that chat's completion makes, as a synchronous call would answer.

A batch line stands alone: `previous_response_id` is refused (the line would depend on a stored
response that may change or go), and nothing is stored.
"""

from __future__ import annotations

import hashlib

from schemas import openai_errors as errors
from tasks.responses.events import ResponseEvents
from tasks.responses.request import chat_request, initial_response, input_items


def chat_line(body: dict) -> dict:
    """The chat request of a line's body; OpenAIError (400) for what a line cannot carry."""
    if body.get("previous_response_id"):
        raise errors.unsupported_parameter("previous_response_id", "previous_response_id is not supported in "
                                                                   "batch lines: send the whole input.")
    if body.get("background") or body.get("stream"):
        name = "background" if body.get("background") else "stream"
        raise errors.unsupported_parameter(name, f"'{name}' is not supported in batch lines.")
    return chat_request(body, input_items(body), [])


def response_of(body: dict, completion: dict, batch_id: str, line: int, created_at: int) -> dict:
    """The Response object of a line whose chat job answered `completion` (its id is the same on
    every run of the line)."""
    response_id = "resp_" + hashlib.sha256(f"{batch_id}:{line}".encode()).hexdigest()[:48]
    events = ResponseEvents(initial_response(body, response_id, created_at), lambda *_: None)
    events("result", completion)
    return events.final
