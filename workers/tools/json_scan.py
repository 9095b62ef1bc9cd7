"""Incremental JSON scanning for the tool-call parsers: where a JSON value that arrives piece by
piece ends, and the decoded text of a JSON string as it arrives.

The parsers run on every generated token, so neither class builds a document: `JsonScanner` only
tracks whether it is inside a string (an escape may be split across two pieces) and how deep it is
in objects and arrays; a value is validated once, with `json.loads`, when it is complete. Runs of
ordinary characters are skipped with one regex search each.
"""

from __future__ import annotations

import re

from workers.tools.events import ToolSyntaxError

_STRING_STOP = re.compile(r'["\\]')  # the characters that matter inside a string
_CONTAINER_STOP = re.compile(r'[{}\[\]"]')  # ... and outside one, in an object or array
_SCALAR_STOP = re.compile(r"[\s,\]}]")  # what ends a number, true, false or null

_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
_REPLACEMENT = "\ufffd"  # stands for a lone surrogate, which no UTF-8 text can carry


class JsonScanner:
    """Finds where one JSON value ends in text fed piece by piece; the first character scanned must
    be the value's first. Objects and arrays end at their matching bracket, strings at their
    closing quote, other values (numbers, true, false, null) before the delimiter that follows them.
    Brackets are counted, not matched: `json.loads` on the complete value tells whether it is valid."""

    __slots__ = ("_kind", "_depth", "_in_string", "_escaped", "done")

    def __init__(self) -> None:
        self._kind = ""  # "{" an object or array, '"' a string, "s" another value; "" before the first character
        self._depth = 0
        self._in_string = False
        self._escaped = False  # the previous character was a backslash inside a string
        self.done = False

    def scan(self, text: str, start: int = 0) -> int:
        """Consume `text[start:]`: the index just past the value's end when it ends there, else -1
        (the whole piece belongs to the value). A delimiter ending a number or literal is not consumed."""
        position = start
        end = len(text)
        if not self._kind:
            if position >= end:
                return -1
            first = text[position]
            if first in "{[":
                self._kind, self._depth = "{", 1
            elif first == '"':
                self._kind, self._in_string = '"', True
            else:
                self._kind = "s"
            position += 1
        if self._kind == "s":
            match = _SCALAR_STOP.search(text, position)
            if match is None:
                return -1
            self.done = True
            return match.start()
        while position < end:
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                    position += 1  # the escaped character (for \uXXXX the digits are ordinary ones)
                    continue
                match = _STRING_STOP.search(text, position)
                if match is None:
                    return -1
                position = match.end()
                if text[position - 1] == "\\":
                    self._escaped = True
                    continue
                self._in_string = False
                if self._kind == '"':
                    self.done = True
                    return position
                continue
            match = _CONTAINER_STOP.search(text, position)
            if match is None:
                return -1
            position = match.end()
            char = text[position - 1]
            if char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            else:
                self._depth -= 1
                if self._depth == 0:
                    self.done = True
                    return position
        return -1


class JsonStringDecoder:
    """Decodes a JSON string's content, fed piece by piece from just after its opening quote. Returns
    only whole characters: an escape split across pieces (`\\`, `\\u00`) and the high half of a
    surrogate pair are kept until their end arrives. A lone surrogate becomes U+FFFD; a raw control
    character is passed through as it is (lenient, as `json.loads(strict=False)`)."""

    __slots__ = ("_pending", "_high_surrogate", "done")

    def __init__(self) -> None:
        self._pending = ""  # the start of an escape whose end has not arrived
        self._high_surrogate = 0  # a \uD800-\uDBFF waiting for its low half, 0 when none
        self.done = False

    def feed(self, text: str, start: int = 0) -> tuple[str, int]:
        """Decode `text[start:]`: the text decodable now, and the index just past the closing quote
        (-1 while the string goes on). Raises ToolSyntaxError on an invalid escape."""
        offset = 0  # index in the text decoded here minus index in `text`
        if self._pending:
            offset = len(self._pending) - start
            text, start, self._pending = self._pending + text[start:], 0, ""
        decoded: list[str] = []
        position = start
        end = len(text)
        while True:
            match = _STRING_STOP.search(text, position)
            stop = match.start() if match else end
            if stop > position:
                self._flush_surrogate(decoded)
                decoded.append(text[position:stop])
            if match is None:
                return "".join(decoded), -1
            if text[stop] == '"':
                self._flush_surrogate(decoded)
                self.done = True
                return "".join(decoded), stop + 1 - offset
            position = self._escape(text, stop, decoded)
            if position < 0:
                self._pending = text[stop:]
                return "".join(decoded), -1

    def _escape(self, text: str, start: int, decoded: list[str]) -> int:
        """Decode the escape at `text[start]` (a backslash) into `decoded`: the index after it, or
        -1 when its end has not arrived yet."""
        if start + 1 >= len(text):
            return -1
        kind = text[start + 1]
        if kind != "u":
            if kind not in _ESCAPES:
                raise ToolSyntaxError(f"invalid escape \\{kind} in a JSON string")
            self._flush_surrogate(decoded)
            decoded.append(_ESCAPES[kind])
            return start + 2
        digits = text[start + 2 : start + 6]
        if not _HEX_DIGITS.issuperset(digits):
            raise ToolSyntaxError(f"invalid escape \\u{digits} in a JSON string")
        if len(digits) < 4:
            return -1
        code = int(digits, 16)
        if 0xD800 <= code < 0xDC00:
            self._flush_surrogate(decoded)
            self._high_surrogate = code
        elif 0xDC00 <= code < 0xE000:
            if self._high_surrogate:
                decoded.append(chr(0x10000 + ((self._high_surrogate - 0xD800) << 10) + (code - 0xDC00)))
                self._high_surrogate = 0
            else:
                decoded.append(_REPLACEMENT)
        else:
            self._flush_surrogate(decoded)
            decoded.append(chr(code))
        return start + 6

    def _flush_surrogate(self, decoded: list[str]) -> None:
        """A high surrogate not followed by its low half: a lone one."""
        if self._high_surrogate:
            decoded.append(_REPLACEMENT)
            self._high_surrogate = 0
