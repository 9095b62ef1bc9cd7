"""Mistral tool calls: `[TOOL_CALLS]` and then either a JSON array of call objects (`[{"name": ...,
"arguments": {...}, "id": ...}]`, older templates) or `NAME[ARGS]{...}` (newer ones, one
`[TOOL_CALLS]` per call; a `[CALL_ID]id` after the name is skipped).

Text before the first `[TOOL_CALLS]` is content; a trailing piece that may be the start of the
marker is held back, and whitespace right before it is not content. Only more calls may follow.
"""

from __future__ import annotations

import re

from workers.tools.events import CallStarted, ToolSyntaxError
from workers.tools.formats.generic import JsonCallParser, Reading

TOOL_CALLS = "[TOOL_CALLS]"
ARGS = "[ARGS]"
CALL_ID = "[CALL_ID]"
_NAME = re.compile(r"[^\s\[\]{}\"',]+")
_NAME_LIMIT = 256  # characters of name (and call id) to wait through for `[ARGS]`


class MistralParser(JsonCallParser):
    """`text[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` or `text[TOOL_CALLS]NAME[ARGS]{...}...`."""

    def _read(self) -> Reading[None]:
        index = 0
        if not (yield from self._read_text_until(TOOL_CALLS)):
            return
        while True:
            if (yield from self._skip_space()) == "[":
                index = yield from self._read_call_array(index)
            else:
                yield from self._read_named_call(index)
                index += 1
            following = yield from self._skip_space()
            if not following:
                return
            if not (yield from self._starts_with_at(0, TOOL_CALLS)):
                raise ToolSyntaxError(f"unexpected {self._buffer[self._pos:][:20]!r} after tool calls")
            self._pos += len(TOOL_CALLS)

    def _read_named_call(self, index: int) -> Reading[None]:
        """`NAME[ARGS]{...}`, or `NAME[CALL_ID]id[ARGS]{...}`."""
        while True:
            found = self._buffer.find(ARGS, self._pos)
            if found >= 0:
                break
            if self._ended or len(self._buffer) - self._pos > _NAME_LIMIT:
                raise ToolSyntaxError(f"a tool call without {ARGS} after its name")
            yield
        name = self._buffer[self._pos : found].split(CALL_ID, 1)[0].strip()
        if not _NAME.fullmatch(name):
            raise ToolSyntaxError(f"a tool call whose name {name!r} is not a function name")
        self._pos = found + len(ARGS)
        self._events.append(CallStarted(index, name))
        yield from self._read_arguments(index, [], stream=True)
