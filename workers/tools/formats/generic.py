"""The output format localq forces with a grammar when a request has tools, and the reading
machinery every JSON-based format shares.

A `generic` output is exactly one JSON object: `{"tool_calls": [{"name": ..., "arguments": {...}},
...]}` or `{"response": "..."}`. The native formats (`hermes`, `llama3`, `mistral`, `json`) wrap the
same call objects in markers of their own, so `JsonCallParser` holds what they all need: a reader
written as a plain recursive-descent generator that suspends (`yield`) whenever it needs more text
than has arrived, the call-object reader, and text held back while it may still be tool syntax.
Errors found while feeding are kept and raised by `close()`; the parser then ignores what follows.
"""

from __future__ import annotations

import json
import re
from abc import abstractmethod
from collections.abc import Callable, Generator
from typing import Any, TypeVar

from workers.tools.events import Arguments, CallStarted, Event, Text, ToolCallParser, ToolSyntaxError
from workers.tools.json_scan import JsonScanner, JsonStringDecoder

T = TypeVar("T")
Reading = Generator[None, None, T]  # a reader step: yields while it waits for more text, returns its result

_JSON_SPACE = re.compile(r"[ \t\n\r]*")
_TEXT_SPACE = re.compile(r"\s*")  # the whitespace `str.strip` removes
_JSON_KEY = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
ARGUMENT_KEYS = ("arguments", "parameters")  # OpenAI-style and Llama-style names for a call's arguments
CALL_KEYS = ("name", *ARGUMENT_KEYS)


class JsonCallParser(ToolCallParser):
    """Base of the formats whose calls are JSON `{"name": ..., "arguments": {...}}` objects. A
    subclass writes `_read()`, a generator over the whole output, with the `_read_*` / `_expect*`
    steps below; text arrives in `_buffer` and `_pos` marks what has been consumed."""

    def __init__(self) -> None:
        self._buffer = ""
        self._pos = 0
        self._ended = False
        self._events: list[Event] = []
        self.error: ToolSyntaxError | None = None  # the syntax error met, raised again by close()
        self._reader: Reading[None] | None = self._read()

    @abstractmethod
    def _read(self) -> Reading[None]:
        """Read the whole output, emitting events; runs until the end of the output or an error."""

    def feed(self, text: str) -> list[Event]:
        if self._ended:
            raise RuntimeError("feed() after close()")
        if self._reader is None:  # an error was met: the rest of the output does not matter
            return []
        self._buffer = self._buffer[self._pos :] + text if self._pos else self._buffer + text
        self._pos = 0
        self._resume()
        return self._take_events()

    def close(self) -> list[Event]:
        if not self._ended:
            self._ended = True
            if self._reader is not None:
                self._resume()
                if self._reader is not None:  # every wait checks `_ended`: only a reader bug gets here
                    self._reader = None
                    self.error = ToolSyntaxError("the output ended before its tool syntax did")
        if self.error is not None:
            raise self.error
        return self._take_events()

    def _resume(self) -> None:
        try:
            next(self._reader)
        except StopIteration:
            self._reader = None
        except ToolSyntaxError as error:
            self._reader = None
            self.error = error

    def _take_events(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    # emitting: consecutive pieces of the same kind become one event

    def _emit_text(self, text: str) -> None:
        if not text:
            return
        if self._events and isinstance(self._events[-1], Text):
            text = self._events.pop().text + text
        self._events.append(Text(text))

    def _emit_arguments(self, index: int, text: str) -> None:
        if not text:
            return
        last = self._events[-1] if self._events else None
        if isinstance(last, Arguments) and last.index == index:
            text = self._events.pop().text + text
        self._events.append(Arguments(index, text))

    # waiting for text: each step yields until what it needs has arrived or the output has ended

    def _skip_space(self) -> Reading[str]:
        """Consume JSON whitespace: the next character, not consumed ("" at the end of the output)."""
        while True:
            self._pos = _JSON_SPACE.match(self._buffer, self._pos).end()
            if self._pos < len(self._buffer):
                return self._buffer[self._pos]
            if self._ended:
                return ""
            yield

    def _expect(self, char: str) -> Reading[None]:
        found = yield from self._skip_space()
        if found != char:
            raise ToolSyntaxError(f"expected {char!r} in the tool syntax, found {_describe(found)}")
        self._pos += 1

    def _expect_end(self) -> Reading[None]:
        """Only whitespace may follow, up to the end of the output."""
        found = yield from self._skip_space()
        if found:
            raise ToolSyntaxError(f"unexpected {_describe(found)} after the tool syntax")

    # looking ahead without consuming: offsets are relative to `_pos`, which stays put

    def _char_at(self, offset: int) -> Reading[str]:
        while self._pos + offset >= len(self._buffer):
            if self._ended:
                return ""
            yield
        return self._buffer[self._pos + offset]

    def _space_end_at(self, offset: int) -> Reading[int]:
        """The offset of the first character at or after `offset` that is not whitespace."""
        while True:
            offset = _TEXT_SPACE.match(self._buffer, self._pos + offset).end() - self._pos
            if self._pos + offset < len(self._buffer) or self._ended:
                return offset
            yield

    def _starts_with_at(self, offset: int, literal: str) -> Reading[bool]:
        """Whether `literal` follows at `offset`: known as soon as a character differs."""
        while True:
            start = self._pos + offset
            available = self._buffer[start : start + len(literal)]
            if available == literal:
                return True
            if self._ended or not literal.startswith(available):
                return False
            yield

    def _key_at(self, offset: int, limit: int = 64) -> Reading[str | None]:
        """The JSON string starting at `offset`, decoded, once it is complete; None when it is not a
        valid string or does not close within `limit` characters."""
        while True:
            start = self._pos + offset
            match = _JSON_KEY.match(self._buffer, start)
            if match is not None:
                try:
                    return json.loads(match.group())
                except ValueError:
                    return None
            if self._ended or len(self._buffer) - start > limit:
                return None
            yield

    # reading JSON

    def _read_value(self, on_piece: Callable[[str], None]) -> Reading[None]:
        """Consume one JSON value, handing its raw text to `on_piece` as it arrives (once per feed)."""
        scanner = JsonScanner()
        while True:
            buffer, start = self._buffer, self._pos
            end = scanner.scan(buffer, start)
            stop = len(buffer) if end < 0 else end
            if stop > start:
                on_piece(buffer[start:stop])
            self._pos = stop
            if end >= 0:
                return
            if self._ended:
                raise ToolSyntaxError("the output ended inside a JSON value of the tool syntax")
            yield

    def _read_json(self, what: str) -> Reading[Any]:
        """One whole JSON value, parsed."""
        pieces: list[str] = []
        yield from self._read_value(pieces.append)
        try:
            return json.loads("".join(pieces))
        except ValueError as error:
            raise ToolSyntaxError(f"{what} is not valid JSON: {error}") from None

    def _read_string(self, what: str) -> Reading[str]:
        found = yield from self._skip_space()
        if found != '"':
            raise ToolSyntaxError(f"expected a string for {what}, found {_describe(found)}")
        return (yield from self._read_json(what))

    def _read_call(self, index: int) -> Reading[None]:
        """One call object: keys in any order, `parameters` for `arguments`, other keys skipped.
        CallStarted as soon as the name is read, then the arguments as they arrive; arguments
        written before the name are held until it comes. A call without arguments gets `{}`."""
        yield from self._expect("{")
        name: str | None = None
        arguments: list[str] | None = None
        if (yield from self._skip_space()) == "}":
            raise ToolSyntaxError("a tool call without a name")
        while True:
            key = yield from self._read_string("a key of a tool call")
            yield from self._expect(":")
            start = yield from self._skip_space()
            if key == "name":
                if name is not None:
                    raise ToolSyntaxError("a tool call with two names")
                if start != '"':
                    raise ToolSyntaxError("a tool call whose name is not a string")
                name = yield from self._read_json("a tool call's name")
                if not name.strip():
                    raise ToolSyntaxError("a tool call without a name")
                self._events.append(CallStarted(index, name))
                if arguments is not None:
                    self._emit_arguments(index, "".join(arguments))
            elif key in ARGUMENT_KEYS:
                if arguments is not None:
                    raise ToolSyntaxError("a tool call with two sets of arguments")
                arguments = []
                yield from self._read_arguments(index, arguments, stream=name is not None)
            else:
                yield from self._read_json(f"{key!r} in a tool call")
            separator = yield from self._skip_space()
            self._pos += 1
            if separator == "}":
                break
            if separator != ",":
                raise ToolSyntaxError(f"expected ',' or '}}' in a tool call, found {_describe(separator)}")
        if name is None:
            raise ToolSyntaxError("a tool call without a name")
        if arguments is None:
            self._emit_arguments(index, "{}")

    def _read_arguments(self, index: int, pieces: list[str], *, stream: bool) -> Reading[None]:
        """A call's arguments: a JSON object, kept verbatim in `pieces` (and emitted when `stream`)."""
        if (yield from self._skip_space()) != "{":
            raise ToolSyntaxError("a tool call whose arguments are not a JSON object")

        def on_piece(piece: str) -> None:
            pieces.append(piece)
            if stream:
                self._emit_arguments(index, piece)

        yield from self._read_value(on_piece)
        try:
            json.loads("".join(pieces))
        except ValueError as error:
            raise ToolSyntaxError(f"a tool call's arguments are not valid JSON: {error}") from None

    def _read_call_array(self, index: int) -> Reading[int]:
        """`[call, call, ...]` (possibly empty), numbered from `index`: the index after the last."""
        yield from self._expect("[")
        if (yield from self._skip_space()) == "]":
            self._pos += 1
            return index
        while True:
            yield from self._read_call(index)
            index += 1
            separator = yield from self._skip_space()
            self._pos += 1
            if separator == "]":
                return index
            if separator != ",":
                raise ToolSyntaxError(f"expected ',' or ']' between tool calls, found {_describe(separator)}")

    # reading text

    def _read_text_until(self, tag: str, *, drop_leading_space: bool = False) -> Reading[bool]:
        """Emit text up to `tag` (consumed: True) or to the end of the output (False). A trailing
        part that may be the start of `tag`, and whitespace just before it, are held back; the
        whitespace right before the tag (and, with `drop_leading_space`, at the start) is not text."""
        while drop_leading_space:
            self._pos = _TEXT_SPACE.match(self._buffer, self._pos).end()
            if self._pos < len(self._buffer):
                break
            if self._ended:
                return False
            yield
        while True:
            buffer, start = self._buffer, self._pos
            found = buffer.find(tag, start)
            if found >= 0:
                self._emit_text(buffer[start:found].rstrip())
                self._pos = found + len(tag)
                return True
            if self._ended:
                self._emit_text(buffer[start:])
                self._pos = len(buffer)
                return False
            held = _partial_tag_start(buffer, start, tag)
            emitted = buffer[start:held].rstrip()
            self._emit_text(emitted)
            self._pos = start + len(emitted)
            yield

    def _read_rest_as_text(self) -> Reading[None]:
        while True:
            self._emit_text(self._buffer[self._pos :])
            self._pos = len(self._buffer)
            if self._ended:
                return
            yield


class GenericParser(JsonCallParser):
    """localq's own format: `{"tool_calls": [call, ...]}` or `{"response": "text"}`, keys in that
    order. The response's text is emitted decoded as it arrives; calls as `JsonCallParser` reads them."""

    def _read(self) -> Reading[None]:
        yield from self._expect("{")
        key = yield from self._read_string("the answer's key")
        yield from self._expect(":")
        if key == "response":
            yield from self._read_response()
        elif key == "tool_calls":
            yield from self._read_call_array(0)
        else:
            raise ToolSyntaxError(f'expected "tool_calls" or "response", found {key!r}')
        yield from self._expect("}")
        yield from self._expect_end()

    def _read_response(self) -> Reading[None]:
        if (yield from self._skip_space()) != '"':
            raise ToolSyntaxError("the response is not a JSON string")
        self._pos += 1
        decoder = JsonStringDecoder()
        while True:
            text, end = decoder.feed(self._buffer, self._pos)
            self._emit_text(text)
            if end >= 0:
                self._pos = end
                return
            self._pos = len(self._buffer)
            if self._ended:
                raise ToolSyntaxError("the output ended inside the response")
            yield


def _partial_tag_start(text: str, start: int, tag: str) -> int:
    """Where the longest end of `text[start:]` that begins `tag` starts (`len(text)` when none)."""
    position = text.find(tag[0], max(start, len(text) - len(tag) + 1))
    while position >= 0:
        if tag.startswith(text[position:]):
            return position
        position = text.find(tag[0], position + 1)
    return len(text)


def _describe(found: str) -> str:
    return repr(found) if found else "the end of the output"
