"""The generator: each construct OpenAI's spec uses, on small synthetic specs, plus the real one.

Synthetic specs go through the same `render` as the real spec; the module it writes is executed
and its schemas exercised, so these tests check behaviour, not the text of the output.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from marshmallow import ValidationError

from schemas import runtime
from schemas.errors import first_error
from schemas.generate import OUTPUT_PATH, load_document, render
from schemas.overlay import OverlayError, apply_overlay
from tests.upstream import require_spec


@pytest.fixture
def generated_module():
    """Render a synthetic spec, execute the module, and restore the global registries afterwards."""
    saved = dict(runtime.REGISTRY), dict(runtime.TYPES)

    def build(components: dict, body_schema: str = "TReq") -> dict:
        spec = {
            "openapi": "3.1.0",
            "info": {"title": "t", "version": "1"},
            "paths": {"/chat/completions": {"post": {
                "operationId": "tCreate",
                "requestBody": {"required": True, "content": {
                    "application/json": {"schema": {"$ref": f"#/components/schemas/{body_schema}"}}}},
                "responses": {"200": {"description": "ok"}},
            }}},
            "components": {"schemas": components},
        }
        namespace: dict = {}
        exec(compile(render(spec), "<generated>", "exec"), namespace)
        return namespace

    yield build
    runtime.REGISTRY.clear(), runtime.REGISTRY.update(saved[0])
    runtime.TYPES.clear(), runtime.TYPES.update(saved[1])


def load(ns, name, data):
    return ns["SCHEMAS"][name]().load(data)


def error_of(ns, name, data):
    with pytest.raises(ValidationError) as info:
        load(ns, name, data)
    return first_error(info.value.messages)


def test_all_of_merges_properties_later_parts_override_and_required_collected(generated_module):
    ns = generated_module({
        "Base": {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer"}},
                 "required": ["a"]},
        "TReq": {"allOf": [{"$ref": "#/components/schemas/Base"},
                           {"type": "object", "properties": {"b": {"type": "string"}, "c": {"type": "boolean"}},
                            "required": ["c"]}]},
    })
    assert load(ns, "TReq", {"a": "x", "b": "now a string", "c": True})["b"] == "now a string"
    assert error_of(ns, "TReq", {"c": True}).param == "a"
    assert error_of(ns, "TReq", {"a": "x"}).param == "c"


def test_both_nullability_forms(generated_module):
    ns = generated_module({
        "TReq": {"type": "object", "properties": {
            "old": {"type": "integer", "nullable": True},
            "new": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
            "ref": {"anyOf": [{"$ref": "#/components/schemas/Inner"}, {"type": "null"}]},
            "plain": {"type": "integer"},
        }},
        "Inner": {"type": "object", "properties": {"x": {"type": "integer"}}},
    })
    assert load(ns, "TReq", {"old": None, "new": None, "ref": None}) == {"old": None, "new": None, "ref": None}
    assert error_of(ns, "TReq", {"plain": None}).param == "plain"
    assert error_of(ns, "TReq", {"ref": {"x": "1"}}).param == "ref.x"


def test_discriminated_union_without_mapping_uses_each_members_enum(generated_module):
    ns = generated_module({
        "Cat": {"type": "object", "properties": {"kind": {"type": "string", "enum": ["cat"]},
                                                 "meow": {"type": "boolean"}}, "required": ["kind", "meow"]},
        "Dog": {"type": "object", "properties": {"kind": {"type": "string", "enum": ["dog"]},
                                                 "bark": {"type": "integer"}}, "required": ["kind"]},
        "Pet": {"oneOf": [{"$ref": "#/components/schemas/Cat"}, {"$ref": "#/components/schemas/Dog"}],
                "discriminator": {"propertyName": "kind"}},
        "TReq": {"type": "object", "properties": {"pets": {"type": "array",
                                                           "items": {"$ref": "#/components/schemas/Pet"}}}},
    })
    assert load(ns, "TReq", {"pets": [{"kind": "dog", "bark": 2}]})
    # the tag picks the member, so the error is about the dog, not the cat
    assert error_of(ns, "TReq", {"pets": [{"kind": "dog", "bark": "loud"}]}).param == "pets[0].bark"
    bad_tag = error_of(ns, "TReq", {"pets": [{"kind": "cow"}]})
    assert bad_tag.param == "pets[0].kind" and "'cat', 'dog'" in bad_tag.message
    assert error_of(ns, "TReq", {"pets": [{"meow": True}]}).code == "missing_required_parameter"


def test_undiscriminated_union_tries_in_order_and_reports_the_closest_error(generated_module):
    ns = generated_module({
        "TReq": {"type": "object", "properties": {"v": {"oneOf": [
            {"type": "string"},
            {"type": "array", "items": {"type": "integer"}},
            {"type": "object", "properties": {"deep": {"type": "object", "properties": {
                "n": {"type": "integer"}}}}},
        ]}}},
    })
    assert load(ns, "TReq", {"v": "s"}) == {"v": "s"}
    assert load(ns, "TReq", {"v": [1, 2]}) == {"v": [1, 2]}
    assert error_of(ns, "TReq", {"v": [1, "x"]}).param == "v[1]"
    assert error_of(ns, "TReq", {"v": {"deep": {"n": "x"}}}).param == "v.deep.n"
    wrong_kind = error_of(ns, "TReq", {"v": 3.5})
    assert wrong_kind.code == "invalid_type"
    assert "a string, an array or an object" in wrong_kind.message


def test_open_enum_accepts_any_string_and_closed_enum_does_not(generated_module):
    ns = generated_module({
        "TReq": {"type": "object", "properties": {
            "open": {"anyOf": [{"type": "string"}, {"type": "string", "enum": ["a", "b"]}]},
            "closed": {"type": "string", "enum": ["a", "b"]},
        }},
    })
    assert load(ns, "TReq", {"open": "anything", "closed": "a"})
    assert error_of(ns, "TReq", {"closed": "c"}).code == "invalid_value"
    assert error_of(ns, "TReq", {"open": 1}).code == "invalid_type"


def test_ranges_lengths_patterns_and_exclusive_bounds(generated_module):
    ns = generated_module({
        "TReq": {"type": "object", "properties": {
            "t": {"type": "number", "minimum": 0, "maximum": 2},
            "x": {"type": "number", "exclusiveMinimum": 0},
            "old_style": {"type": "integer", "minimum": 1, "exclusiveMinimum": True},
            "s": {"type": "string", "minLength": 2, "maxLength": 3, "pattern": "^[a-z]+$"},
            "l": {"type": "array", "minItems": 1, "maxItems": 2, "items": {"type": "string"}},
        }},
    })
    assert load(ns, "TReq", {"t": 2, "x": 0.1, "old_style": 2, "s": "ab", "l": ["a"]})
    for bad, param in [({"t": 2.1}, "t"), ({"x": 0}, "x"), ({"old_style": 1}, "old_style"), ({"s": "a"}, "s"),
                       ({"s": "ABC"}, "s"), ({"l": []}, "l"), ({"l": ["a", "b", "c"]}, "l")]:
        assert error_of(ns, "TReq", bad).param == param


def test_additional_properties_false_true_and_schema_maps(generated_module):
    ns = generated_module({
        "TReq": {"type": "object", "additionalProperties": False, "properties": {
            "open": {"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": True},
            "map": {"type": "object", "additionalProperties": {"type": "integer"}},
        }},
    })
    assert load(ns, "TReq", {"open": {"a": "x", "extra": 1}, "map": {"k": 1}}) == {
        "open": {"a": "x", "extra": 1}, "map": {"k": 1}}
    assert error_of(ns, "TReq", {"nope": 1}).code == "unknown_parameter"
    assert error_of(ns, "TReq", {"map": {"k": "v"}}).param == "map.k"


def test_map_keys_follow_property_names(generated_module):
    ns = generated_module({
        "TReq": {"type": "object", "properties": {
            "bias": {"type": "object", "additionalProperties": {"type": "integer"},
                     "propertyNames": {"pattern": "^[0-9]+$"}},
        }},
    })
    assert load(ns, "TReq", {"bias": {"12": 1}}) == {"bias": {"12": 1}}
    error = error_of(ns, "TReq", {"bias": {"12": 1, "x1": 2}})
    assert error.param == "bias" and error.message.startswith("Invalid key in 'bias': 'x1'")


def test_a_list_over_its_max_items_is_refused_before_its_items(generated_module):
    ns = generated_module({
        "TReq": {"type": "object", "properties": {
            "input": {"oneOf": [{"type": "array", "maxItems": 3, "items": {"type": "string"}},
                                {"type": "array", "maxItems": 3, "items": {"type": "integer"}}]},
        }},
    })
    error = error_of(ns, "TReq", {"input": ["a"] * 4})
    assert error.param == "input" and "at most 3 items" in error.message


def test_property_names_that_are_not_identifiers_keep_their_wire_names(generated_module):
    ns = generated_module({
        "TReq": {"type": "object", "properties": {
            "x-dash": {"type": "integer"}, "class": {"type": "string"}, "load": {"type": "string"},
            "fields": {"type": "string"}, "2nd": {"type": "boolean"},
        }},
    })
    data = {"x-dash": 1, "class": "c", "load": "l", "fields": "f", "2nd": True}
    assert load(ns, "TReq", data) == data
    assert error_of(ns, "TReq", {"x-dash": "1"}).param == "x-dash"


def test_binary_fields_accept_only_uploads(generated_module):
    from werkzeug.datastructures import FileStorage
    import io

    ns = generated_module({"TReq": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}},
                                    "required": ["file"]}})
    upload = FileStorage(io.BytesIO(b"abc"), filename="a.wav")
    assert load(ns, "TReq", {"file": upload})["file"] is upload
    assert error_of(ns, "TReq", {"file": "not a file"}).code == "invalid_type"


def test_recursive_schemas_do_not_recurse_at_import(generated_module):
    ns = generated_module({
        "Node": {"type": "object", "properties": {"children": {"type": "array", "items": {
            "$ref": "#/components/schemas/Node"}}, "v": {"type": "integer"}}},
        "Tree": {"anyOf": [{"$ref": "#/components/schemas/Node"}, {"type": "array", "items": {
            "$ref": "#/components/schemas/Tree"}}]},
        "TReq": {"type": "object", "properties": {"t": {"$ref": "#/components/schemas/Tree"}}},
    })
    assert load(ns, "TReq", {"t": [[{"children": [{"v": 1}]}]]})
    assert error_of(ns, "TReq", {"t": [[{"children": [{"v": "x"}]}]]}).param == "t[0][0].children[0].v"


def test_defaults_are_documented_not_filled_in(generated_module):
    ns = generated_module({"TReq": {"type": "object", "properties": {"n": {"type": "integer", "default": 1}}}})
    assert load(ns, "TReq", {}) == {}
    assert ns["SCHEMAS"]["TReq"]().fields["n"].metadata["default"] == 1


def test_output_carries_no_prose(generated_module):
    spec_text = "A long sentence that describes this field in the upstream spec."
    saved = dict(runtime.REGISTRY), dict(runtime.TYPES)
    try:
        source = render({
            "openapi": "3.1.0", "info": {"title": "t", "version": "1"},
            "paths": {"/embeddings": {"post": {"operationId": "x", "requestBody": {"content": {"application/json": {
                "schema": {"type": "object", "description": spec_text,
                           "properties": {"a": {"type": "string", "description": spec_text}}}}}},
                "responses": {}}}},
            "components": {"schemas": {}},
        })
    finally:
        runtime.REGISTRY.clear(), runtime.REGISTRY.update(saved[0])
        runtime.TYPES.clear(), runtime.TYPES.update(saved[1])
    assert spec_text not in source
    assert "'XRequest'" in source  # inline request bodies are named after their operation


def test_overlay_update_remove_and_unmatched_target():
    spec = {"a": {"b": [1]}, "servers": [{"url": "x"}]}
    overlay = {"overlay": "1.0.0", "actions": [
        {"target": "$.a", "update": {"c": 2, "b": [3]}},
        {"target": "$.servers", "remove": True},
        {"target": "$", "update": {"servers": [{"url": "y"}]}},
    ]}
    assert apply_overlay(spec, overlay) == {"a": {"b": [1, 3], "c": 2}, "servers": [{"url": "y"}]}
    assert spec["a"] == {"b": [1]}  # input untouched
    with pytest.raises(OverlayError, match="selects nothing"):
        apply_overlay(spec, {"overlay": "1.0.0", "actions": [{"target": "$.missing", "update": {}}]})


def test_regenerating_from_the_upstream_spec_is_byte_identical():
    require_spec()
    first = render(load_document())
    assert first == render(load_document()), "generator output is not deterministic"
    assert first == Path(OUTPUT_PATH).read_text(), "schemas/generated.py is stale: run `python -m schemas.generate`"


def test_every_upstream_operation_is_in_the_table():
    import json

    from schemas.generated import OPERATIONS

    spec = json.loads(require_spec().read_text())
    upstream = {(m.upper(), p) for p, item in spec["paths"].items() for m in item if m in ("get", "post", "delete")}
    table = {(op["method"], op["path"] + ("?" + "&".join(f"{k}={v}" for k, v in op["query"].items())
                                         if op["query"] else "")) for op in OPERATIONS if not op["localq"]}
    assert upstream == table


def test_generated_module_header_and_no_model_libraries():
    source = Path(OUTPUT_PATH).read_text()
    assert source.startswith("# GENERATED") and "DO NOT EDIT" in source.splitlines()[1]
    assert "import torch" not in source and os.path.getsize(OUTPUT_PATH) > 10_000


def test_presence_rules_beside_properties(generated_module):
    """`anyOf` of `required` lists and `not: {required}` on an object: exactly one of two names."""
    ns = generated_module({
        "Ref": {"type": "object", "additionalProperties": False,
                "properties": {"url": {"type": "string"}, "id": {"type": "string"}},
                "anyOf": [{"required": ["url"]}, {"required": ["id"]}], "not": {"required": ["url", "id"]}},
        "TReq": {"type": "object", "properties": {"image": {"$ref": "#/components/schemas/Ref"}}},
    })
    assert load(ns, "TReq", {"image": {"url": "u"}}) and load(ns, "TReq", {"image": {"id": "i"}})
    assert error_of(ns, "TReq", {"image": {}}).param == "image"
    assert "cannot be given together" in error_of(ns, "TReq", {"image": {"url": "u", "id": "i"}}).message
