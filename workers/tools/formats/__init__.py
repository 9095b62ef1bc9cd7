"""The tool-call output formats localq can read, by name, and a guess of a model's native one.

`generic` is localq's own, forced with a grammar; the others are what models write when their
chat template describes tools its own way. `detect_format` looks only for each format's marker in
the GGUF chat template's Jinja source, most specific first:

- `[TOOL_CALLS]` -> "mistral";
- `<tool_call>` -> "hermes" (Hermes, Qwen 2.5, Qwen 3);
- `<|python_tag|>`, or `<|start_header_id|>` with Llama 3.x's `"parameters"` JSON convention -> "llama3";
- any other mention of `tools` -> "json" (the template describes tools, the model writes plain JSON);
- none of these -> None (the template has no tool support).
"""

from __future__ import annotations

import re

from workers.tools.events import ToolCallParser
from workers.tools.formats.generic import GenericParser
from workers.tools.formats.hermes import HermesParser
from workers.tools.formats.json import PlainJsonParser
from workers.tools.formats.llama3 import Llama3Parser
from workers.tools.formats.mistral import MistralParser

PARSERS: dict[str, type[ToolCallParser]] = {
    "generic": GenericParser,
    "hermes": HermesParser,
    "llama3": Llama3Parser,
    "mistral": MistralParser,
    "json": PlainJsonParser,
}

_MENTIONS_TOOLS = re.compile(r"\btools\b")


def detect_format(chat_template: str) -> str | None:
    """The native tool-call format a chat template asks its model for, or None without tool support."""
    if "[TOOL_CALLS]" in chat_template:
        return "mistral"
    if "<tool_call>" in chat_template:
        return "hermes"
    if "<|python_tag|>" in chat_template or (
        "<|start_header_id|>" in chat_template and '"parameters"' in chat_template
    ):
        return "llama3"
    if _MENTIONS_TOOLS.search(chat_template):
        return "json"
    return None
