"""A Responses API request as the chat job that answers it, and the Response object it starts as.

`input_items` turns the request's `input` (a string, or a list of items) into the item resources
OpenAI lists under `GET /v1/responses/{id}/input_items`, each with an id. `chat_request` renders
the instructions, the stored conversation before it (`previous_response_id`: each earlier
response's input items then its output items) and these items as chat messages, and maps the
other parameters onto the chat completion request localq's chat engine already serves (tools,
`tool_choice`, `text.format` as `response_format`, `max_output_tokens`, sampling).

What the chat engine cannot do is refused with a 400 naming the parameter: built-in tools
(`web_search`, `file_search`, ...), item types other than messages and function calls, and
content other than text and images.
"""

from __future__ import annotations

import copy
import re
import secrets
from typing import Any

from schemas import openai_errors as errors

INPUT_TEXT, OUTPUT_TEXT, INPUT_IMAGE = "input_text", "output_text", "input_image"
EXTENSIONS = "x-localai-extensions"


def new_response_id() -> str:
    return "resp_" + secrets.token_hex(24)


def _item_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(24)}"


def input_items(body: dict) -> list[dict]:
    """The request's `input` as item resources (each with an id and a status)."""
    given = body.get("input")
    if given is None:
        return []
    if isinstance(given, str):
        return [_message("user", [{"type": INPUT_TEXT, "text": given}])]
    return [_item(item, f"input[{index}]") for index, item in enumerate(given)]


def _message(role: str, content: list[dict], item_id: str | None = None) -> dict:
    if role == "assistant":
        parts = [{"type": OUTPUT_TEXT, "text": part.get("text", ""), "annotations": [], "logprobs": []}
                 for part in content]
        return {"id": item_id or _item_id("msg"), "type": "message", "role": "assistant", "content": parts,
                "status": "completed"}
    return {"id": item_id or _item_id("msg"), "type": "message", "role": role, "content": content,
            "status": "completed"}


def _item(item: dict, param: str) -> dict:
    kind = item.get("type", "message")
    if kind == "message":
        content = item.get("content")
        if isinstance(content, str):
            parts = [{"type": INPUT_TEXT, "text": content}]
        else:
            parts = [_content_part(part, f"{param}.content[{index}]") for index, part in enumerate(content or [])]
        return _message(item["role"], parts, item.get("id"))
    if kind == "function_call":
        return {"id": item.get("id") or _item_id("fc"), "type": "function_call", "call_id": item["call_id"],
                "name": item["name"], "arguments": item["arguments"], "status": "completed"}
    if kind == "function_call_output":
        output = item.get("output")
        if not isinstance(output, str):
            output = "".join(part.get("text", "") for part in output or [] if isinstance(part, dict))
        return {"id": item.get("id") or _item_id("fco"), "type": "function_call_output",
                "call_id": item.get("call_id") or "", "output": output, "status": "completed"}
    if kind == "reasoning":
        return {**copy.deepcopy(item), "id": item.get("id") or _item_id("rs")}
    raise errors.unsupported_parameter(f"{param}.type", f"Input items of type '{kind}' are not supported by "
                                                        "localq; send messages, function calls and their outputs.")


def _content_part(part: dict, param: str) -> dict:
    kind = part.get("type")
    if kind in (INPUT_TEXT, OUTPUT_TEXT):
        return {"type": kind, "text": part.get("text", "")}
    if kind == INPUT_IMAGE:
        return {key: value for key, value in part.items() if key in ("type", "image_url", "detail", "file_id")}
    raise errors.unsupported_parameter(f"{param}.type", f"Content of type '{kind}' is not supported by localq; "
                                                        "send text (input_text) or images (input_image).")


def chat_messages(items: list[dict], sources: list[int] | None = None) -> list[dict]:
    """Item resources (input or output) as chat messages: consecutive function calls become one
    assistant message with `tool_calls`, their outputs `tool` messages; reasoning is left out.
    `sources`, when given, gets the index of the item each message starts with."""
    messages: list[dict] = []
    for index, item in enumerate(items):
        kind = item.get("type")
        before = len(messages)
        if kind == "message":
            messages.append(_chat_message(item))
        elif kind == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = messages[-1] if messages else None
            if last and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
        if sources is not None and len(messages) > before:
            sources.append(index)
    return messages


def input_param(param: str | None, body: dict, history: list[dict]) -> str | None:
    """A chat request's parameter path (`messages[3].content[1]`) as the Responses request that
    made it names it (`input[2].content[1]`, `instructions`, `previous_response_id`)."""
    match = re.match(r"messages\[(\d+)\](.*)", param or "")
    if not match:
        return {"max_completion_tokens": "max_output_tokens", "response_format": "text.format"}.get(param, param)
    position, rest = int(match.group(1)), match.group(2)
    if body.get("instructions"):
        if position == 0:
            return "instructions"
        position -= 1
    earlier = len(chat_messages(history))
    if position < earlier:
        return "previous_response_id"
    sources: list[int] = []
    chat_messages(input_items(body) if body.get("input") is not None else [], sources)
    position -= earlier
    if isinstance(body.get("input"), str) or position >= len(sources):
        return "input"
    return f"input[{sources[position]}]{rest}"


def _chat_message(item: dict) -> dict:
    parts = item.get("content") or []
    if any(part.get("type") == INPUT_IMAGE for part in parts):
        content: Any = [{"type": "text", "text": part["text"]} if part.get("type") != INPUT_IMAGE else
                        {"type": "image_url", "image_url": {"url": part.get("image_url") or "",
                                                            "detail": part.get("detail") or "auto"}}
                        for part in parts]
    else:
        content = "".join(part.get("text", "") for part in parts)
    return {"role": item["role"], "content": content}


def chat_request(body: dict, items: list[dict], history: list[dict]) -> dict:
    """The chat completion request that answers the Responses request `body`."""
    messages = []
    if body.get("instructions"):
        messages.append({"role": "system", "content": _instructions(body["instructions"])})
    messages += chat_messages(history) + chat_messages(items)
    _refuse_unhonoured(body)
    chat: dict[str, Any] = {"model": body["model"], "messages": messages}
    if body.get(EXTENSIONS):
        chat[EXTENSIONS] = copy.deepcopy(body[EXTENSIONS])  # localq's knobs (priority, timeout, ignore_eos, ...)
    for name in ("temperature", "top_p", "user", "parallel_tool_calls"):
        if body.get(name) is not None:
            chat[name] = body[name]
    if body.get("max_tool_calls") == 1:
        chat["parallel_tool_calls"] = False
    if body.get("max_output_tokens") is not None:
        chat["max_completion_tokens"] = body["max_output_tokens"]
    if (body.get("reasoning") or {}).get("effort"):
        chat["reasoning_effort"] = body["reasoning"]["effort"]
    tools = [_chat_tool(tool, f"tools[{index}]") for index, tool in enumerate(body.get("tools") or [])]
    if tools:
        chat["tools"] = tools
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
    response_format = _response_format(((body.get("text") or {}).get("format")))
    if response_format:
        chat["response_format"] = response_format
    return chat


def _refuse_unhonoured(body: dict) -> None:
    """What localq would otherwise drop without a word: a 400 naming it."""
    if body.get("include"):
        raise errors.unsupported_parameter("include", "'include' is not supported by localq yet: the output "
                                                      "carries no logprobs, encrypted reasoning or tool sources.")
    if body.get("top_logprobs"):
        raise errors.unsupported_parameter("top_logprobs", "top_logprobs is not supported by localq's Responses "
                                                           "API yet; chat completions have logprobs.")
    if body.get("max_tool_calls") not in (None, 1):
        raise errors.unsupported_parameter("max_tool_calls", "localq can limit a response to one tool call "
                                                             "(max_tool_calls: 1), not to more.")


def _instructions(instructions: Any) -> str:
    if isinstance(instructions, str):
        return instructions
    return "\n".join(message["content"] for message in chat_messages(input_items({"input": instructions}))
                     if isinstance(message.get("content"), str))


def _chat_tool(tool: dict, param: str) -> dict:
    if tool.get("type") != "function":
        raise errors.unsupported_parameter(f"{param}.type", f"The tool type '{tool.get('type')}' is not supported by "
                                                            "localq; only function tools are.")
    function = {"name": tool["name"]}
    for name in ("description", "parameters"):
        if tool.get(name) is not None:
            function[name] = tool[name]
    function["strict"] = tool.get("strict", True) is not False  # Responses tools are strict unless told not
    return {"type": "function", "function": function}


def _tool_choice(choice: Any) -> Any:
    if isinstance(choice, str):
        return choice
    if choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice["name"]}}
    raise errors.unsupported_parameter("tool_choice", f"tool_choice of type '{choice.get('type')}' is not "
                                                      "supported by localq; use none, auto, required or a function.")


def _response_format(fmt: dict | None) -> dict | None:
    if not fmt or fmt.get("type") == "text":
        return None
    if fmt["type"] == "json_object":
        return {"type": "json_object"}
    schema = {key: fmt[key] for key in ("name", "description", "schema", "strict") if fmt.get(key) is not None}
    return {"type": "json_schema", "json_schema": schema}


def initial_response(body: dict, response_id: str, created_at: int) -> dict:
    """The Response object as it starts: every request parameter echoed, no output yet."""
    response = {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": "queued" if body.get("background") else "in_progress",
        "background": bool(body.get("background")),
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": body["model"],
        "output": [],
        "parallel_tool_calls": body.get("parallel_tool_calls", True) is not False,
        "previous_response_id": body.get("previous_response_id"),
        "temperature": body.get("temperature", 1.0),
        "text": body.get("text") or {"format": {"type": "text"}},
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": [_echoed_tool(tool) for tool in body.get("tools") or []],
        "top_p": body.get("top_p", 1.0),
        "truncation": body.get("truncation") or "disabled",
        "metadata": body.get("metadata") or {},
    }
    for name in ("user", "reasoning", "top_logprobs", "max_tool_calls", "safety_identifier", "prompt_cache_key"):
        if body.get(name) is not None:
            response[name] = body[name]
    return response


def _echoed_tool(tool: dict) -> dict:
    return {"type": "function", "name": tool["name"], "description": tool.get("description"),
            "parameters": tool.get("parameters"), "strict": tool.get("strict", True) is not False}
