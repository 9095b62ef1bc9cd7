"""One chat answer that needs reading as it streams (tools a model may call, a reasoning model's
thinking): its output as OpenAI stream deltas, then the message.

The output first goes through the reasoning splitter, when the model has one: thinking becomes
`reasoning_content` (DeepSeek's and vLLM's field name, which OpenAI clients built for reasoning
models read). What is left goes through the tool parser when tools are active, else it is
`content` as it is. Tool deltas follow OpenAI's stream: a call opens with its `index`, `id`, `type` and `function.name`
(arguments ""), then `function.arguments` pieces keyed by the same index; the legacy
`functions` vocabulary streams `function_call` instead. The role goes with the first delta.
At the end every call's arguments must be a JSON object that validates against its function's
parameters, or the answer fails (`ToolCallError`): a call the client cannot use is never handed
over as one.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import jsonschema

from workers.tools.events import Arguments, CallStarted, Event, Text, ToolCallParser, ToolSyntaxError
from workers.tools.reasoning import ReasoningSplitter
from workers.tools.request import ToolRequest


class ToolCallError(ValueError):
    """The model's calls cannot be handed over (unfinished, not JSON, or not what the schema allows)."""


class ChatAnswer:
    """`tools` and `parser` (both or neither): calls the model may make; `reasoning`: its thinking."""

    def __init__(self, tools: ToolRequest | None, parser: ToolCallParser | None, call_id: Callable[[int], str],
                 reasoning: ReasoningSplitter | None = None):
        self.tools = tools
        self._parser = parser
        self._reasoning = reasoning
        self._call_id = call_id
        self._functions = {function.name: function for function in tools.functions} if tools else {}
        self._text: list[str] = []
        self._thinking: list[str] = []
        self.calls: list[dict] = []  # {"id", "name", "arguments"} in the order they were written
        self._opened = False

    @property
    def text(self) -> str:
        return "".join(self._text)

    @property
    def reasoning(self) -> str:
        return "".join(self._thinking)

    def feed(self, text: str) -> list[dict]:
        """The stream deltas (`choices[].delta`) `text`, the next piece of output, makes certain."""
        if self._reasoning is None:
            return self._answer(text)
        deltas = []
        for thinking, piece in self._reasoning.feed(text):
            deltas += self._think(piece) if thinking else self._answer(piece)
        return deltas

    def close(self, finish_reason: str) -> list[dict]:
        """The deltas still held back once the output ended. An unfinished answer is kept as far as
        it is whole when generation stopped at its token limit; otherwise it is a ToolCallError."""
        deltas = []
        for thinking, piece in self._reasoning.close() if self._reasoning else ():
            deltas += self._think(piece) if thinking else self._answer(piece)
        if self._parser is None:
            return deltas
        try:
            return deltas + self._deltas(self._parser.close())
        except ToolSyntaxError as err:
            if finish_reason == "length":
                self.calls = [call for call in self.calls if _whole(call["arguments"])]
                return deltas
            raise ToolCallError(f"The model's answer broke the tool call syntax: {err}") from None

    def finish_reason(self, generation_finish: str) -> str:
        if self.calls and generation_finish != "length":
            return "function_call" if self.tools.legacy else "tool_calls"
        return generation_finish

    def _answer(self, text: str) -> list[dict]:
        events = self._parser.feed(text) if self._parser is not None else [Text(text)]
        return self._deltas(events)

    def _think(self, text: str) -> list[dict]:
        self._thinking.append(text)
        return self._opening([{"reasoning_content": text}])

    def check(self) -> None:
        """Every call names a tool and its arguments validate against that tool's parameters."""
        for call in self.calls:
            function = self._functions.get(call["name"])
            if function is None:
                raise ToolCallError(f"The model called {call['name']!r}, which is not among the tools.")
            try:
                arguments = json.loads(call["arguments"])
            except ValueError:
                raise ToolCallError(f"The model's arguments for {call['name']!r} are not JSON.") from None
            if not isinstance(arguments, dict):
                raise ToolCallError(f"The model's arguments for {call['name']!r} are not a JSON object.")
            error = jsonschema.exceptions.best_match(_validator(function.parameters).iter_errors(arguments))
            if error is not None:
                where = "/".join(str(part) for part in error.absolute_path) or "(the arguments)"
                raise ToolCallError(
                    f"The model's arguments for {call['name']!r} do not match its parameters at {where}: "
                    f"{error.message}")

    def message(self) -> dict:
        """The answer's `message` (after `close` and `check`)."""
        text = self.text
        message: dict = {"role": "assistant", "content": text if text or not self.calls else None,
                         "refusal": None, "annotations": []}
        if self._thinking:
            message["reasoning_content"] = self.reasoning
        if self.calls and self.tools.legacy:
            first = self.calls[0]
            message["function_call"] = {"name": first["name"], "arguments": first["arguments"]}
        elif self.calls:
            message["tool_calls"] = [
                {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}
                for call in self.calls
            ]
        return message

    def _deltas(self, events: list[Event]) -> list[dict]:
        return self._opening([delta for delta in map(self._delta, events) if delta is not None])

    def _opening(self, deltas: list[dict]) -> list[dict]:
        """The role goes with the first delta (content null when that delta carries none)."""
        if deltas and not self._opened:
            self._opened = True
            first = deltas[0]
            deltas[0] = {"role": "assistant", **({"content": None} if "content" not in first else {}), **first}
        return deltas

    def _delta(self, event: Event) -> dict | None:
        if isinstance(event, Text):
            if not event.text:
                return None
            self._text.append(event.text)
            return {"content": event.text}
        if isinstance(event, CallStarted):
            if self.tools.legacy and self.calls:
                return None  # the legacy answer carries one call: later ones are dropped
            call = {"id": self._call_id(event.index), "name": event.name, "arguments": "", "index": event.index}
            self.calls.append(call)
            if self.tools.legacy:
                return {"function_call": {"name": event.name, "arguments": ""}}
            return {"tool_calls": [{"index": len(self.calls) - 1, "id": call["id"], "type": "function",
                                    "function": {"name": event.name, "arguments": ""}}]}
        if isinstance(event, Arguments):
            position = next((i for i, call in enumerate(self.calls) if call["index"] == event.index), None)
            if position is None or not event.text:
                return None
            self.calls[position]["arguments"] += event.text
            if self.tools.legacy:
                return {"function_call": {"arguments": event.text}}
            return {"tool_calls": [{"index": position, "function": {"arguments": event.text}}]}
        return None


def _whole(arguments: str) -> bool:
    try:
        return isinstance(json.loads(arguments), dict)
    except ValueError:
        return False


def _validator(schema: dict):
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema)
