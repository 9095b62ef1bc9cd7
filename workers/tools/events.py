"""What a tool-call parser reports while a model's output streams in.

A parser (`workers.tools.formats`) is fed the answer's text piece by piece, as the engine
produces it, and reports at once what it can tell: plain text for `content`, the start of a call
(its name), and pieces of a call's arguments. Concatenated, a call's `Arguments` pieces are its
arguments exactly as the model wrote them (a JSON text), so a stream's fragments always add up
to the non-streamed `function.arguments`. Text that may still turn out to be tool syntax is held
back until it is known not to be: tool syntax never reaches `content`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass


@dataclass(frozen=True)
class Text:
    """Answer text (for `content`)."""

    text: str


@dataclass(frozen=True)
class CallStarted:
    """Call number `index` (0, 1, ... in the order the model wrote them) calls function `name`."""

    index: int
    name: str


@dataclass(frozen=True)
class Arguments:
    """The next piece of call `index`'s arguments (JSON text, as written by the model)."""

    index: int
    text: str


Event = Text | CallStarted | Arguments


class ToolSyntaxError(ValueError):
    """The output broke the format's tool-call syntax (a call left open, arguments that are not a
    JSON object, a call without a name)."""


class ToolCallParser(ABC):
    """Incremental: `feed` each new piece of output text, then `close` once at its end."""

    @abstractmethod
    def feed(self, text: str) -> list[Event]:
        """Events the output so far makes certain; text that might still be tool syntax is held back."""

    @abstractmethod
    def close(self) -> list[Event]:
        """The output ended: what was held back, as text or calls; raises ToolSyntaxError when a
        call was left unfinished or is malformed."""
