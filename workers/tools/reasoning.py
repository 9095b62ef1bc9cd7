"""A reasoning model's thinking, told apart from its answer while the output streams.

Models such as DeepSeek-R1 and Qwen3 write their thinking between markers (`<think>` and
`</think>`) before the answer. The text between them is `reasoning_content`, never `content`; a
marker cut across two pieces is held back until it is known to be one (or not). Some templates
open the thinking in the prompt itself (the generation prompt ends with `<think>`): the output
then starts inside it (`thinking=True`). Whitespace right after the end marker is not answer.
"""

from __future__ import annotations

THINKING, ANSWER = True, False


class ReasoningSplitter:
    def __init__(self, start: str, end: str, *, thinking: bool = False):
        self.start, self.end = start, end
        self._thinking = thinking
        self._held = ""
        self._after_end = False  # strip the whitespace that follows an end marker

    def feed(self, text: str) -> list[tuple[bool, str]]:
        """(is thinking, text) pieces the output so far makes certain, in order."""
        pieces: list[tuple[bool, str]] = []
        text = self._held + text
        self._held = ""
        while text:
            marker = self.end if self._thinking else self.start
            found = text.find(marker)
            if found >= 0:
                self._add(pieces, text[:found])
                text = text[found + len(marker):]
                self._thinking = not self._thinking
                self._after_end = not self._thinking
                continue
            keep = _partial_suffix(text, marker)
            self._add(pieces, text[: len(text) - keep])
            self._held = text[len(text) - keep:]
            break
        return pieces

    def close(self) -> list[tuple[bool, str]]:
        """The output ended: what was held back (a marker's beginning that never finished)."""
        pieces: list[tuple[bool, str]] = []
        self._add(pieces, self._held)
        self._held = ""
        return pieces

    def _add(self, pieces: list, text: str) -> None:
        if self._after_end and not self._thinking:
            stripped = text.lstrip()
            if stripped:
                self._after_end = False
            text = stripped
        if not text:
            return
        if pieces and pieces[-1][0] == self._thinking:
            pieces[-1] = (self._thinking, pieces[-1][1] + text)
        else:
            pieces.append((self._thinking, text))


def _partial_suffix(text: str, marker: str) -> int:
    """How many trailing characters of `text` could begin `marker`."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0
