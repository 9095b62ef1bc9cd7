"""workers/tools/schema_grammar.py: which JSON schemas llama-cpp-python's converter enforces, with
the grammars compiled by llama.cpp and fed real documents token by token."""

from __future__ import annotations

import ctypes
import json
import re

import jsonschema
import llama_cpp
import pytest
from llama_cpp.llama_grammar import json_schema_to_gbnf

from ops.bench.llm import model_path
from workers.tools.schema_grammar import MAX_DEPTH, MAX_REPEAT, schema_to_gbnf, unenforceable

pytestmark = pytest.mark.unit


def obj(properties: dict, required: list | None = None, **extra) -> dict:
    """A closed object schema."""
    return {"type": "object", "properties": properties, "required": required or [], "additionalProperties": False,
            **extra}


STRING, INTEGER = {"type": "string"}, {"type": "integer"}

# -- schemas the grammar enforces --------------------------------------------------------------------

ENFORCEABLE = {
    "primitives": {"type": "string"},
    "every type": obj({t: {"type": t} for t in ("string", "number", "integer", "boolean", "null", "object", "array")}),
    "annotations": {"type": "integer", "title": "t", "description": "d", "default": 1, "examples": [1],
                    "$comment": "c", "deprecated": False, "readOnly": True, "writeOnly": False, "x-order": 3},
    "root $id and $schema": {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "https://x/y",
                             "type": "boolean"},
    "empty schema (converter: any object)": {},
    "closed object": obj({"name": STRING, "age": INTEGER}, ["name"]),
    "object without additionalProperties (converter closes it)": {"properties": {"a": STRING}},
    "empty properties": {"type": "object", "properties": {}},
    "map": {"type": "object", "additionalProperties": INTEGER},
    "free object with additionalProperties true": {"type": "object", "additionalProperties": True},
    "type list": {"type": ["string", "null"]},
    "enum": {"enum": ["a", 1, None, True, {"k": [1]}]},
    "typed enum": {"type": "string", "enum": ["red", "green"]},
    "non-ASCII enum": {"enum": ["café", "日本"]},
    "const with type and enum (pydantic Literal)": {"const": "cat", "enum": ["cat"], "type": "string"},
    "integer const as float": {"type": "integer", "const": 2.0},
    "array": {"type": "array", "items": INTEGER, "minItems": 1, "maxItems": 3},
    "tuple": {"type": "array", "prefixItems": [INTEGER, STRING], "minItems": 2, "maxItems": 2, "items": False},
    "draft-7 tuple": {"type": "array", "items": [INTEGER, STRING]},
    "lengths": {"type": "string", "minLength": 2, "maxLength": MAX_REPEAT},
    "pattern": {"type": "string", "pattern": "^[a-z]{2,4}-[0-9]+(x|yz)?$"},
    "pattern with escaped metacharacters": {"pattern": "^\\(\\[\\*\\+\\?\\{\\}\\|\\]\\)$"},
    "pattern, escaped character alone quantified": {"pattern": "^\\(*a$"},
    "pattern, class escapes": {"pattern": "^[\\x41-\\x43\\u00e9\\]\\[_-]+$"},
    "formats": obj({f: {"type": "string", "format": f} for f in ("date", "time", "date-time", "uuid")}),
    "anyOf": {"anyOf": [STRING, INTEGER, {"$ref": "#/$defs/Point"}], "$defs": {"Point": obj({"x": INTEGER}, ["x"])}},
    "oneOf by type": {"oneOf": [STRING, {"type": "null"}, INTEGER, {"type": "array", "items": STRING}]},
    "oneOf by literals": {"oneOf": [{"const": 1}, {"enum": [2, "1", True]}]},
    "oneOf by discriminator (pydantic)": {
        "oneOf": [{"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Dog"}],
        "discriminator": {"propertyName": "kind", "mapping": {"cat": "#/$defs/Cat", "dog": "#/$defs/Dog"}},
        "$defs": {"Cat": obj({"kind": {"const": "cat", "type": "string"}, "lives": INTEGER}, ["kind", "lives"]),
                  "Dog": obj({"kind": {"enum": ["dog", "wolf"]}, "lives": INTEGER}, ["kind", "lives"])},
    },
    "allOf": {"allOf": [{"$ref": "#/$defs/Base"}, {"properties": {"b": INTEGER}, "required": ["b"]},
                        {"anyOf": [{"properties": {"c": STRING}}, {"properties": {"d": STRING}}]}],
              "$defs": {"Base": {"type": "object", "properties": {"a": STRING}, "required": ["a"]}}},
    "allOf, one closed part": {"allOf": [{"properties": {"a": STRING}, "additionalProperties": False}]},
    "recursion through properties": obj({"head": {"$ref": "#/$defs/Node"}}, ["head"], **{"$defs": {
        "Node": obj({"v": INTEGER, "next": {"anyOf": [{"$ref": "#/$defs/Node"}, {"type": "null"}]}}, ["v", "next"])}}),
    "mutual recursion through items": {
        "$defs": {"A": {"type": "array", "items": {"$ref": "#/definitions/B"}}},
        "definitions": {"B": {"anyOf": [INTEGER, {"$ref": "#/$defs/A"}]}},
        "type": "array", "items": {"$ref": "#/$defs/A"}},
    "root $ref to a definition without references": {"$ref": "#/$defs/S", "$defs": {"S": obj({"a": STRING})}},
    "ref into properties": obj({"a": STRING, "b": {"$ref": "#/properties/a"}}),
    "no-op keywords": {"type": "array", "items": STRING, "uniqueItems": False},
}


def _nested(levels: int) -> dict:
    schema: dict = INTEGER
    for _ in range(levels):
        schema = obj({"a": schema})
    return schema


ENFORCEABLE["nesting at the limit"] = _nested(MAX_DEPTH)


@pytest.mark.parametrize("schema", ENFORCEABLE.values(), ids=ENFORCEABLE.keys())
def test_enforceable_schemas_pass_and_convert(schema, vocab):
    assert unenforceable(schema) is None
    grammar = schema_to_gbnf(schema)
    assert grammar == json_schema_to_gbnf(json.dumps(schema))  # the converter's own grammar, untouched
    assert compiles(vocab, grammar)


# -- schemas it does not enforce ----------------------------------------------------------------------

UNENFORCEABLE = [
    # (id, schema, path, words the reason has)
    ("minimum", obj({"age": {"type": "integer", "minimum": 0}}), "properties.age.minimum", "'minimum' is not enforced"),
    ("uniqueItems", obj({"tags": {"type": "array", "items": STRING, "uniqueItems": True}}),
     "properties.tags.uniqueItems", "'uniqueItems'"),
    ("format through $ref", {"$ref": "#/$defs/Address", "$defs": {"Address": obj({"zip": {
        "type": "string", "format": "email"}})}}, "$defs.Address.properties.zip.format", 'format "email"'),
    *[(kw, {"type": "number", kw: value}, kw, f"'{kw}' is not enforced")
      for kw, value in [("maximum", 1), ("exclusiveMinimum", 0), ("exclusiveMaximum", 9), ("multipleOf", 2)]],
    *[(kw, {"type": "object", kw: value}, kw, f"'{kw}'") for kw, value in [
        ("minProperties", 1), ("maxProperties", 1), ("patternProperties", {"^a": STRING}),
        ("propertyNames", {"pattern": "^a$"}), ("dependentRequired", {"a": ["b"]}),
        ("dependentSchemas", {"a": {}}), ("unevaluatedProperties", False)]],
    *[(kw, {"type": "array", "items": STRING, kw: value}, kw, f"'{kw}'") for kw, value in [
        ("contains", STRING), ("minContains", 1), ("unevaluatedItems", False), ("additionalItems", False)]],
    *[(kw, {"type": "string", kw: value}, kw, f"'{kw}'") for kw, value in [
        ("not", {"const": "a"}), ("if", STRING), ("then", STRING), ("else", STRING),
        ("contentMediaType", "application/json"), ("contentEncoding", "base64")]],
    ("unknown keyword", {"type": "string", "nullable": True}, "nullable", "unknown keyword 'nullable'"),
    ("other format", {"type": "string", "format": "email"}, "format", "knows only"),
    ("uuid version", {"type": "string", "format": "uuid4"}, "format", "UUID version"),
    ("format on integer", {"type": "integer", "format": "int32"}, "format", 'format "int32"'),
    ("format next to pattern", {"type": "string", "pattern": "^a$", "format": "date"}, "format", "next to 'pattern'"),
    ("maxLength next to format", {"type": "string", "format": "date", "maxLength": 3}, "maxLength", "'format'"),
    ("length without type", {"maxLength": 3}, "maxLength", "'maxLength' is not enforced"),
    ("maxItems without items", {"type": "array", "maxItems": 2}, "maxItems", "without 'items'"),
    ("required without properties", {"type": "object", "required": ["a"]}, "required", "without 'properties'"),
    ("type list drops siblings", {"type": ["string", "null"], "maxLength": 3}, "maxLength", "'type' is a list"),
    ("type list drops enum", {"type": ["string", "null"], "enum": ["a", None]}, "enum", "'type' is a list"),
    ("type list drops properties", {"type": ["object", "null"], "properties": {"a": STRING}}, "properties", "list"),
    ("$ref drops siblings", {"$ref": "#/$defs/S", "maxLength": 2, "$defs": {"S": STRING}}, "maxLength", "'$ref'"),
    ("anyOf drops type", {"type": "string", "anyOf": [{"maxLength": 2, "type": "string"}]}, "type", "'anyOf'"),
    ("oneOf drops anyOf", {"oneOf": [STRING], "anyOf": [INTEGER]}, "anyOf", "next to 'oneOf'"),
    ("const drops maxLength", {"const": "abc", "maxLength": 2}, "maxLength", "next to 'const'"),
    ("const of another type", {"type": "integer", "const": "1"}, "const", "does not match 'type'"),
    ("enum value of another type", {"type": "string", "enum": ["a", 1]}, "enum[1]", "does not match 'type'"),
    ("const not in enum", {"const": "a", "enum": ["b"]}, "enum", "does not contain"),
    ("properties drop allOf", {"properties": {"a": STRING}, "allOf": [{"properties": {"b": STRING}}]}, "allOf",
     "next to 'properties'"),
    ("pattern drops maxLength", {"type": "string", "pattern": "^a*$", "maxLength": 2}, "maxLength", "'pattern'"),
    ("not a type", {"type": "value"}, "type", '"value" is not a JSON Schema type'),
    ("not a type in a list", {"type": ["string", "uuid"]}, "type[1]", "not a JSON Schema type"),
    ("empty type list", {"type": []}, "type", "empty"),
    ("no type", {"description": "anything"}, "", "no 'type'"),
    ("boolean schema", obj({"a": True}), "properties.a", "boolean schema"),
    ("boolean root", False, "", "boolean schema"),
    ("not a schema", obj({"a": 3}), "properties.a", "must be a JSON object"),
    ("list root", [1], "", "must be a JSON object"),
    ("required but undeclared", obj({"a": STRING}, ["a", "b"]), "required[1]", "never writes it"),
    ("extra keys beside properties", {"type": "object", "properties": {"a": INTEGER}, "additionalProperties": True},
     "additionalProperties", "set 'additionalProperties' to false"),
    ("extra schema beside properties", {"properties": {"a": INTEGER}, "additionalProperties": STRING},
     "additionalProperties", "declared property"),
    ("empty anyOf", {"anyOf": []}, "anyOf", "non-empty"),
    ("empty enum", {"enum": []}, "enum", "non-empty"),
    ("overlapping oneOf", {"oneOf": [{"type": "number"}, INTEGER]}, "oneOf", "alternatives 0 and 1"),
    ("overlapping oneOf of strings", {"oneOf": [{"type": "string", "maxLength": 3}, {"enum": ["a", "abcdef"]}]},
     "oneOf", "'oneOf' as 'anyOf'"),
    ("oneOf, objects without discriminator", {"oneOf": [obj({"a": STRING}), obj({"b": STRING})]}, "oneOf", "0 and 1"),
    ("oneOf, shared tag value", {"oneOf": [obj({"k": {"const": "x"}}, ["k"]), obj({"k": {"enum": ["x", "y"]}}, ["k"])]},
     "oneOf", "0 and 1"),
    ("oneOf, tag not required", {"oneOf": [obj({"k": {"const": "x"}}), obj({"k": {"const": "y"}})]}, "oneOf",
     "0 and 1"),
    ("quote in enum", {"enum": ['say "hi"']}, "enum[0]", "quote"),
    ("backslash in const", {"const": {"path": "C:\\x"}}, "const.path", "backslash"),
    ("control character in enum", {"enum": ["a\nb"]}, "enum[0]", "control character"),
    ("emoji in enum", {"enum": ["\U0001f600"]}, "enum[0]", "beyond U+FFFF"),
    ("$ref key in a const", {"const": {"$ref": "#/x"}}, "const.$ref", "as a reference"),
    ("quote in property name", obj({'a"b': STRING}), 'properties["a\\"b"]', "property name"),
    ("non-finite number", {"enum": [float("inf")]}, "enum[0]", "not finite"),
    ("external $ref", {"$ref": "https://example.com/s.json"}, "$ref", "not local"),
    ("root $ref", obj({"next": {"$ref": "#"}}), "properties.next.$ref", "whole schema"),
    ("anchor $ref", {"$ref": "#node"}, "$ref", "not local"),
    ("escaped pointer", {"$ref": "#/$defs/a~1b", "$defs": {"a/b": STRING}}, "$ref", "escapes"),
    ("dangling $ref", {"$ref": "#/$defs/Nope", "$defs": {}}, "$ref", "points at nothing"),
    ("$ref into a list", {"$ref": "#/$defs/L/0", "$defs": {"L": [STRING]}}, "$ref", "points at nothing"),
    ("nested $id", obj({"a": {"$id": "https://x/a", "type": "string"}}), "properties.a.$id", "nested '$id'"),
    ("$dynamicRef", {"$dynamicRef": "#meta"}, "$dynamicRef", "not enforced"),
    ("external $ref in an unused definition", {"type": "string", "$defs": {"U": {"$ref": "https://x/u.json"}}},
     "$defs.U.$ref", "not local"),
    ("$ref in an annotation", {"type": "string", "examples": [{"$ref": "#/nowhere"}]}, "examples[0].$ref",
     "points at nothing"),
    ("items {} (pydantic list[Any])", {"type": "array", "items": {}}, "items", "give the items a schema"),
    ("items true", {"type": "array", "items": True}, "items", "boolean"),
    ("prefixItems beside items", {"type": "array", "prefixItems": [STRING], "items": INTEGER}, "prefixItems",
     "reads only 'items'"),
    ("tuple longer than maxItems", {"type": "array", "prefixItems": [STRING, STRING], "maxItems": 1}, "maxItems",
     "exactly 2"),
    ("tuple shorter than minItems", {"type": "array", "items": [STRING], "minItems": 2}, "minItems", "exactly 1"),
    ("minItems above maxItems", {"type": "array", "items": STRING, "minItems": 3, "maxItems": 2}, "minItems", "above"),
    ("maxItems too large", {"type": "array", "items": STRING, "maxItems": MAX_REPEAT + 1}, "maxItems",
     f"above {MAX_REPEAT}"),
    ("maxLength not an integer", {"type": "string", "maxLength": 2.5}, "maxLength", "non-negative integer"),
    ("minLength boolean", {"type": "string", "minLength": True}, "minLength", "non-negative integer"),
    ("minLength above maxLength", {"type": "string", "minLength": 3, "maxLength": 2}, "minLength", "above"),
    ("allOf, required in anyOf", {"allOf": [{"anyOf": [{"properties": {"a": STRING}, "required": ["a"]}]}]},
     "allOf[0].anyOf[0].required", "optional"),
    ("allOf, repeated property", {"allOf": [{"properties": {"a": STRING}}, {"properties": {"a": INTEGER}}]},
     "allOf[1].properties.a", "twice"),
    ("allOf, closed part and another", {"allOf": [{"properties": {"a": STRING}, "additionalProperties": False},
                                                  {"properties": {"b": STRING}}]},
     "allOf[0].additionalProperties", "merges"),
    ("allOf, non-object part", {"allOf": [{"type": "string", "maxLength": 2}]}, "allOf[0].maxLength", "inside 'allOf'"),
    ("allOf, string part", {"allOf": [{"type": "string"}]}, "allOf[0].type", "another type"),
    ("allOf, oneOf part", {"allOf": [{"oneOf": [STRING]}]}, "allOf[0].oneOf", "inside 'allOf'"),
    ("allOf, chained $ref", {"allOf": [{"$ref": "#/$defs/A"}], "$defs": {"A": {"$ref": "#/$defs/B"}, "B": obj({})}},
     "$defs.A.$ref", "only one '$ref'"),
    ("allOf, sibling of $ref", {"allOf": [{"$ref": "#/$defs/A", "required": ["x"]}], "$defs": {"A": obj({})}},
     "allOf[0].required", "next to '$ref'"),
    ("allOf beside type string", {"type": "string", "allOf": [{"maxLength": 2}]}, "allOf", "not enforced"),
    ("allOf beside required", {"allOf": [{"properties": {"a": STRING}}], "required": ["a"]}, "required",
     "next to 'allOf'"),
    ("pattern, \\d", {"type": "string", "pattern": "^\\d+$"}, "pattern", "'\\d'"),
    ("deeper than the limit", _nested(MAX_DEPTH + 1), ".".join(["properties.a"] * (MAX_DEPTH + 1)), "deeper than"),
    ("left-recursive ref cycle", obj({"x": {"$ref": "#/$defs/A"}}, **{"$defs": {
        "A": {"$ref": "#/$defs/B"}, "B": {"anyOf": [{"$ref": "#/$defs/A"}, STRING]}}}),
     "$defs.B.anyOf[0].$ref", "left-recursive"),
    ("self reference", obj({"x": {"$ref": "#/$defs/A"}}, **{"$defs": {"A": {"$ref": "#/$defs/A"}}}), "$defs.A.$ref",
     "reaches itself"),
    ("$ref inside the definitions of a root $ref", {"$ref": "#/$defs/N", "$defs": {
        "N": obj({"n": {"anyOf": [{"$ref": "#/$defs/M"}, INTEGER]}}), "M": STRING}},
     "$defs.N.properties.n.anyOf[0].$ref", "'$ref' of its own"),
    ("allOf $ref inside the definitions of a root $ref", {"$ref": "#/$defs/N", "$defs": {
        "N": {"allOf": [{"$ref": "#/$defs/M"}]}, "M": obj({"a": STRING})}}, "$defs.N.allOf[0].$ref", "of its own"),
    # rule names the converter looks up by name and would confuse (found by the recording conversion)
    ("$ref name clashes with a property rule", obj({"A": {"enum": ["x"]}, "home": {"$ref": "#/$defs/A"}},
                                                   **{"$defs": {"A": obj({"z": STRING})}}),
     "properties.home.$ref", "would use the rule named 'A'"),
    ("$ref name clashes with a built-in", obj({"s": STRING, "x": {"$ref": "#/$defs/string"}},
                                              **{"$defs": {"string": {"type": "string", "maxLength": 3}}}),
     "properties.x.$ref", "'string'"),
    ("same last segment in $defs and definitions",
     obj({"a": {"$ref": "#/$defs/A"}, "b": {"$ref": "#/definitions/A"}},
         **{"$defs": {"A": {"enum": ["x"]}}, "definitions": {"A": {"enum": [1]}}}),
     "properties.b.$ref", "#/definitions/A"),
    ("recursive definition with an underscore", obj({"n": {"$ref": "#/$defs/My_Node"}}, **{"$defs": {"My_Node": obj({
        "kids": {"type": "array", "items": {"$ref": "#/$defs/My_Node"}}})}}), "properties.n.$ref",
     "'My_Node' that does not exist"),
    ("property named like a built-in dependency", obj({"decimal_part": {"enum": ["a"]}, "n": {"type": "number"}}),
     "properties.decimal_part", "'decimal-part'"),
]


@pytest.mark.parametrize(("schema", "path", "words"), [case[1:] for case in UNENFORCEABLE],
                         ids=[case[0] for case in UNENFORCEABLE])
def test_unenforceable_parts_are_named(schema, path, words):
    found = unenforceable(schema)
    assert found is not None, "accepted"
    assert found[0] == path, found
    assert words in found[1], found
    with pytest.raises(ValueError, match=re.escape(found[1])):
        schema_to_gbnf(schema)


PATTERNS_OK = ["^$", "^abc$", "^a|b$", "^(ab|cd)+e?$", "^[A-Za-z0-9_-]{1,8}$", "^x{3}y{2,}z{0,2}$", "^[é-ü]+$",
               "^é+ü$", "^\\(\\)$", "^(\\()*$", "^a b/c,d:e'f$", "^[\\x30-\\x39]$", "^[[a]$"]
PATTERNS_BAD = {
    "abc": "anchored", "^abc": "anchored", "abc$": "anchored", "^a\\$": "unescaped '$'", "^a(b$": "not a valid",
    "^a$|^b$": "'$' is only supported", "^a.b$": "'.' is not supported", "^[^a]$": "negated", "^\\w+$": "'\\w'",
    "^\\s$": "'\\s'", "^a\\.b$": "write [.]", "^\\\\$": "'\\\\'", "^(?:ab)$": "'(?'", "^(?=a)a$": "'(?'",
    "^a]$": "unescaped ']'", "^a}$": "unescaped '}'", "^a{$": "quantifier", "^a{,3}$": "quantifier",
    "^a*?$": "lazy", "^a{2}+$": "lazy", "^a{1001}$": "at most", "^a{0}$": "at least one", "^ab\\(*$": "group",
    "^()$": "empty", "^(a|)$": "empty", "^|a$": "empty", "^a||b$": "empty", '^"$': "quote", "^\t$": "control",
    '^[a"]$': "character class", "^[ -~]+$": "character class", "^[\\\\]$": "'\\\\' inside", "^[\\d]$": "'\\d' inside",
    "^[]a]$": "starting with ']'",
}


@pytest.mark.parametrize("pattern", PATTERNS_OK)
def test_supported_patterns(pattern, vocab):
    schema = {"type": "string", "pattern": pattern}
    assert unenforceable(schema) is None
    assert compiles(vocab, schema_to_gbnf(schema))


@pytest.mark.parametrize(("pattern", "words"), PATTERNS_BAD.items(), ids=list(PATTERNS_BAD))
def test_unsupported_patterns(pattern, words):
    found = unenforceable({"type": "string", "pattern": pattern})
    assert found is not None
    assert found[0] == "pattern", found
    assert words in found[1], found


def test_a_pattern_the_converter_would_loop_on_is_refused_quickly():
    # `_visit_pattern` never advances past an unescaped ']' or '}': converting these would hang
    for pattern in ("^a]$", "^}$"):
        assert unenforceable({"pattern": pattern})[0] == "pattern"
        with pytest.raises(ValueError, match="unescaped"):
            schema_to_gbnf({"pattern": pattern})


def test_paths_quote_awkward_names():
    schema = obj({"a.b": obj({"x y": {"type": "integer", "maximum": 3}})})
    assert unenforceable(schema)[0] == 'properties["a.b"].properties["x y"].maximum'


def test_the_first_problem_is_reported():
    schema = obj({"a": {"type": "integer", "minimum": 1}, "b": {"type": "string", "format": "email"}})
    assert unenforceable(schema)[0] == "properties.a.minimum"


# -- ref cycles and depth -------------------------------------------------------------------------------


def test_recursive_schemas_terminate_and_convert(vocab):
    tree = {"$defs": {"T": obj({"kids": {"type": "array", "items": {"$ref": "#/$defs/T"}}, "n": INTEGER},
                               ["kids", "n"])},
            "type": "array", "items": {"$ref": "#/$defs/T"}}
    assert unenforceable(tree) is None
    assert accepts(vocab, schema_to_gbnf(tree), '[{"kids": [{"kids": [], "n": 2}], "n": 1}]')
    assert not accepts(vocab, schema_to_gbnf(tree), '[{"kids": [{"kids": []}], "n": 1}]')


def test_a_problem_inside_a_recursive_definition_is_found_once():
    schema = obj({"t": {"$ref": "#/$defs/T"}}, **{"$defs": {"T": obj({
        "kids": {"type": "array", "items": {"$ref": "#/$defs/T"}}, "n": {"type": "integer", "maximum": 3}})}})
    assert unenforceable(schema) == ("$defs.T.properties.n.maximum", "'maximum' is not enforced by the grammar")


def test_a_long_chain_of_definitions_hits_the_depth_limit():
    defs = {f"D{i}": obj({"next": {"$ref": f"#/$defs/D{i + 1}"}}) for i in range(200)}
    defs["D200"] = INTEGER
    path, reason = unenforceable(obj({"x": {"$ref": "#/$defs/D0"}}, **{"$defs": defs}))
    assert "deeper than" in reason
    assert path.startswith("$defs.D")


@pytest.mark.parametrize("levels", [500, 5000])
def test_very_deep_schemas_are_refused_without_recursion_errors(levels):
    deep: dict = {"type": "integer"}
    for _ in range(levels):
        deep = {"type": "array", "items": deep}
    found = unenforceable(deep)
    assert found is not None
    assert "deeper than" in found[1]
    with pytest.raises(ValueError, match="deeper than"):
        schema_to_gbnf(deep)


def test_many_refs_to_one_definition_are_walked_once():
    # 25 levels each using the next twice: 2**25 walks without memoising
    defs = {f"D{i}": obj({"a": {"$ref": f"#/$defs/D{i + 1}"}, "b": {"$ref": f"#/$defs/D{i + 1}"}}) for i in range(25)}
    defs["D25"] = INTEGER
    schema = obj({"x": {"$ref": "#/$defs/D0"}}, **{"$defs": defs})
    assert unenforceable(schema) is None
    assert schema_to_gbnf(schema) == json_schema_to_gbnf(json.dumps(schema))


# -- the converter really ignores what is refused ---------------------------------------------------------


def test_the_converter_ignores_minimum():
    assert json_schema_to_gbnf(json.dumps({"type": "integer", "minimum": 5})) == json_schema_to_gbnf(
        json.dumps({"type": "integer"}))
    assert unenforceable({"type": "integer", "minimum": 5}) == ("minimum", "'minimum' is not enforced by the grammar")


# (schema, a document that breaks the schema yet the converter's grammar accepts)
LEAKS = {
    "minimum": ({"type": "integer", "minimum": 5}, "-3"),
    "uniqueItems": ({"type": "array", "items": INTEGER, "uniqueItems": True}, "[1, 1]"),
    "type list drops maxLength": ({"type": ["string", "null"], "maxLength": 2}, '"abcdef"'),
    "type list drops enum": ({"type": ["string", "null"], "enum": ["a", None]}, '"zzz"'),
    "$ref drops siblings": ({"$ref": "#/$defs/S", "maxLength": 1, "$defs": {"S": STRING}}, '"abc"'),
    # additionalProperties true: the converter types extra values as objects, and an extra key may be "a"
    "extra keys shadow properties": ({"properties": {"a": INTEGER}, "additionalProperties": True}, '{"a": {}}'),
    "extra schema shadows properties": ({"properties": {"a": INTEGER}, "additionalProperties": STRING}, '{"a": "x"}'),
    "undeclared required": (obj({"a": STRING}, ["b"]), "{}"),
    "oneOf as anyOf": ({"oneOf": [{"type": "number"}, INTEGER]}, "5"),
    "allOf drops closedness": ({"allOf": [{"properties": {"a": STRING}, "additionalProperties": False},
                                          {"properties": {"b": STRING}}]}, '{"a": "x", "b": "y"}'),
    "format email": ({"type": "string", "format": "email"}, '"not an email"'),
    "ref name clash": (obj({"A": {"enum": ["x"]}, "home": {"$ref": "#/$defs/A"}}, ["A", "home"],
                           **{"$defs": {"A": obj({"z": STRING}, ["z"])}}), '{"A": "x", "home": "x"}'),
}


@pytest.mark.parametrize(("schema", "document"), LEAKS.values(), ids=LEAKS.keys())
def test_what_is_refused_would_let_violating_output_through(schema, document, vocab):
    with pytest.raises(jsonschema.ValidationError):
        validate(json.loads(document), schema)
    assert accepts(vocab, json_schema_to_gbnf(json.dumps(schema)), document)  # the raw converter's grammar
    assert unenforceable(schema) is not None


# -- enforcement is real: llama.cpp's grammar against documents, token by token ------------------------

# (schema, documents the schema allows, documents it forbids); every document is checked with
# jsonschema first, so the table cannot be wrong about which is which
ENFORCED = {
    "closed object": (obj({"name": STRING, "age": INTEGER}, ["name"]),
                      ['{"name": "Ann"}', '{"name": "Ann", "age": 3}'],
                      ['{}', '{"age": 3}', '{"name": "Ann", "x": 1}', '{"name": 3}', '{"name": "Ann", "age": 1.5}']),
    "maxItems": ({"type": "array", "items": INTEGER, "minItems": 1, "maxItems": 2},
                 ["[1]", "[1, 2]"], ["[]", "[1, 2, 3]", '["a"]']),
    "tuple": ({"type": "array", "prefixItems": [INTEGER, STRING], "minItems": 2, "maxItems": 2},
              ['[1, "a"]'], ["[1]", '["a", 1]', '[1, "a", 2]']),
    "enum": ({"enum": ["café", 2, None]}, ['"café"', "2", "null"], ['"cafe"', "3", '"2"']),
    "const": ({"const": {"k": [1, "x"]}}, ['{"k": [1, "x"]}'], ['{"k": [1]}', '{"k": [1, "y"]}']),
    "lengths": ({"type": "string", "minLength": 2, "maxLength": 3}, ['"ab"', '"abc"'], ['"a"', '"abcd"', "12"]),
    "pattern": ({"type": "string", "pattern": "^[a-z]{2}-[0-9]+(x|yz)?$"},
                ['"ab-1"', '"zz-42yz"', '"ab-0x"'], ['"a-1"', '"ab-"', '"AB-1"', '"ab-1y"']),
    "repeated group": ({"type": "string", "pattern": "^(ab){2,3}é$"}, ['"ababé"', '"abababé"'],
                       ['"abé"', '"ababababé"', '"ababe"']),
    "escaped pattern": ({"type": "string", "pattern": "^\\(*a\\]$"}, ['"((a]"', '"a]"'], ['"(a"', '"\\\\a]"']),
    "formats": (obj({"d": {"type": "string", "format": "date"}, "u": {"type": "string", "format": "uuid"}},
                    ["d", "u"]),
                ['{"d": "2024-02-29", "u": "123e4567-e89b-12d3-a456-426614174000"}'],
                ['{"d": "2024-2-29", "u": "123e4567-e89b-12d3-a456-426614174000"}',
                 '{"d": "2024-02-29", "u": "123e4567e89b12d3a456426614174000"}']),
    "type list": ({"type": ["integer", "null"]}, ["3", "null"], ['"3"', "true"]),
    "anyOf": ({"anyOf": [{"type": "string", "maxLength": 1}, {"type": "boolean"}]}, ['"a"', "true"],
              ['"ab"', "1"]),
    "oneOf by discriminator": (ENFORCEABLE["oneOf by discriminator (pydantic)"],
                               ['{"kind": "cat", "lives": 9}', '{"kind": "wolf", "lives": 1}'],
                               ['{"kind": "cow", "lives": 1}', '{"kind": "cat"}']),
    "allOf": (ENFORCEABLE["allOf"], ['{"a": "x", "b": 1}', '{"a": "x", "b": 1, "c": "y", "d": "z"}'],
              ['{"a": "x"}', '{"b": 1}', '{"a": "x", "b": "1"}', '{"a": 1, "b": 1}']),
    "recursion": (ENFORCEABLE["recursion through properties"],
                  ['{"head": {"v": 1, "next": {"v": 2, "next": null}}}'],
                  ['{"head": {"v": 1, "next": {"v": 2}}}', '{"head": {"v": 1}}', "{}"]),
    "map": ({"type": "object", "additionalProperties": INTEGER}, ['{}', '{"x": 1, "y": 2}'], ['{"x": "1"}']),
}


@pytest.mark.parametrize(("schema", "good", "bad"), ENFORCED.values(), ids=ENFORCED.keys())
def test_the_grammar_accepts_what_the_schema_allows_and_nothing_else(schema, good, bad, vocab):
    assert unenforceable(schema) is None
    grammar = schema_to_gbnf(schema)
    for document in good:
        validate(json.loads(document), schema)
        assert accepts(vocab, grammar, document), document
    for document in bad:
        with pytest.raises(jsonschema.ValidationError):
            validate(json.loads(document), schema)
        assert not accepts(vocab, grammar, document), document


def test_a_bounded_array_gets_a_bounded_repetition():
    grammar = schema_to_gbnf({"type": "array", "items": INTEGER, "maxItems": 2})
    root = next(line for line in grammar.splitlines() if line.startswith("root ::="))
    assert "*" not in root
    assert "+" not in root
    assert root.count("integer") == 2


# -- helpers ---------------------------------------------------------------------------------------------


def validate(document, schema) -> None:
    jsonschema.validate(document, schema, cls=jsonschema.Draft202012Validator,
                        format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


@pytest.fixture(scope="module")
def vocab():
    """A tokenizer (the small packaged model, vocabulary only): what llama.cpp's grammar sampler needs."""
    llm = llama_cpp.Llama(model_path=str(model_path()), vocab_only=True, verbose=False)
    return llm, llm._model.vocab


def compiles(vocab, grammar: str) -> bool:
    sampler = llama_cpp.llama_sampler_init_grammar(vocab[1], grammar.encode("utf-8"), b"root")
    if not sampler:
        return False
    llama_cpp.llama_sampler_free(sampler)
    return True


def accepts(vocab, grammar: str, document: str) -> bool:
    """Whether llama.cpp's grammar sampler lets `document` be written, token by token, and then ends.

    Each token is offered alone to the sampler (a rejected one comes back with a -inf logit) before
    it is accepted, and at the end the end-of-generation token must be allowed: the grammar is
    complete. A rejected token is never accepted (llama.cpp would abort)."""
    llm, vocab_p = vocab
    tokens = llm.tokenize(document.encode("utf-8"), add_bos=False, special=False)
    assert llm.detokenize(tokens) == document.encode("utf-8")
    sampler = llama_cpp.llama_sampler_init_grammar(vocab_p, grammar.encode("utf-8"), b"root")
    assert sampler, grammar
    data = (llama_cpp.llama_token_data * 1)()
    candidates = llama_cpp.llama_token_data_array(data=data, size=1, selected=-1, sorted=False)

    def allowed(token: int) -> bool:
        data[0].id, data[0].logit, data[0].p = token, 0.0, 0.0
        candidates.size, candidates.selected = 1, -1
        llama_cpp.llama_sampler_apply(sampler, ctypes.byref(candidates))
        return data[0].logit != float("-inf")

    try:
        for token in tokens:
            if not allowed(token):
                return False
            llama_cpp.llama_sampler_accept(sampler, token)
        return allowed(llm.token_eos())
    finally:
        llama_cpp.llama_sampler_free(sampler)
