"""`GET /openapi.json`: the document this server really serves, built with apispec.

It is produced from the same generated marshmallow schemas and operation table that validate
requests, so what the document promises and what the server accepts cannot disagree.
"""

from __future__ import annotations

from functools import cache

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Blueprint, jsonify
from marshmallow import fields

from schemas.generated import DOCUMENT, OPERATIONS, SCHEMAS
from schemas.runtime import TYPES, Any_, Binary, MapOf, Range, Ref, Tagged, Union

blueprint = Blueprint("openapi", __name__)

ERROR_SCHEMA = "ErrorResponse"
_NULL = {"type": "null"}


def _schema_name(schema) -> str:
    cls = schema if isinstance(schema, type) else type(schema)
    return cls.__name__


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _with_null(prop: dict, field: fields.Field) -> dict:
    if not field.allow_none:
        return prop
    members = prop.pop("anyOf", None) or prop.pop("oneOf", None)
    if members is not None:
        return {**prop, "anyOf": [*members, _NULL]}
    return {"anyOf": [prop, _NULL]}


def _localq_fields(converter, field: fields.Field, ret: dict, **kwargs) -> dict:
    """apispec attribute function for the field kinds marshmallow does not have."""
    if isinstance(field, Ref):
        ret.clear()
        return _with_null(_ref(field.name), field)
    if isinstance(field, Union):
        ret.pop("type", None)
        return _with_null({"anyOf": [converter.field2property(m) for m in field.members]}, field)
    if isinstance(field, Tagged):
        members = list({id(m): converter.field2property(m) for m in field.members.values()}.values())
        unique = [m for i, m in enumerate(members) if m not in members[:i]]
        ret.pop("type", None)
        return _with_null({"oneOf": unique, "discriminator": {"propertyName": field.tag}}, field)
    if isinstance(field, MapOf):
        extra = converter.field2property(field.value_field) if field.value_field else True
        return {"type": ["object", "null"] if field.allow_none else "object", "additionalProperties": extra}
    if isinstance(field, Binary):
        return {"type": "string", "format": "binary"}
    if isinstance(field, Any_):
        return {}
    return {}


def _exclusive_bounds(converter, field: fields.Field, ret: dict, **kwargs) -> dict:
    """apispec writes every Range as minimum/maximum; OpenAPI 3.1 says exclusive bounds as numbers."""
    for validator in field.validators:
        if not isinstance(validator, Range):
            continue
        if validator.min is not None and not validator.min_inclusive:
            ret.pop("minimum", None)
            ret["exclusiveMinimum"] = validator.min
        if validator.max is not None and not validator.max_inclusive:
            ret.pop("maximum", None)
            ret["exclusiveMaximum"] = validator.max
    return {}


def _presence_rules(schema_cls) -> dict:
    """The object-level rules marshmallow enforces in a hook, written back as JSON Schema."""
    rules: dict = {}
    if schema_cls.required_any_of:
        rules["anyOf"] = [{"required": list(group)} for group in schema_cls.required_any_of]
    if schema_cls.forbidden_together:
        rules["not"] = {"required": list(schema_cls.forbidden_together)}
    return rules


def _operation(op: dict) -> dict:
    entry: dict = {"operationId": op["operation_id"], "tags": [op["tag"]] if op["tag"] else []}
    if op.get("summary"):
        entry["summary"] = op["summary"]
    if op.get("description"):
        entry["description"] = op["description"]
    params = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}} for p in op["path_params"]]
    if op["query_schema"]:
        params.append({"in": "query", "schema": SCHEMAS[op["query_schema"]]})
    if params:
        entry["parameters"] = params
    documented = {ct: name for ct, name in op["request"].items() if name}
    if documented:
        entry["requestBody"] = {
            "required": op["request_required"],
            "content": {ct: {"schema": _ref(name)} for ct, name in documented.items()},
        }
    responses: dict = {}
    scoped = documented or any(name for contents in op["responses"].values() for name in contents.values())
    if scoped or op["localq"]:
        for status, contents in op["responses"].items():
            body = {"description": f"HTTP {status}"}
            content = {ct: {"schema": _ref(name)} for ct, name in contents.items() if name}
            if content:
                body["content"] = content
            responses[status] = body
        responses.setdefault("400", _error_response("Invalid request"))
    else:
        responses["501"] = _error_response("Not implemented by localq")
    entry["responses"] = responses
    return entry


def _error_response(description: str) -> dict:
    schema = _ref(ERROR_SCHEMA) if ERROR_SCHEMA in SCHEMAS else {"type": "object"}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


@cache
def build_document() -> dict:
    """Build the document once per process; everything it is made from is static."""
    plugin = MarshmallowPlugin(schema_name_resolver=_schema_name)
    info = DOCUMENT["info"]
    spec = APISpec(
        title=info["title"] or "localq",
        version=info["version"] or "0",
        openapi_version="3.1.0",
        plugins=[plugin],
        info={"description": info.get("description") or ""},
        servers=DOCUMENT["servers"],
        security=DOCUMENT["security"],
    )
    plugin.converter.add_attribute_function(_localq_fields)
    plugin.converter.add_attribute_function(_exclusive_bounds)
    for name, scheme in DOCUMENT["security_schemes"].items():
        spec.components.security_scheme(name, scheme)
    for name in sorted(SCHEMAS):
        if name not in spec.components.schemas:
            spec.components.schema(name, schema=SCHEMAS[name])
    document_rules = {name: _presence_rules(cls) for name, cls in SCHEMAS.items() if _presence_rules(cls)}
    for name in sorted(TYPES):
        spec.components.schema(name, component=plugin.converter.field2property(TYPES[name]()))
    by_path: dict[str, dict] = {}
    for op in OPERATIONS:
        key = op["path"] + ("?" + "&".join(f"{k}={v}" for k, v in op["query"].items()) if op["query"] else "")
        by_path.setdefault(key, {})[op["method"].lower()] = _operation(op)
    for path, operations in by_path.items():
        spec.path(path=path, operations=operations)
    document = spec.to_dict()
    for name, rules in document_rules.items():
        document["components"]["schemas"][name].update(rules)
    return document


@blueprint.get("/openapi.json")
def openapi_json():
    return jsonify(build_document())
