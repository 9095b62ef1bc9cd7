"""What a chat request asks of tools, in one shape for both of OpenAI's vocabularies.

`tools` / `tool_choice` / `parallel_tool_calls` and the legacy `functions` / `function_call`
become one `ToolRequest`: the functions the model may call, whether it may answer in text, must
call, or must call one named function, and whether several calls may come at once. Anything a
request cannot mean (a named choice that is not among the tools, custom tools) is a `Problem`
naming the field, checked before the job is queued (`workers.capabilities`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

NONE, AUTO, REQUIRED = "none", "auto", "required"
EMPTY_PARAMETERS: dict = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class Function:
    name: str
    description: str
    parameters: dict  # a JSON schema for the arguments object
    strict: bool
    param: str = "tools"  # where the request defines it (`tools[2].function`), for errors about it


@dataclass(frozen=True)
class ToolRequest:
    functions: tuple[Function, ...]  # those the model may call (an allowed_tools choice narrows them)
    mode: str  # NONE, AUTO or REQUIRED
    parallel: bool  # several calls in one answer
    legacy: bool  # `functions`: the answer is `message.function_call`, one call at most

    @property
    def active(self) -> bool:
        """Whether the model may call anything at all."""
        return self.mode != NONE and bool(self.functions)


class ToolRequestError(ValueError):
    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def tool_request(request: Mapping) -> ToolRequest | None:
    """The request's tools, or None when it has none; raises ToolRequestError for one that
    cannot be honoured."""
    if request.get("tools"):
        return _from_tools(request)
    if request.get("functions"):
        return _from_functions(request)
    return None


def _from_tools(request: Mapping) -> ToolRequest:
    functions = []
    for index, tool in enumerate(request["tools"]):
        if not isinstance(tool, Mapping) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, Mapping) else None
            raise ToolRequestError(f"tools[{index}].type", f"only 'function' tools can be called, not {kind!r}")
        functions.append(_function(tool.get("function") or {}, f"tools[{index}].function"))
    _check_unique(functions, "tools")
    parallel = request.get("parallel_tool_calls") is not False
    choice = request.get("tool_choice")
    if choice is None or choice in (NONE, AUTO, REQUIRED):
        return ToolRequest(tuple(functions), choice or AUTO, parallel, legacy=False)
    kind = choice.get("type") if isinstance(choice, Mapping) else None
    if kind == "function":
        name = (choice.get("function") or {}).get("name")
        return ToolRequest((_named(functions, name, "tool_choice.function.name"),), REQUIRED, parallel, legacy=False)
    if kind == "allowed_tools":
        allowed = choice.get("allowed_tools") or {}
        chosen = []
        for index, tool in enumerate(allowed.get("tools") or ()):
            param = f"tool_choice.allowed_tools.tools[{index}]"
            if not isinstance(tool, Mapping) or tool.get("type") != "function":
                raise ToolRequestError(param, "only 'function' tools can be allowed")
            chosen.append(_named(functions, (tool.get("function") or {}).get("name"), f"{param}.function.name"))
        return ToolRequest(tuple(chosen), allowed.get("mode") or AUTO, parallel, legacy=False)
    raise ToolRequestError("tool_choice", f"tool choice {kind!r} is not supported; only function tools can be called")


def _from_functions(request: Mapping) -> ToolRequest:
    functions = [_function(definition, f"functions[{index}]") for index, definition in enumerate(request["functions"])]
    _check_unique(functions, "functions")
    choice = request.get("function_call")
    if choice is None or choice in (NONE, AUTO):
        return ToolRequest(tuple(functions), choice or AUTO, parallel=False, legacy=True)
    name = choice.get("name") if isinstance(choice, Mapping) else None
    return ToolRequest((_named(functions, name, "function_call.name"),), REQUIRED, parallel=False, legacy=True)


def _function(definition: Mapping, param: str) -> Function:
    parameters = definition.get("parameters")
    return Function(
        name=definition.get("name") or "",
        description=definition.get("description") or "",
        parameters=dict(parameters) if isinstance(parameters, Mapping) else dict(EMPTY_PARAMETERS),
        strict=bool(definition.get("strict")),
        param=param,
    )


def _named(functions: list[Function], name, param: str) -> Function:
    for function in functions:
        if function.name == name:
            return function
    raise ToolRequestError(param, f"no function named {name!r} is among the tools")


def _check_unique(functions: list[Function], param: str) -> None:
    seen: set[str] = set()
    for index, function in enumerate(functions):
        if function.name in seen:
            raise ToolRequestError(f"{param}[{index}]", f"the function name {function.name!r} is used twice")
        seen.add(function.name)
