"""Handlers for OpenAI operations, one module per API area.

Each module here exposes `HANDLERS: dict[str, callable]` keyed by the upstream
operationId; `collect_handlers` merges them for `api.operations`.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable


def collect_handlers() -> dict[str, Callable]:
    """Merge every submodule's HANDLERS; two modules claiming one operation is a bug."""
    handlers: dict[str, Callable] = {}
    owners: dict[str, str] = {}
    for module_info in pkgutil.iter_modules(__path__, f"{__name__}."):
        module = importlib.import_module(module_info.name)
        for operation_id, handler in getattr(module, "HANDLERS", {}).items():
            if operation_id in handlers:
                raise RuntimeError(
                    f"operation {operation_id!r} is handled by both "
                    f"{owners[operation_id]} and {module.__name__}"
                )
            handlers[operation_id] = handler
            owners[operation_id] = module.__name__
    return handlers
