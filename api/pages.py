"""OpenAI's cursor-paginated lists: the `limit` check and the `{"object": "list", ...}` envelope."""

from __future__ import annotations

from api.errors import APIError


def page_limit(query: dict, default: int, maximum: int) -> int:
    limit = query.get("limit", default)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= maximum:
        raise APIError(400, f"Invalid 'limit': {limit!r}. Expected an integer between 1 and {maximum}.",
                       param="limit", code="integer_out_of_range")
    return limit


def page(items: list[dict], has_more: bool) -> dict:
    return {
        "object": "list",
        "data": items,
        "first_id": items[0]["id"] if items else None,
        "last_id": items[-1]["id"] if items else None,
        "has_more": has_more,
    }
