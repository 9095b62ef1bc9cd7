"""Plain JSON tool calls, for models whose template asks for JSON without a marker of its own: an
output that starts (after whitespace, optionally inside a ```json fence) with a call object
`{"name": ..., "arguments"|"parameters": {...}}`, or an array of them, is calls; anything else,
including JSON that is not a call, is plain text.

Deciding needs the first key: the output is held back until `{ "key"` (or `[ { "key"`) has
arrived, so an answer that merely is JSON (`{"answer": 42}`) stays content.
"""

from __future__ import annotations

from workers.tools.formats.generic import CALL_KEYS, JsonCallParser, Reading

FENCE = "```"
_FENCE_LANGUAGES = ("", "json")
_FENCE_INFO_LIMIT = 16  # characters after ``` to wait through for the end of its line


class PlainJsonParser(JsonCallParser):
    """`{"name": ..., "arguments": {...}}`, several such objects, or `[{...}, ...]`, optionally fenced."""

    def _read(self) -> Reading[None]:
        start = yield from self._space_end_at(0)
        fenced = yield from self._starts_with_at(start, FENCE)
        if fenced:
            start = yield from self._fence_body_at(start + len(FENCE))
        if start < 0 or not (yield from self._calls_at(start)):
            yield from self._read_rest_as_text()
            return
        self._pos += start
        if (yield from self._skip_space()) == "[":
            yield from self._read_call_array(0)
        else:
            index = 0
            while (yield from self._skip_space()) == "{":
                yield from self._read_call(index)
                index += 1
        if fenced and (yield from self._skip_space()) and (yield from self._starts_with_at(0, FENCE)):
            self._pos += len(FENCE)
        yield from self._expect_end()

    def _fence_body_at(self, offset: int) -> Reading[int]:
        """After an opening fence: the offset of its content, or -1 when it is not a JSON fence."""
        while True:
            line_end = self._buffer.find("\n", self._pos + offset, self._pos + offset + _FENCE_INFO_LIMIT)
            if line_end >= 0:
                break
            if self._ended or len(self._buffer) - self._pos - offset >= _FENCE_INFO_LIMIT:
                return -1
            yield
        if self._buffer[self._pos + offset : line_end].strip().lower() not in _FENCE_LANGUAGES:
            return -1
        return (yield from self._space_end_at(line_end + 1 - self._pos))

    def _calls_at(self, offset: int) -> Reading[bool]:
        """Whether a call object, or an array starting with one, begins at `offset`."""
        if (yield from self._char_at(offset)) == "[":
            offset = yield from self._space_end_at(offset + 1)
        if (yield from self._char_at(offset)) != "{":
            return False
        offset = yield from self._space_end_at(offset + 1)
        if (yield from self._char_at(offset)) != '"':
            return False
        return (yield from self._key_at(offset)) in CALL_KEYS
