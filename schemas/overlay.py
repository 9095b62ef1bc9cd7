"""Apply an OpenAPI Overlay 1.0.0 document (https://spec.openapis.org/overlay/v1.0.0) to a spec.

Each action's `target` is a JSONPath (jsonpath-ng, a maintained implementation); `update` is merged
into every selected node (objects recursively, arrays appended to), `remove: true` deletes them.
A target that selects nothing is an error: a silent no-op would let our extensions vanish when the
upstream spec renames a schema.
"""

from __future__ import annotations

import copy
from typing import Any

from jsonpath_ng.ext import parse


class OverlayError(ValueError):
    pass


def merge(target: Any, update: Any) -> Any:
    """Merge `update` into `target` in place where possible; return the merged value."""
    if isinstance(target, dict) and isinstance(update, dict):
        for key, value in update.items():
            target[key] = merge(target[key], value) if key in target else copy.deepcopy(value)
        return target
    if isinstance(target, list):
        target.extend(copy.deepcopy(update) if isinstance(update, list) else [copy.deepcopy(update)])
        return target
    return copy.deepcopy(update)


def apply_overlay(spec: dict, overlay: dict) -> dict:
    if str(overlay.get("overlay", "")).split(".")[0] != "1":
        raise OverlayError("not an Overlay 1.x document (missing 'overlay: 1.0.0')")
    document = copy.deepcopy(spec)
    for index, action in enumerate(overlay.get("actions", [])):
        target = action.get("target")
        if not target:
            raise OverlayError(f"action {index}: missing target")
        expression = parse(target)
        matches = expression.find(document)
        if not matches:
            raise OverlayError(f"action {index}: target {target!r} selects nothing")
        if action.get("remove"):
            document = expression.filter(lambda _: True, document)
        elif "update" in action:
            for match in matches:
                merged = merge(match.value, action["update"])
                if merged is not match.value:
                    match.full_path.update(document, merged)
        else:
            raise OverlayError(f"action {index}: needs 'update' or 'remove: true'")
    return document
