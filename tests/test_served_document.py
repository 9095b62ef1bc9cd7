"""`GET /openapi.json`: valid OpenAPI 3.1, and field for field the overlaid upstream request schemas."""

from __future__ import annotations

import pytest
from openapi_spec_validator import validate

from schemas.codegen import Generator
from schemas.generate import load_document
from schemas.generated import OPERATIONS
from tests.upstream import require_spec


@pytest.fixture(scope="module")
def served():
    from api.app import create_app
    from api.settings import Settings

    response = create_app(Settings.from_env({})).test_client().get("/openapi.json")
    assert response.status_code == 200
    return response.get_json()


def test_served_document_is_valid_openapi_3_1(served):
    assert served["openapi"] == "3.1.0"
    validate(served)


def test_served_document_describes_every_route(served):
    documented = {(method.upper(), path) for path, item in served["paths"].items() for method in item}
    for op in OPERATIONS:
        key = op["path"] + ("?" + "&".join(f"{k}={v}" for k, v in op["query"].items()) if op["query"] else "")
        assert (op["method"], key) in documented
    assert "bearerAuth" in served["components"]["securitySchemes"]
    assert served["servers"][0]["url"].endswith("/v1")


def test_docs_page_is_served_without_a_cdn(app):
    client = app.test_client()
    page = client.get("/docs")
    assert page.status_code == 200 and b"/openapi.json" in page.data
    assert b"cdn" not in page.data.lower() and b"unpkg" not in page.data.lower()


# ----- field-for-field comparison -------------------------------------------------------------------


class Signature:
    """What a schema accepts, reduced to what both documents must agree on.

    Types, nullability, enums, numeric and length bounds, property names and required names;
    references are followed (to a bounded depth), so an inline upstream object and the named
    component the generator made of it compare equal.
    """

    def __init__(self, document: dict, normalise=None):
        self.schemas = document["components"]["schemas"]
        self.normalise = normalise or (lambda node: node)

    def resolve(self, node: dict) -> dict:
        for _ in range(20):
            node = self.normalise(node)
            if not (isinstance(node, dict) and "$ref" in node):
                break
            node = {**self.schemas[node["$ref"].rsplit("/", 1)[1]],
                    **{k: v for k, v in node.items() if k != "$ref"}}
        return node

    def of(self, node: dict, depth: int = 0) -> tuple:
        node = self.resolve(node)
        types, nullable, enums, members = set(), bool(node.get("nullable")), set(), []
        for key in ("anyOf", "oneOf"):
            for member in node.get(key, []):
                member = self.resolve(member)
                if member.get("type") == "null":
                    nullable = True
                else:
                    members.append(member)
        if len(members) == 1 and not node.get("type") and "enum" not in node:
            single = self.of(members[0], depth)
            return (single[0], single[1] or nullable, *single[2:])
        raw_type = node.get("type")
        for t in raw_type if isinstance(raw_type, list) else [raw_type] if raw_type else []:
            if t == "null":
                nullable = True
            else:
                types.add(t)
        open_enum = False
        for member in members:
            sub = self.of(member, depth + 1)
            types |= set(sub[0])
            nullable |= sub[1]
            if sub[2] is None:
                open_enum = True
            else:
                enums |= set(sub[2])
        if "enum" in node or "const" in node:
            values = node.get("enum", [node.get("const")])
            nullable |= None in values
            enums |= {repr(v) for v in values if v is not None}
        elif not members:
            open_enum = True
        if "properties" in node or node.get("type") == "object" and not members:
            types.add("object")
        if "integer" in types and "number" in types:
            types.discard("integer")
        bounds = tuple(float(node[k]) if isinstance(node.get(k), int | float) and not isinstance(node.get(k), bool)
                       else node.get(k) for k in ("minimum", "maximum", "minLength", "maxLength", "minItems", "maxItems"))
        props = required = None
        if "properties" in node:
            props = tuple(sorted(node["properties"]))
            required = tuple(sorted(set(node.get("required", []))))
        items = self.of(node["items"], depth + 1) if depth < 3 and isinstance(node.get("items"), dict) else None
        return (tuple(sorted(types)), nullable, None if open_enum else tuple(sorted(enums)), bounds, props,
                required, items)


def request_schema_names() -> list[str]:
    return sorted({name for op in OPERATIONS for name in op["request"].values() if name})


@pytest.mark.parametrize("name", request_schema_names())
def test_request_schema_matches_overlaid_upstream_field_for_field(served, name):
    require_spec()
    upstream_doc = load_document()
    gen = Generator(upstream_doc)
    upstream = Signature(upstream_doc, gen.normalise)
    ours = Signature(served)
    upstream_node = upstream.resolve({"$ref": f"#/components/schemas/{name}"}) if name in upstream.schemas else None
    if upstream_node is None:
        pytest.skip(f"{name} is an inline request body upstream")
    served_node = ours.resolve({"$ref": f"#/components/schemas/{name}"})
    assert sorted(upstream_node.get("properties", {})) == sorted(served_node.get("properties", {}))
    assert set(upstream_node.get("required", [])) == set(served_node.get("required", []))
    for field in upstream_node.get("properties", {}):
        assert upstream.of(upstream_node["properties"][field]) == ours.of(served_node["properties"][field]), (
            f"{name}.{field} differs"
        )
