"""Validate a request body or query against its generated schema, the way OpenAI does.

Three things happen here and nowhere else: extension names sent at the top level of a body (as
LocalAI and llama.cpp clients do) are moved into `x-localai-extensions`; form fields and query
strings, which arrive as text, are given the JSON types their schema expects; and marshmallow's
errors become one `Invalid(param, message)`.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import re
from collections.abc import Mapping
from typing import Any

from marshmallow import ValidationError, fields

from schemas.errors import Invalid, first_error, join_path, unknown_field_paths
from schemas.generated import SCHEMAS
from schemas.json_bounds import check_bounds
from schemas.runtime import (
    Binary,
    Bool,
    Int,
    ListOf,
    MapOf,
    Num,
    Obj,
    Ref,
    Tagged,
    Union,
    describe_kind,
    field_kinds,
    kind_of,
)

log = logging.getLogger(__name__)

_MAX_IGNORE_ROUNDS = 8


def validate(
    schema_name: str,
    data: Any,
    *,
    extensions: Mapping | None = None,
    ignore_unknown: bool = False,
) -> dict:
    """Load `data` with the named schema; raise `Invalid` with OpenAI's param path on failure.

    `extensions` is the operation's entry from the generated table ({"property", "hoisted"}).
    With `ignore_unknown`, fields the schema does not know are logged and dropped instead.
    """
    if not isinstance(data, Mapping):
        raise Invalid(
            None,
            f"Invalid type for the request body: expected an object, but got {describe_kind(kind_of(data))} instead.",
            "invalid_type",
        )
    check_bounds(data)  # before anything recurses into the value or encodes its text
    hoisted = [name for name in (extensions or {}).get("hoisted", ()) if name in data]
    data = hoist_extensions(dict(data), extensions)
    schema = _schema(schema_name)
    for _ in range(_MAX_IGNORE_ROUNDS):
        try:
            return schema.load(data)
        except ValidationError as err:
            unknown = unknown_field_paths(err.messages) if ignore_unknown else []
            if not unknown:
                raise _as_sent(first_error(err.messages), extensions, hoisted) from None
            data = copy.deepcopy(data)  # bounded in depth by check_bounds
            for path in unknown:
                log.warning("ignoring unknown request field %s", join_path(path))
                _delete(data, path)
    return schema.load(data)


@functools.cache
def _schema(schema_name: str):
    """One instance per schema: building one (and its nested schemas) took about a third of a
    millisecond on every request; `load` keeps no state between calls."""
    return SCHEMAS[schema_name]()


def _as_sent(error: Invalid, extensions: Mapping | None, hoisted: list[str]) -> Invalid:
    """Report an error in a hoisted extension under the name the client actually used."""
    for name in hoisted:
        moved = f"{extensions['property']}.{name}"
        if error.param and (error.param == moved or error.param.startswith(moved + ".") or error.param.startswith(moved + "[")):
            param = name + error.param[len(moved):]
            return Invalid(param, error.message.replace(f"'{error.param}'", f"'{param}'"), error.code)
    return error


def hoist_extensions(data: dict, extensions: Mapping | None) -> dict:
    """Move top-level extension names into the extensions object; a name in both places is an error."""
    if not extensions:
        return data
    carrier = extensions["property"]
    present = [name for name in extensions["hoisted"] if name in data]
    if not present:
        return data
    inner = data.get(carrier)
    if inner is None:
        inner = {}
    if not isinstance(inner, Mapping):
        return data  # validation reports the wrong type of the carrier itself
    inner = dict(inner)
    for name in present:
        if name in inner:
            raise Invalid(
                name, f"'{name}' was given both at the top level and inside '{carrier}'; give it once.", "duplicate_parameter"
            )
        inner[name] = data.pop(name)
    data[carrier] = inner
    return data


def _delete(data: Any, path: tuple) -> None:
    for key in path[:-1]:
        data = data[int(key)] if isinstance(data, list) else data[key]
    if isinstance(data, dict):
        data.pop(path[-1], None)


# ----- text inputs: multipart forms and query strings ---------------------------------------------


def coerce_form(schema_name: str, form, files=None, *, extensions: Mapping | None = None) -> dict:
    """Turn a multipart form (or query args) into the JSON-typed dict its schema validates.

    Repeated keys and `key[]` become arrays where the schema wants one; numbers, booleans and JSON
    objects are parsed where the schema wants those. Keys the schema does not know are kept as text,
    so validation rejects them rather than dropping them.
    """
    schema_fields = _fields_by_wire_name(SCHEMAS[schema_name])
    if extensions:
        carrier = schema_fields.get(extensions["property"])
        if isinstance(carrier, Obj):
            ext_fields = _fields_by_wire_name(type(carrier.schema))
            for name in extensions["hoisted"]:
                schema_fields.setdefault(name, ext_fields.get(name))
    data: dict[str, Any] = {}
    for source in (form, files or {}):
        for raw_key in _keys(source):
            if not isinstance(raw_key, str) or not raw_key:
                raise Invalid(None, "Every part of a multipart body needs a name.", "invalid_value")
            key = raw_key[:-2] if raw_key.endswith("[]") else raw_key
            values = source.getlist(raw_key) if hasattr(source, "getlist") else [source[raw_key]]
            nested = _BRACKETED.match(key)
            if nested and nested.group(1) in schema_fields and values:
                # `expires_after[seconds]=3600`: a field of an object, as form encoders write it
                parent, child = nested.groups()
                target = _unwrap(schema_fields[parent])
                child_fields = _fields_by_wire_name(type(target.schema)) if isinstance(target, Obj) else {}
                holder = data.setdefault(parent, {})
                if isinstance(holder, dict):
                    holder[child] = coerce_text(child_fields.get(child), values[0])
                continue
            field = schema_fields.get(key)
            if isinstance(_unwrap(field), ListOf):
                inner = _unwrap(field).inner
                items = [v for value in values for v in _split_list(value, inner)]
                data.setdefault(key, []).extend(items)
            elif values:
                data[key] = coerce_text(field, values[0])
    return data


_BRACKETED = re.compile(r"^([A-Za-z_][\w-]*)\[([^\[\]]+)\]$")


def _keys(source) -> list[str]:
    return list(dict.fromkeys(source.keys()))


def _fields_by_wire_name(schema_cls) -> dict[str, fields.Field]:
    return {(f.data_key or name): f for name, f in schema_cls().fields.items()}


def _unwrap(field):
    while isinstance(field, Ref):
        field = field.target
    return field


def _json_or_none(value: str) -> Any:
    try:
        return json.loads(value)
    except (ValueError, RecursionError):
        return None


def _split_list(value: Any, inner) -> list:
    if isinstance(value, str) and value.lstrip().startswith("["):
        parsed = _json_or_none(value)
        if isinstance(parsed, list):
            return parsed
    return [coerce_text(inner, value)]


def coerce_text(field, value: Any) -> Any:
    """The JSON value a text form field stands for, given the field it is meant for."""
    field = _unwrap(field)
    if not isinstance(value, str) or field is None or isinstance(field, Binary):
        return value
    kinds = set(field_kinds(field))
    if field.allow_none and value == "null":
        return None
    if isinstance(field, Bool) or kinds == {"boolean"}:
        return {"true": True, "false": False, "1": True, "0": False}.get(value.lower(), value)
    if isinstance(field, Int | Num) or kinds & {"integer", "number"} and "string" not in kinds:
        for convert in (int, float):
            try:
                return convert(value)
            except ValueError:
                pass
        return value
    if isinstance(field, Obj | MapOf | Tagged) or ("object" in kinds or "array" in kinds):
        stripped = value.lstrip()
        if stripped.startswith(("{", "[")) or "string" not in kinds:
            parsed = _json_or_none(value)
            return value if parsed is None else parsed
    if isinstance(field, Union) and kinds & {"integer", "number"}:
        parsed = _json_or_none(value)
        return value if parsed is None else parsed
    return value
