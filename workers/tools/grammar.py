"""The JSON schema of what a constrained answer may be: calls whose arguments follow their tool's
schema, or (when the tool choice allows it) a text answer.

A tool's parameters are enforced by the grammar when it can enforce all of them
(`workers.tools.schema_grammar`). When it cannot, a `strict` tool is refused (`UnenforceableTool`,
a 400 naming the part); any other tool's arguments are held to what the grammar can enforce of
its schema, and checked against the full schema once written (`workers.tools.answer`).

The answer is the "generic" format (`workers.tools.formats.generic`): one JSON object, either
`{"tool_calls": [{"name": ..., "arguments": {...}}, ...]}` or `{"response": "..."}`. Each
function's `parameters` go under `$defs` with their own `$defs` hoisted beside them under
prefixed names and every local `$ref` rewritten to match, so tools whose schemas define
same-named parts (or refer to their own root) cannot collide in one grammar.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from workers.tools.request import AUTO, Function, ToolRequest
from workers.tools.schema_grammar import relaxed, unenforceable

MAX_PARALLEL_CALLS = 8  # calls one answer may make at once (a bound on what a request can make a model write)
_DEFS = ("$defs", "definitions")


ANY_OBJECT = {"type": "object"}


class UnenforceableTool(ValueError):
    """A strict tool whose parameters the grammar cannot enforce: `param` names the part."""

    def __init__(self, param: str, reason: str):
        super().__init__(f"The parameters of this strict function cannot be enforced: {reason}.")
        self.param = param


def answer_schema(tools: ToolRequest) -> dict:
    """The schema of a whole constrained answer for `tools` (which must be active)."""
    defs: dict[str, Any] = {}
    calls = []
    for index, function in enumerate(tools.functions):
        arguments = _hoist(_enforced(function), f"f{index}", defs)
        calls.append({
            "type": "object",
            "properties": {"name": {"const": function.name}, "arguments": arguments},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        })
    most = MAX_PARALLEL_CALLS if tools.parallel else 1
    wrapper = {
        "type": "object",
        "properties": {"tool_calls": {
            "type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls}, "minItems": 1,
            "maxItems": most,
        }},
        "required": ["tool_calls"],
        "additionalProperties": False,
    }
    schema: dict[str, Any] = wrapper
    if tools.mode == AUTO:
        text = {"type": "object", "properties": {"response": {"type": "string"}}, "required": ["response"],
                "additionalProperties": False}
        schema = {"anyOf": [wrapper, text]}
    return {**schema, "$defs": defs} if defs else schema


def _enforced(function: Function) -> Function:
    """`function` with the parameters the grammar will enforce: all of them, or for a tool that is
    not strict those it can (`relaxed`, else any object); a strict one it cannot is refused."""
    problem = unenforceable(function.parameters)
    if problem is None:
        return function
    if function.strict:
        path, reason = problem
        raise UnenforceableTool(f"{function.param}.parameters" + (f".{path}" if path else ""), reason)
    return dataclasses.replace(function, parameters=relaxed(function.parameters) or dict(ANY_OBJECT))


def _hoist(function: Function, prefix: str, defs: dict) -> dict:
    """`function.parameters` ready to sit inside the answer schema: a `$ref` to its copy under
    `$defs` when it refers to anything, else the schema itself."""
    parameters = copy.deepcopy(function.parameters)
    own = {}
    for key in _DEFS:
        found = parameters.pop(key, None)
        if isinstance(found, dict):
            own.update({name: (key, part) for name, part in found.items()})
    if not own and not _has_ref(parameters):
        return parameters

    def rewrite(ref: str) -> str:
        for key in _DEFS:
            head = f"#/{key}/"
            if ref.startswith(head):
                name, _, rest = ref[len(head):].partition("/")
                return f"#/$defs/{prefix}-{name}" + (f"/{rest}" if rest else "")
        if ref == "#":
            return f"#/$defs/{prefix}"
        if ref.startswith("#/"):
            return f"#/$defs/{prefix}/{ref[2:]}"
        return ref  # not local: left for the grammar's checks to refuse

    defs[prefix] = _rewritten(parameters, rewrite)
    for name, (_, part) in own.items():
        defs[f"{prefix}-{name}"] = _rewritten(part, rewrite)
    return {"$ref": f"#/$defs/{prefix}"}


def _rewritten(node: Any, rewrite) -> Any:
    if isinstance(node, dict):
        return {key: rewrite(value) if key == "$ref" and isinstance(value, str) else _rewritten(value, rewrite)
                for key, value in node.items()}
    if isinstance(node, list):
        return [_rewritten(item, rewrite) for item in node]
    return node


def _has_ref(node: Any) -> bool:
    if isinstance(node, dict):
        return "$ref" in node or any(_has_ref(value) for value in node.values())
    if isinstance(node, list):
        return any(_has_ref(item) for item in node)
    return False
