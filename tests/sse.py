"""The one Server-Sent Events reader of the tests, so no test splits a stream by hand.

Follows the WHATWG parsing rules that matter here: events end at a blank line, `:` lines are
comments (the keep-alives), one space after the field's colon is dropped, data lines join with
a newline. Reads a whole body (`parse`) or lines as they arrive (`events`, e.g. from httpx's
`response.iter_lines()`), so a test can stop or act mid-stream.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

__all__ = ["Event", "blocks", "events", "parse"]


@dataclass(frozen=True)
class Event:
    data: str
    event: str | None = None  # the `event:` field; None for unnamed (OpenAI chunk) events
    id: str | None = None

    @property
    def done(self) -> bool:
        """The `data: [DONE]` that ends an OpenAI-style stream."""
        return self.data == "[DONE]"


def events(lines: Iterable[str]) -> Iterator[Event]:
    """Each event as soon as its closing blank line arrives; comment-only blocks yield nothing."""
    fields: dict[str, str] = {}
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:  # no data, no event (the spec's rule)
                yield Event("\n".join(data), fields.get("event"), fields.get("id"))
            fields, data = {}, []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            data.append(value)
        else:
            fields[name] = value


def parse(text: str) -> list[Event]:
    """Every event of a complete body."""
    return list(events(text.split("\n") + [""]))


def blocks(text: str, comments: bool = False) -> list[str]:
    """The raw text of each event, for tests of the exact wire format; comment lines (keep-alives,
    which may sit at the head of an event's block) are left out unless asked for."""
    found = []
    for block in text.split("\n\n"):
        if not comments:
            block = "\n".join(line for line in block.split("\n") if not line.startswith(":"))
        if block:
            found.append(block)
    return found
