"""Hermes-style tool calls, as Hermes 2/3, Qwen 2.5 and Qwen 3 write them: free text, with each
call a JSON object inside `<tool_call>` ... `</tool_call>` tags, several possibly in a row.

Text outside the tags is content; a trailing piece that may be the start of `<tool_call>` is held
back until it is known not to be. Whitespace right around the tags (the newlines the chat template
puts there, and between consecutive calls) is not content. A closing tag missing at the very end
of the output, after a complete call, is forgiven: small models often stop right after the JSON.
"""

from __future__ import annotations

from workers.tools.events import ToolSyntaxError
from workers.tools.formats.generic import JsonCallParser, Reading

OPEN_TAG = "<tool_call>"
CLOSE_TAG = "</tool_call>"


class HermesParser(JsonCallParser):
    """`text <tool_call>{"name": ..., "arguments": {...}}</tool_call> ... text`."""

    def _read(self) -> Reading[None]:
        index = 0
        while (yield from self._read_text_until(OPEN_TAG, drop_leading_space=index > 0)):
            yield from self._read_call(index)
            index += 1
            yield from self._read_close_tag()

    def _read_close_tag(self) -> Reading[None]:
        if not (yield from self._skip_space()):
            return  # the output ended after the call's JSON
        if (yield from self._starts_with_at(0, CLOSE_TAG)):
            self._pos += len(CLOSE_TAG)
            return
        rest = self._buffer[self._pos :]
        if self._ended and CLOSE_TAG.startswith(rest):
            self._pos = len(self._buffer)  # the output ended inside the closing tag
            return
        raise ToolSyntaxError(f"expected {CLOSE_TAG} after a tool call, found {rest[:20]!r}")
