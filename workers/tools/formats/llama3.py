"""Llama 3.1 / 3.2 / 3.3 JSON tool calls: the whole output, optionally after `<|python_tag|>`, is
`{"name": ..., "parameters": {...}}` (`arguments` accepted too), several calls separated by `;`.

An output that does not start (after whitespace and the optional tag) with `{` is plain text,
written out as it is; after `<|python_tag|>` such text is Llama's built-in code / search call,
which has no OpenAI function form, so it too is content (without the tag).
"""

from __future__ import annotations

from workers.tools.events import ToolSyntaxError
from workers.tools.formats.generic import JsonCallParser, Reading

PYTHON_TAG = "<|python_tag|>"


class Llama3Parser(JsonCallParser):
    """`[<|python_tag|>]{"name": ..., "parameters": {...}}[; {...}]...`, or plain text."""

    def _read(self) -> Reading[None]:
        start = yield from self._space_end_at(0)
        if (yield from self._starts_with_at(start, PYTHON_TAG)):
            self._pos += start + len(PYTHON_TAG)
            start = yield from self._space_end_at(0)
        if (yield from self._char_at(start)) != "{":
            yield from self._read_rest_as_text()
            return
        self._pos += start
        index = 0
        while True:
            yield from self._read_call(index)
            index += 1
            separator = yield from self._skip_space()
            if not separator:
                return
            if separator != ";":
                raise ToolSyntaxError(f"expected ';' between tool calls, found {separator!r}")
            self._pos += 1
            if not (yield from self._skip_space()):
                return  # a trailing ';'
