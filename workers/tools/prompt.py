"""A conversation with tools, as messages any chat template can render.

For a model whose template knows nothing of tools (the constrained, "generic" way), the tools
are described in the system message along with the answer format the grammar will enforce, and
the conversation's earlier calls and tool results become text in that same format: an assistant
turn that called tools reads `{"tool_calls": [...]}`, a tool result is a user turn holding
`{"tool_response": {...}}`. Every message comes out as a plain `{"role", "content"}` with a
role every template accepts (system, user, assistant).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from workers.tools.request import AUTO, ToolRequest

FORMAT_RULES = (
    'To call tools, answer with only a JSON object: {"tool_calls": [{"name": "<tool name>", '
    '"arguments": {<the arguments>}}]}.'
)
TEXT_RULE = ' To answer without a tool, answer with only {"response": "<your answer>"}.'


def generic_messages(messages: list[Mapping], tools: ToolRequest | None) -> list[dict]:
    """`messages` (OpenAI's shapes) for a template without tool support; with `tools` active,
    the tools and the answer format are described in the (first) system message."""
    names = _call_names(messages)
    plain = [_plain(message, names, tools is not None and tools.active) for message in messages]
    if tools is None or not tools.active:
        return plain
    description = _describe(tools)
    if plain and plain[0]["role"] == "system":
        first = plain[0]
        return [{"role": "system", "content": f"{first['content']}\n\n{description}".lstrip()}, *plain[1:]]
    return [{"role": "system", "content": description}, *plain]


def _describe(tools: ToolRequest) -> str:
    listed = "\n".join(
        json.dumps({"name": f.name, "description": f.description, "parameters": f.parameters}, ensure_ascii=False)
        for f in tools.functions
    )
    rules = FORMAT_RULES + (TEXT_RULE if tools.mode == AUTO else "")
    if tools.mode != AUTO:
        rules += (f" You must call the tool {tools.functions[0].name}." if len(tools.functions) == 1
                  else " You must call at least one tool.")
    if not tools.parallel:
        rules += " Call one tool at a time."
    return f"You can call these tools:\n{listed}\n\n{rules}"


def _plain(message: Mapping, names: dict[str, str], tools_active: bool) -> dict:
    role = message.get("role")
    text = _text(message.get("content"))
    if role == "developer":
        role = "system"
    if role == "assistant":
        calls = _calls(message)
        if calls:
            return {"role": "assistant", "content": json.dumps({"tool_calls": calls}, ensure_ascii=False)}
        if tools_active:  # earlier answers in the format the model is asked to keep
            return {"role": "assistant", "content": json.dumps({"response": text}, ensure_ascii=False)}
        return {"role": "assistant", "content": text}
    if role in ("tool", "function"):
        call_id = message.get("tool_call_id")
        name = message.get("name") if role == "function" else names.get(call_id or "")
        response = {"tool_call_id": call_id, "name": name, "content": text}
        response = {key: value for key, value in response.items() if value is not None}
        return {"role": "user", "content": json.dumps({"tool_response": response}, ensure_ascii=False)}
    return {"role": role, "content": text}


def _calls(message: Mapping) -> list[dict]:
    """An assistant message's calls as the generic format writes them (arguments as JSON values)."""
    found = []
    for call in message.get("tool_calls") or ():
        function = (call.get("function") or {}) if isinstance(call, Mapping) else {}
        found.append({"name": function.get("name"), "arguments": _arguments(function.get("arguments"))})
    legacy = message.get("function_call")
    if isinstance(legacy, Mapping):
        found.append({"name": legacy.get("name"), "arguments": _arguments(legacy.get("arguments"))})
    return found


def _arguments(raw) -> object:
    """A call's arguments string as the JSON value it holds (kept as a string if it is not JSON)."""
    if not isinstance(raw, str):
        return raw if raw is not None else {}
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _call_names(messages: list[Mapping]) -> dict[str, str]:
    """Tool call id -> function name, from the assistant turns (a tool message names only its call)."""
    names = {}
    for message in messages:
        for call in message.get("tool_calls") or ():
            if isinstance(call, Mapping) and call.get("id"):
                names[call["id"]] = (call.get("function") or {}).get("name")
    return names


def _text(content) -> str:
    if isinstance(content, list):
        return "\n".join(part.get("text") or part.get("refusal") or "" for part in content if isinstance(part, Mapping))
    return content or ""
