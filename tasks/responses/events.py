"""A chat job's events turned into the Responses API's stream events.

A Responses API request runs as a chat-completion job (workers/execute.py `_chat`): the job emits
one "delta" per `chat.completion.chunk`, then the `chat.completion` as its "result".
`ResponseEvents` is that job's `emit`: it translates each chunk of choice 0 (a response has no
`n`) into OpenAI's Responses stream events, each emitted as `("delta", event)` with a
`sequence_number` counting from 0 over the whole stream, and the completion into the final
Response object (`response.completed` or `response.incomplete`, then `("result", response)`).
Any other event type passes through unchanged.

The stream follows OpenAI's: `response.created`, `response.in_progress`, then the output items
one after the other, each opened by `response.output_item.added` and closed by
`response.output_item.done` before the next is added:

* reasoning (`reasoning_content` deltas): a `reasoning` item with one `reasoning_text` content
  part (`response.content_part.added`, `response.reasoning_text.delta`...,
  `response.reasoning_text.done`, `response.content_part.done`);
* text (`content` deltas): a `message` item with one `output_text` part
  (`response.content_part.added`, `response.output_text.delta`..., `response.output_text.done`,
  `response.content_part.done`);
* each tool call (`tool_calls` fragments, by their `index`): a `function_call` item
  (`response.function_call_arguments.delta`..., `response.function_call_arguments.done`).

An item is closed when the next one starts or when the choice finishes (its `finish_reason`
chunk); an item still open when the choice stops at its token limit (`length`) ends
`incomplete`, as does the response (`incomplete_details.reason: max_output_tokens`). The
completion is the truth: what the stream did not carry (no finish chunk, a text the stream
cut short, pieces never streamed) is sent from the completion's message before the end.

Ids are derived from the response id and the item's output index, and the events depend only
on the input: a redelivered job replays the same stream, so the events already sent match.
The Response objects inside events are copies of the state at that moment.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

Emit = Callable[[str, Any], None]

# OpenAI's ResponseErrorCode: the codes a failed Response's `error` may carry.
ERROR_CODES = frozenset({
    "server_error", "rate_limit_exceeded", "invalid_prompt", "data_residency_mismatch", "bio_policy",
    "vector_store_timeout", "invalid_image", "invalid_image_format", "invalid_base64_image",
    "invalid_image_url", "image_too_large", "image_too_small", "image_parse_error",
    "image_content_policy_violation", "invalid_image_mode", "image_file_too_large",
    "unsupported_image_media_type", "empty_image_file", "failed_to_download_image", "image_file_not_found",
})
# localq's codes that have a counterpart among them; any other code is reported as server_error
ERROR_ALIASES = {"context_length_exceeded": "invalid_prompt"}

# chat finish reasons that leave a response incomplete, with the Responses API's reason
INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}

MESSAGE, REASONING, FUNCTION_CALL = "message", "reasoning", "function_call"
_PREFIX = {MESSAGE: "msg", REASONING: "rs", FUNCTION_CALL: "fc"}


def error_code(code: Any) -> str:
    """`code` as a ResponseErrorCode (server_error for one the Responses API does not have)."""
    code = ERROR_ALIASES.get(code, code)
    return code if code in ERROR_CODES else "server_error"


class _Item:
    """One output item while it streams: its kind, its text (or arguments), whether it is open."""

    def __init__(self, kind: str, item_id: str, index: int, call: dict | None = None):
        self.kind = kind
        self.id = item_id
        self.index = index
        self.text = ""  # the message's text, the reasoning text, or the call's arguments
        self.status = "in_progress"
        self.call = call or {}  # function calls: {"chat_index", "call_id", "name"}

    @property
    def open(self) -> bool:
        return self.status == "in_progress"

    def part(self) -> dict:
        """The item's content part as it stands (messages and reasoning)."""
        if self.kind == MESSAGE:
            return {"type": "output_text", "text": self.text, "annotations": [], "logprobs": []}
        return {"type": "reasoning_text", "text": self.text}

    def body(self, *, opening: bool = False) -> dict:
        """The item as an OutputItem; `opening`: as `response.output_item.added` shows it (no content yet)."""
        if self.kind == MESSAGE:
            return {"id": self.id, "type": "message", "status": self.status, "role": "assistant",
                    "content": [] if opening else [self.part()]}
        if self.kind == REASONING:
            return {"id": self.id, "type": "reasoning", "summary": [],
                    "content": [] if opening else [self.part()], "status": self.status}
        return {"id": self.id, "type": "function_call", "status": self.status,
                "arguments": "" if opening else self.text, "call_id": self.call["call_id"],
                "name": self.call["name"]}


class ResponseEvents:
    """The emit of the chat job that answers one Responses API request.

    `response`: the Response object as created (`output` empty, the request's parameters echoed,
    `id` `resp_<hex>`), copied here: later changes to the caller's dict are not seen; `emit`:
    where the translated events go (the job's own emit). `start()` sends `response.created` and
    `response.in_progress` (status `in_progress`); then the object is called as the chat job's
    emit; `fail(error)` sends `response.failed`. `clock` gives the seconds for `completed_at`.
    """

    def __init__(self, response: dict, emit: Emit, *, clock: Callable[[], float] = time.time):
        self._response = copy.deepcopy(response)
        self._response.setdefault("error", None)  # required (nullable) while it runs
        self._response.setdefault("incomplete_details", None)
        if self._response.get("usage", {}) is None:  # `usage` has no null: absent until the end
            del self._response["usage"]
        self._emit = emit
        self._clock = clock
        response_id = str(self._response.get("id") or "")
        self._key = response_id[len("resp_"):] if response_id.startswith("resp_") else response_id
        self._sequence = 0
        self._started = False
        self._items: list[_Item] = []
        self._calls: dict[int, _Item] = {}  # chat tool call index -> its function_call item
        self._finish: str | None = None  # the finish_reason chunk's, once seen
        self._final: dict | None = None

    # -- the interface ---------------------------------------------------------------------------

    def start(self) -> None:
        """`response.created` then `response.in_progress`, both with the response as created (once)."""
        if self._started:
            return
        self._started = True
        self._response["status"] = "in_progress"  # running now, whatever it was created as (queued)
        self._send({"type": "response.created", "response": copy.deepcopy(self._response)})
        self._send({"type": "response.in_progress", "response": copy.deepcopy(self._response)})

    def __call__(self, type_: str, data: Any) -> None:
        """The chat job's emit: its chunks and its completion translated, other events passed on."""
        if type_ == "delta":
            self._chunk(data)
        elif type_ == "result":
            self._result(data)
        else:
            self._emit(type_, data)

    def fail(self, error: dict, *, emit: Emit | None = None) -> None:
        """`response.failed`: the response as it stands (items left as they are), status `failed`,
        `error` `{code, message}` (a code the Responses API does not have becomes server_error),
        sent through `emit` when given (the job's own emit may be closed by then), else the
        translator's. Nothing else is sent: the caller fails the job itself."""
        if self._final is not None:
            return
        failed = self._snapshot(status="failed")
        failed["error"] = {"code": error_code(error.get("code")), "message": str(error.get("message") or "")}
        if not self._started:  # nothing was sent: the stream still opens as OpenAI's do
            self.start()
        self._send({"type": "response.failed", "response": failed}, emit)

    @property
    def final(self) -> dict | None:
        """The final Response object, once the completion was translated."""
        return self._final

    # -- chunks ----------------------------------------------------------------------------------

    def _chunk(self, chunk: Any) -> None:
        if self._final is not None or not isinstance(chunk, dict):
            return
        self.start()
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0 or self._finish is not None:
                continue
            delta = choice.get("delta") or {}
            reasoning = delta.get("reasoning_content")
            if isinstance(reasoning, str) and reasoning:
                self._add_text(REASONING, reasoning)
            content = delta.get("content")
            if isinstance(content, str) and content:
                self._add_text(MESSAGE, content)
            for fragment in delta.get("tool_calls") or ():
                self._call_fragment(fragment)
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
                self._close_open(self._item_status(self._finish))

    def _add_text(self, kind: str, text: str) -> None:
        """`text`, the next piece of reasoning or of the answer, into the open item of its kind."""
        item = self._current(kind)
        if item is None:
            item = self._open(kind)
            self._send({"type": "response.content_part.added", "item_id": item.id, "output_index": item.index,
                        "content_index": 0, "part": item.part()})
        item.text += text
        event = {"type": "response.output_text.delta" if kind == MESSAGE else "response.reasoning_text.delta",
                 "item_id": item.id, "output_index": item.index, "content_index": 0, "delta": text}
        if kind == MESSAGE:
            event["logprobs"] = []
        self._send(event)

    def _call_fragment(self, fragment: dict) -> None:
        chat_index = fragment.get("index", 0)
        function = fragment.get("function") or {}
        item = self._calls.get(chat_index)
        if item is None:
            item = self._open(FUNCTION_CALL, {"chat_index": chat_index, "call_id": fragment.get("id") or "",
                                              "name": function.get("name") or ""})
            self._calls[chat_index] = item
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments and item.open:
            self._add_arguments(item, arguments)

    def _add_arguments(self, item: _Item, arguments: str) -> None:
        item.text += arguments
        self._send({"type": "response.function_call_arguments.delta", "item_id": item.id,
                    "output_index": item.index, "delta": arguments})

    # -- items -----------------------------------------------------------------------------------

    def _current(self, kind: str) -> _Item | None:
        """The open item when it is a `kind` one (messages and reasoning)."""
        if self._items and self._items[-1].open and self._items[-1].kind == kind:
            return self._items[-1]
        return None

    def _open(self, kind: str, call: dict | None = None) -> _Item:
        """A new item at the next output index; the one open before it is done."""
        self._close_open("completed")
        index = len(self._items)
        item = _Item(kind, f"{_PREFIX[kind]}_{self._key}_{index}", index, call)
        self._items.append(item)
        self._send({"type": "response.output_item.added", "output_index": index, "item": item.body(opening=True)})
        return item

    def _close_open(self, status: str) -> None:
        if self._items and self._items[-1].open:
            self._close(self._items[-1], status)

    def _close(self, item: _Item, status: str) -> None:
        item.status = status
        where = {"item_id": item.id, "output_index": item.index}
        if item.kind == FUNCTION_CALL:
            self._send({"type": "response.function_call_arguments.done", **where, "name": item.call["name"],
                        "arguments": item.text})
        else:
            if item.kind == MESSAGE:
                self._send({"type": "response.output_text.done", **where, "content_index": 0, "text": item.text,
                            "logprobs": []})
            else:
                self._send({"type": "response.reasoning_text.done", **where, "content_index": 0,
                            "text": item.text})
            self._send({"type": "response.content_part.done", **where, "content_index": 0, "part": item.part()})
        self._send({"type": "response.output_item.done", "output_index": item.index, "item": item.body()})

    @staticmethod
    def _item_status(finish: str | None) -> str:
        return "incomplete" if finish in INCOMPLETE else "completed"

    # -- the completion --------------------------------------------------------------------------

    def _result(self, completion: Any) -> None:
        if self._final is not None or not isinstance(completion, dict):
            return
        self.start()
        choice = next((c for c in completion.get("choices") or () if c.get("index", 0) == 0), {})
        message = choice.get("message") or {}
        finish = choice.get("finish_reason") or self._finish
        if self._finish is None:  # the stream did not finish the choice: the message is the truth
            self._catch_up(message)
            self._close_open(self._item_status(finish))
        if not self._items:  # an answer without text, reasoning or calls is an empty message
            item = self._open(MESSAGE)
            self._send({"type": "response.content_part.added", "item_id": item.id, "output_index": item.index,
                        "content_index": 0, "part": item.part()})
            self._close(item, self._item_status(finish))
        reason = INCOMPLETE.get(finish)
        final = self._snapshot(status="incomplete" if reason else "completed")
        if reason:
            final["incomplete_details"] = {"reason": reason}
        else:
            final["completed_at"] = int(self._clock())
        usage = completion.get("usage")
        if isinstance(usage, dict):
            final["usage"] = response_usage(usage)
        self._final = final
        self._send({"type": "response.incomplete" if reason else "response.completed",
                    "response": copy.deepcopy(final)})
        self._emit("result", copy.deepcopy(final))

    def _catch_up(self, message: dict) -> None:
        """Send what `message` holds beyond what the stream carried: the rest of the open item's
        text or arguments, and reasoning, text and calls that were never streamed."""
        reasoning = message.get("reasoning_content") or ""
        if isinstance(reasoning, str) and reasoning:
            self._extend(REASONING, reasoning)
        content = message.get("content") or ""
        if isinstance(content, str) and content:
            self._extend(MESSAGE, content)
        by_id = {item.call["call_id"]: item for item in self._items if item.kind == FUNCTION_CALL}
        for position, call in enumerate(message.get("tool_calls") or ()):
            function = call.get("function") or {}
            arguments = function.get("arguments") or ""
            item = by_id.get(call.get("id"))
            if item is None:
                chat_index = max(self._calls, default=-1) + 1
                item = self._open(FUNCTION_CALL, {"chat_index": chat_index, "call_id": call.get("id") or "",
                                                  "name": function.get("name") or ""})
                self._calls[chat_index] = item
            if item.open and arguments.startswith(item.text) and len(arguments) > len(item.text):
                self._add_arguments(item, arguments[len(item.text):])

    def _extend(self, kind: str, text: str) -> None:
        """`text` (the message's whole reasoning or answer) into the stream: the rest of it when the
        open item streamed a prefix of it, all of it when no item of its kind was streamed."""
        current = self._current(kind)
        if current is not None:
            if text.startswith(current.text) and len(text) > len(current.text):
                self._add_text(kind, text[len(current.text):])
        elif not any(item.kind == kind for item in self._items):
            self._add_text(kind, text)

    # -- output ----------------------------------------------------------------------------------

    def _snapshot(self, *, status: str) -> dict:
        """A copy of the response with `status` and the output items as they stand."""
        response = copy.deepcopy(self._response)
        response["status"] = status
        response["output"] = [item.body() for item in self._items]
        return response

    def _send(self, event: dict, emit: Emit | None = None) -> None:
        event["sequence_number"] = self._sequence
        self._sequence += 1
        (emit or self._emit)("delta", event)


def response_usage(usage: dict) -> dict:
    """A chat completion's usage as the Responses API's (ResponseUsage requires both token details,
    `cache_write_tokens` included: localq's cache is written as a side effect, never billed, so 0)."""
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    reasoning = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": int(cached), "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": int(reasoning)},
        "total_tokens": int(usage.get("total_tokens") or prompt + completion),
    }
