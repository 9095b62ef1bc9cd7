"""Which JSON schemas a llama.cpp grammar can enforce exactly, and that grammar.

Structured outputs (`response_format` `json_schema`) and strict function tools promise output that
follows the client's schema. localq keeps that promise with a GBNF grammar made by llama-cpp-python's
converter (`llama_cpp.llama_grammar.SchemaConverter`), and the converter reads only part of JSON
Schema: it silently drops most keywords (minimum, uniqueItems, not, ...), drops others depending on
the branch it takes (every sibling of `$ref` or `anyOf`, everything but `type` when `type` is a list),
mistranslates some regular expressions and literals, and loops forever on a few. A grammar that
quietly lets violating output through breaks the promise, so `unenforceable` names the first part
of a schema the grammar would not enforce (the request becomes a 400 naming it) and
`schema_to_gbnf` converts only schemas that pass.

Accepted, because the converter enforces them (mirroring the branch `SchemaConverter.visit` takes):

- `type` (a JSON Schema type, or a list of them with nothing else beside it but annotations);
- `enum` and `const` (values whose JSON needs no escaping: no quote, backslash, control character
  or character beyond U+FFFF in any string or key; `type` beside them must fit every value, `enum`
  beside `const` must contain it);
- `properties`, `required` (each name must be in `properties`), `additionalProperties` (false, or
  a schema when there are no `properties`; the converter writes no undeclared key when it is absent,
  which is stricter, so fine);
- `items` (a non-empty schema, or a list: a tuple; `{}` makes the converter fail), `prefixItems`
  (with no `items` schema), `minItems` and `maxItems` (with an `items` schema; with a tuple only
  when they allow its length);
- `anyOf`; `oneOf` only when its alternatives cannot match the same value (different JSON types,
  disjoint `enum`/`const` values, or objects with a required property whose `const`/`enum` values
  differ), because the converter writes `oneOf` as `anyOf` and cannot forbid a value matching two;
- `allOf` in the one form the converter merges: object parts (optionally one `$ref` each, or an
  `anyOf` of such parts) of `properties`, with distinct property names, no `required` inside an
  `anyOf`, and `additionalProperties: false` only on the part that declares every property;
- `pattern` anchored `^...$` using literals, `\\` escapes of `[](){}|*+?`, non-negated character
  classes, groups, `|`, `*`, `+`, `?` and `{n}`/`{n,}`/`{n,m}`, and nothing that could write a
  quote, backslash or control character unescaped (so no `.`, no `[^...]`, no `\\d`/`\\w`/`\\s`);
- `minLength`/`maxLength` (on `"type": "string"`); `format` `date`, `time`, `date-time` (the grammar
  checks their shape and ranges, not the calendar: 2023-02-30 passes) and `uuid`;
- local `$ref` (`#/...`, into `$defs`, `definitions` or anywhere by plain JSON pointer), recursion
  included unless it reaches itself before writing anything (a left-recursive grammar).

Annotations, which constrain nothing: title, description, default, examples, example, $schema,
$id (at the root only: a nested one would move where `$ref`s resolve), $comment, $defs,
definitions, deprecated, readOnly, writeOnly, $anchor, $dynamicAnchor, $recursiveAnchor,
$vocabulary, discriminator (OpenAPI's hint beside `oneOf`) and `x-` extensions; also the no-op
values `uniqueItems: false`, `additionalProperties: true` (outside `properties`) and `required: []`.

Rejected: every other keyword, among them minimum, maximum, exclusiveMinimum, exclusiveMaximum,
multipleOf, uniqueItems, contains, minContains, maxContains, additionalItems, unevaluatedItems,
unevaluatedProperties, not, if/then/else, patternProperties, propertyNames, dependentRequired,
dependentSchemas, dependencies, minProperties, maxProperties, contentEncoding, contentMediaType and
contentSchema (clients may count on content the grammar cannot check), $dynamicRef, $recursiveRef,
other formats (`uuid1`..`uuid5` too: the version digit is not checked), unknown keywords (such as
OpenAPI's `nullable`); a schema with nothing to build from (say only a description: the converter
fails on it; `{}` is fine, written as any object); any accepted keyword on a branch
where the converter ignores it; boolean schemas where the converter expects an object; `$ref`s the
converter cannot resolve (external, `#`, pointer escapes, or inside a schema that has a `$ref` of
its own, such as definitions beside a root `$ref`; it resolves every `$ref` in the document, so
this holds in annotations and unused definitions too); nesting deeper than MAX_DEPTH; counts
above MAX_REPEAT.

Where the converter is stricter than the schema (fixed key order, no undeclared keys, one optional
space, integers and numbers without leading zeros or over 16 digits, `{}` meaning any object), the
output still follows the schema, so that is accepted.

Finally the schema is converted once with a converter that records its rule names, because the
converter finds `$ref` rules and its built-in rules by name: a definition or property whose rule
name clashes with another rule would silently stand in for it, and is rejected too.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from typing import Any, NamedTuple

from llama_cpp.llama_grammar import PRIMITIVE_RULES, STRING_FORMAT_RULES, SchemaConverter

__all__ = ["MAX_DEPTH", "MAX_REPEAT", "schema_to_gbnf", "unenforceable"]

MAX_DEPTH = 64  # nested subschemas (and `$ref`s followed) the walk goes through
MAX_REPEAT = 1000  # the largest count a grammar spells out (items, string length, regex quantifiers)

JSON_TYPES = frozenset({"string", "number", "integer", "boolean", "null", "object", "array"})
FORMATS = frozenset({"date", "time", "date-time", "uuid"})
ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "example", "$schema", "$comment", "$defs", "definitions",
    "deprecated", "readOnly", "writeOnly", "$anchor", "$dynamicAnchor", "$recursiveAnchor", "$vocabulary",
    "discriminator",
})
NEVER_ENFORCED = frozenset({
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "uniqueItems", "contains",
    "minContains", "maxContains", "additionalItems", "unevaluatedItems", "unevaluatedProperties", "not", "if", "then",
    "else", "patternProperties", "propertyNames", "dependentRequired", "dependentSchemas", "dependencies",
    "minProperties", "maxProperties", "contentEncoding", "contentMediaType", "contentSchema", "$dynamicRef",
    "$recursiveRef",
})
ENFORCED_SOMEWHERE = frozenset({
    "type", "enum", "const", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems",
    "maxItems", "anyOf", "oneOf", "allOf", "pattern", "minLength", "maxLength", "format", "$ref",
})
_IDENTIFIER = re.compile(r"[A-Za-z_$][\w$-]*")
_UNSAFE = "the converter writes it into the grammar without escaping quotes, backslashes or control characters"


class _Stop(Exception):
    def __init__(self, path: str, reason: str):
        super().__init__(path, reason)
        self.path, self.reason = path, reason


def unenforceable(schema: Any) -> tuple[str, str] | None:
    """The first part of `schema` the grammar would not enforce, as (path, reason), or None.

    The path is a location inside the schema such as `properties.age.minimum` or
    `$defs.Address.properties.zip.format` (a part reached through `$ref` is named where it is
    defined); the empty string means the schema itself."""
    return _examine(schema)[0]


def examine(schema: Any) -> tuple[tuple[str, str] | None, str]:
    """(the first part the grammar would not enforce, or None; the grammar text when there is none),
    from one walk and one conversion."""
    return _examine(schema)


def schema_to_gbnf(schema: dict) -> str:
    """The GBNF grammar (root rule `root`) that enforces `schema`; ValueError when it cannot."""
    problem, grammar = _examine(schema)
    if problem is not None:
        path, reason = problem
        raise ValueError(f"{path or 'the schema'}: {reason}")
    return grammar


#: Keywords that only narrow the values a schema allows: without them the rest still stands, looser.
DROPPABLE = frozenset({
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "uniqueItems", "contains",
    "minContains", "maxContains", "not", "if", "then", "else", "patternProperties", "propertyNames",
    "dependentRequired", "dependentSchemas", "dependencies", "minProperties", "maxProperties", "format", "pattern",
    "contentEncoding", "contentMediaType", "contentSchema", "minLength", "maxLength", "minItems", "maxItems",
    "unevaluatedItems", "unevaluatedProperties", "additionalItems", "nullable",
})
_PATH_PART = re.compile(r'\.?([A-Za-z_$][\w$-]*)|\[(\d+)\]|\[("(?:[^"\\]|\\.)*")\]')


def relaxed(schema: Any) -> dict | None:
    """`schema` without the narrowing keywords (`DROPPABLE`) the grammar cannot enforce, for a
    request that asked for no strictness: the grammar then enforces everything else (the shape,
    the names, the types), and the dropped rules are only checked afterwards, if at all. None when
    what stands in the way is not such a keyword."""
    try:
        doc = json.loads(json.dumps(schema))
    except (RecursionError, TypeError, ValueError):
        return None
    for _ in range(MAX_REPEAT):
        problem = unenforceable(doc)
        if problem is None:
            return doc
        parent, key, holder = _locate(doc, problem[0])
        if not isinstance(parent, dict) or key not in DROPPABLE or key not in parent or holder in _NAME_MAPS:
            return None  # (a property *named* "minimum" is a name, not a keyword)
        del parent[key]
    return None


_NAME_MAPS = frozenset({"properties", "$defs", "definitions", "patternProperties", "dependentSchemas"})


def _locate(doc: Any, path: str) -> tuple[Any, Any, Any]:
    """The container holding the part `path` names (as `_join` writes paths), its key there, and
    the key the container itself sits under."""
    keys: list[Any] = []
    position = 0
    while position < len(path):
        match = _PATH_PART.match(path, position)
        if match is None or match.end() == position:
            return None, None, None
        name, index, quoted = match.groups()
        keys.append(name if name is not None else int(index) if index is not None else json.loads(quoted))
        position = match.end()
    if not keys:
        return None, None, None
    node = doc
    for key in keys[:-1]:
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            return None, None, None
    return node, keys[-1], keys[-2] if len(keys) > 1 else None


def _examine(schema: Any) -> tuple[tuple[str, str] | None, str]:
    try:  # a private copy: the converter rewrites `$ref`s in place
        doc = json.loads(json.dumps(schema))
    except RecursionError:
        return ("", f"the schema nests deeper than {MAX_DEPTH} levels"), ""
    except (TypeError, ValueError) as exc:
        return ("", f"the schema is not JSON: {exc}"), ""
    walk = _Walk(doc)
    try:
        walk.check(doc, "", 0, ())
        for where, ref in walk.reached:  # the converter resolves these too, even where nothing uses them
            walk.resolve(ref, where)
    except _Stop as stop:
        return (stop.path, stop.reason), ""
    converter = _Converter()
    try:
        root = converter.visit(converter.resolve_refs(doc, "stdin"), "")
        grammar = converter.format_grammar()
    except Exception as exc:  # asserts, KeyErrors, ValueErrors, RecursionErrors, ...
        return ("", f"the converter cannot turn this schema into a grammar ({type(exc).__name__}: {exc})"), ""
    return _misnamed(converter, walk, root), grammar


# -- the walk --------------------------------------------------------------------------------------


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    if _IDENTIFIER.fullmatch(key):
        return f"{path}.{key}" if path else key
    return f"{path}[{json.dumps(key)}]"


def _branch(s: dict) -> str:
    """The branch `SchemaConverter.visit` takes for `s`, in its order."""
    t, fmt = s.get("type"), s.get("format")
    if s.get("$ref") is not None:
        return "ref"
    if "oneOf" in s or "anyOf" in s:
        return "union"
    if isinstance(t, list):
        return "types"
    if "const" in s:
        return "const"
    if "enum" in s:
        return "enum"
    if t in (None, "object") and (
        "properties" in s or ("additionalProperties" in s and s["additionalProperties"] is not True)
    ):
        return "object"
    if t in (None, "object") and "allOf" in s:
        return "allof"
    if t in (None, "array") and ("items" in s or "prefixItems" in s):
        return "array"
    if t in (None, "string") and "pattern" in s:
        return "pattern"
    if t in (None, "string") and isinstance(fmt, str) and (
        re.match(r"^uuid[1-5]?$", fmt) or f"{fmt}-string" in STRING_FORMAT_RULES
    ):
        return "format"
    if t == "string" and ("minLength" in s or "maxLength" in s):
        return "length"
    if t == "object" or len(s) == 0:
        return "anyobject"
    return "primitive"


def _union_key(s: dict) -> str:
    return "oneOf" if s.get("oneOf") else ("anyOf" if "anyOf" in s else "oneOf")


def _reads(branch: str, s: dict) -> tuple[frozenset, str]:
    """The keywords the converter reads on `branch`, and how to say where the others are ignored."""
    t = s.get("type")
    kind = f" on a {json.dumps(t)} schema" if isinstance(t, str) else ""
    return {
        "ref": (frozenset({"$ref"}), " next to '$ref'"),
        "union": (frozenset({_union_key(s)}), f" next to '{_union_key(s)}'"),
        "types": (frozenset({"type"}), " when 'type' is a list (use 'anyOf', one schema per type)"),
        "const": (frozenset({"const", "type", "enum"}), " next to 'const'"),
        "enum": (frozenset({"enum", "type"}), " next to 'enum'"),
        "object": (frozenset({"type", "properties", "required", "additionalProperties"}),
                   " next to 'properties'" if "properties" in s else " next to 'additionalProperties'"),
        "allof": (frozenset({"type", "allOf", "additionalProperties"}), " next to 'allOf'"),
        "array": (frozenset({"type", "items", "prefixItems", "minItems", "maxItems"}),
                  " next to 'items'" if s.get("items") else " next to 'prefixItems'"),
        "pattern": (frozenset({"type", "pattern"}), " next to 'pattern'"),
        "format": (frozenset({"type", "format"}), " next to 'format'"),
        "length": (frozenset({"type", "minLength", "maxLength"}), kind),
        "anyobject": (frozenset({"type"}), kind + " without 'properties'"),
        "primitive": (frozenset({"type"}), kind + (" without 'items'" if t == "array" else "")),
    }[branch]


class _Walk:
    def __init__(self, root: dict):
        self.root = root
        self.done: set[str] = set()  # `$ref`s whose targets were walked
        self.parts_done: set[int] = set()  # allOf parts whose properties were walked
        self.ref_paths: dict[str, str] = {}  # "#/..." -> where it is first used
        self.paths: dict[int, str] = {}  # id(schema) -> its path
        self.summaries: dict[int, _Summary | None] = {}
        self.hidden, self.reached = _scan_refs(root)

    def check(self, s: Any, path: str, depth: int, chain: tuple[str, ...]) -> None:
        """Walk schema `s`; `chain` holds the `$ref`s followed since the grammar last wrote a character."""
        if isinstance(s, bool):
            raise _Stop(path, "a boolean schema (true/false) is not supported by the converter here")
        if not isinstance(s, dict):
            raise _Stop(path, "a schema must be a JSON object")
        if depth > MAX_DEPTH:
            raise _Stop(path, f"the schema nests deeper than {MAX_DEPTH} levels")
        self.paths.setdefault(id(s), path)
        branch = _branch(s)
        reads, where = _reads(branch, s)
        self.keywords(s, path, reads, where)
        getattr(self, f"_{branch}")(s, path, depth, chain)

    def keywords(self, s: dict, path: str, reads: frozenset, where: str) -> None:
        for key, value in s.items():
            if key in reads or key in ANNOTATIONS or key.startswith("x-"):
                continue
            if key == "$id":
                if s is self.root:
                    continue
                raise _Stop(_join(path, key), "a nested '$id' moves where '$ref's inside it resolve; "
                                              "the converter ignores it")
            if (key, value) in (("uniqueItems", False), ("required", [])) or (
                key == "additionalProperties" and value is True
            ):
                continue
            raise _Stop(_join(path, key), _ignored(key, value, where))

    # -- branches (each after `keywords` has refused what the branch does not read) --

    def _ref(self, s: dict, path: str, depth: int, chain: tuple[str, ...]) -> None:
        ref = s["$ref"]
        target, target_path = self.resolve(ref, _join(path, "$ref"))
        if id(s) in self.hidden:
            raise _Stop(_join(path, "$ref"), _HIDDEN)
        if ref in chain:
            raise _Stop(_join(path, "$ref"), f"'$ref' {json.dumps(ref)} reaches itself before any value is written "
                                             "(the grammar would be left-recursive)")
        if ref not in self.done:
            self.done.add(ref)
            self.check(target, target_path, depth + 1, (*chain, ref))

    def _union(self, s: dict, path: str, depth: int, chain: tuple[str, ...]) -> None:
        key = _union_key(s)
        alternatives = s.get(key)
        if not isinstance(alternatives, list) or not alternatives:
            raise _Stop(_join(path, key), f"'{key}' must be a non-empty list of schemas")
        for index, alternative in enumerate(alternatives):
            self.check(alternative, _join(_join(path, key), index), depth + 1, chain)
        if key == "oneOf":
            summaries = [self.summary(alternative, 0) for alternative in alternatives]
            for i, later in enumerate(summaries):
                for j in range(i):
                    if not _apart(summaries[j], later):
                        raise _Stop(_join(path, key), f"alternatives {j} and {i} can match the same value, and the "
                                    "grammar enforces 'oneOf' as 'anyOf' (it cannot forbid a value matching both); use "
                                    "'anyOf', or tell them apart by type or by a required property's 'const'")

    def _types(self, s: dict, path: str, depth: int, chain: tuple[str, ...]) -> None:
        _check_type(s["type"], _join(path, "type"))

    def _const(self, s: dict, path: str, depth: int, chain: tuple[str, ...]) -> None:
        value = s["const"]
        _check_literal(value, _join(path, "const"))
        if "type" in s:
            _check_type(s["type"], _join(path, "type"))
            if not _fits(value, s["type"]):
                raise _Stop(_join(path, "const"), "the 'const' value does not match 'type' (the converter ignores "
                                                  "'type' next to 'const')")
        if "enum" in s and (not isinstance(s["enum"], list) or _canon(value) not in map(_canon, s["enum"])):
            raise _Stop(_join(path, "enum"), "'enum' is not enforced by the grammar next to 'const', and does not "
                                             "contain the 'const' value")

    def _enum(self, s: dict, path: str, depth: int, chain: tuple[str, ...]) -> None:
        values = s["enum"]
        if not isinstance(values, list) or not values:
            raise _Stop(_join(path, "enum"), "'enum' must be a non-empty list")
        if "type" in s:
            _check_type(s["type"], _join(path, "type"))
        for index, value in enumerate(values):
            _check_literal(value, _join(_join(path, "enum"), index))
            if "type" in s and not _fits(value, s["type"]):
                raise _Stop(_join(_join(path, "enum"), index), "the value does not match 'type' (the converter "
                                                               "ignores 'type' next to 'enum')")

    def _object(self, s: dict, path: str, depth: int, chain: tuple[str, ...]) -> None:
        properties = _check_properties(s, path)
        extra = s.get("additionalProperties", False)
        where = _join(path, "additionalProperties")
        if extra is not False and not (extra is True or isinstance(extra, dict)):
            raise _Stop(where, "'additionalProperties' must be true, false or a schema")
        if extra is not False and properties:
            raise _Stop(where, "the converter does not keep extra keys apart from the declared ones, so the grammar "
                               "could write a declared property with a value its schema forbids; set "
                               "'additionalProperties' to false")
        for name, part in properties.items():
            self.check(part, _join(_join(path, "properties"), name), depth + 1, ())
        if isinstance(extra, dict):
            self.check(extra, where, depth + 1, ())

    def _allof(self, s: dict, path: str, depth: int, chain: tuple[str, ...]) -> None:
        parts = s["allOf"]
        if not isinstance(parts, list):
            raise _Stop(_join(path, "allOf"), "'allOf' must be a list of schemas")
        merged = []  # (path, part, optional): what the converter merges into one object
        for index, part in enumerate(parts):
            where = _join(_join(path, "allOf"), index)
            if isinstance(part, dict) and "anyOf" in part:  # the converter reads only the anyOf of such a part
                self.keywords(part, where, frozenset({"anyOf"}), " next to 'anyOf' inside 'allOf'")
                alternatives = part["anyOf"]
                if not isinstance(alternatives, list) or not alternatives:
                    raise _Stop(_join(where, "anyOf"), "'anyOf' must be a non-empty list of schemas")
                for number, alternative in enumerate(alternatives):
                    merged.append((*self.allof_part(alternative, _join(_join(where, "anyOf"), number)), True))
            else:
                merged.append((*self.allof_part(part, where), False))
        seen: set[str] = set()
        for where, part, _ in merged:
            for name in part.get("properties", {}):
                if name in seen:
                    raise _Stop(_join(_join(where, "properties"), name),
                                f"property {json.dumps(name)} is also in another 'allOf' part; the converter would "
                                "write it twice")
                seen.add(name)
        for where, part, optional in merged:
            if part.get("additionalProperties") is False and not seen <= set(part.get("properties", {})):
                raise _Stop(_join(where, "additionalProperties"), "the converter merges the 'allOf' parts into one "
                            "object and drops this 'additionalProperties', which the other parts' properties break")
            if optional and part.get("required"):
                raise _Stop(_join(where, "required"), "'required' inside an 'anyOf' within 'allOf' is not enforced: "
                                                      "the converter makes those properties optional")
        for where, part, _ in merged:
            if id(part) not in self.parts_done:
                self.parts_done.add(id(part))
                for name, schema in part.get("properties", {}).items():
                    self.check(schema, _join(_join(where, "properties"), name), depth + 1, ())

    def allof_part(self, part: Any, where: str) -> tuple[str, dict]:
        """An allOf part as the converter reads it: following one `$ref`, only its `properties`."""
        if not isinstance(part, dict):
            raise _Stop(where, "an 'allOf' part must be a schema object")
        if part.get("$ref") is not None:
            self.keywords(part, where, frozenset({"$ref"}), " next to '$ref' inside 'allOf'")
            if id(part) in self.hidden:
                raise _Stop(_join(where, "$ref"), _HIDDEN)
            part, where = self.resolve(part["$ref"], _join(where, "$ref"))
            if not isinstance(part, dict):
                raise _Stop(where, "an 'allOf' part must be a schema object")
            if part.get("$ref") is not None:
                raise _Stop(_join(where, "$ref"), "the converter follows only one '$ref' for an 'allOf' part")
        self.keywords(part, where, frozenset({"type", "properties", "required", "additionalProperties"}),
                      " inside 'allOf'")
        if part.get("type", "object") != "object":
            raise _Stop(_join(where, "type"), "the converter merges 'allOf' parts into one object; a part of "
                                              "another type is not enforced")
        extra = part.get("additionalProperties", True)
        if not isinstance(extra, bool):
            raise _Stop(_join(where, "additionalProperties"), "'additionalProperties' inside 'allOf' is not enforced "
                                                              "by the grammar")
        _check_properties(part, where)
        return where, part

    def _array(self, s: dict, path: str, depth: int, chain: tuple[str, ...]) -> None:
        items = s.get("items")
        if items:
            key, shape = "items", items
            if "prefixItems" in s:
                raise _Stop(_join(path, "prefixItems"), "'prefixItems' is not enforced by the grammar next to "
                                                        "'items' (the converter reads only 'items')")
        else:
            if "items" in s and not (items == {} or items is False):
                raise _Stop(_join(path, "items"), "'items' must be a non-empty schema or list")
            if "prefixItems" not in s:
                raise _Stop(_join(path, "items"), f"'items': {json.dumps(items)} without 'prefixItems' is not "
                                                  "supported by the converter; give the items a schema")
            key, shape = "prefixItems", s["prefixItems"]
            if not isinstance(shape, list):
                raise _Stop(_join(path, key), "'prefixItems' must be a list of schemas")
        least = _count(s, "minItems", path)
        most = _count(s, "maxItems", path)
        if isinstance(shape, list):  # a tuple: the converter writes exactly one item per schema
            if least is not None and least > len(shape):
                raise _Stop(_join(path, "minItems"), f"the grammar writes exactly {len(shape)} items for this tuple, "
                                                     "fewer than 'minItems'")
            if most is not None and most < len(shape):
                raise _Stop(_join(path, "maxItems"), f"the grammar writes exactly {len(shape)} items for this tuple, "
                                                     "more than 'maxItems'")
            for index, item in enumerate(shape):
                self.check(item, _join(_join(path, key), index), depth + 1, ())
            return
        if not isinstance(shape, dict):
            raise _Stop(_join(path, key), "a boolean or non-object 'items' is not supported by the converter")
        if least is not None and most is not None and least > most:
            raise _Stop(_join(path, "minItems"), "'minItems' is above 'maxItems': no array satisfies it")
        self.check(shape, _join(path, key), depth + 1, ())

    def _pattern(self, s: dict, path: str, depth: int, chain: tuple[str, ...]) -> None:
        pattern = s["pattern"]
        problem = _pattern_problem(pattern) if isinstance(pattern, str) else "'pattern' must be a string"
        if problem:
            raise _Stop(_join(path, "pattern"), problem)

    def _format(self, s: dict, path: str, depth: int, chain: tuple[str, ...]) -> None:
        if s["format"] not in FORMATS:
            raise _Stop(_join(path, "format"), f"format {json.dumps(s['format'])} is not enforced by the grammar "
                                               "(it does not check the UUID version); use 'uuid'")

    def _length(self, s: dict, path: str, depth: int, chain: tuple[str, ...]) -> None:
        least, most = _count(s, "minLength", path), _count(s, "maxLength", path)
        if least is not None and most is not None and least > most:
            raise _Stop(_join(path, "minLength"), "'minLength' is above 'maxLength': no string satisfies it")

    def _anyobject(self, s: dict, path: str, depth: int, chain: tuple[str, ...]) -> None:
        pass

    def _primitive(self, s: dict, path: str, depth: int, chain: tuple[str, ...]) -> None:
        if "type" not in s:
            raise _Stop(path, "the converter cannot build a grammar from a schema with no 'type' (nor 'enum', "
                              "'const', 'properties', 'items', 'pattern', 'anyOf' or '$ref')")
        _check_type(s["type"], _join(path, "type"))

    # -- $ref --

    def resolve(self, ref: Any, where: str) -> tuple[Any, str]:
        """The schema a `$ref` names, and its path: local JSON pointers through objects only, as the
        converter follows them (it does not decode `~0`, `~1` or `%xx`)."""
        if not isinstance(ref, str):
            raise _Stop(where, "'$ref' must be a string")
        if ref == "#":
            raise _Stop(where, "a '$ref' to the whole schema ('#') is not supported by the converter")
        if not ref.startswith("#/"):
            raise _Stop(where, f"'$ref' {json.dumps(ref)} is not local; only '#/...' references are followed")
        target, path = self.root, ""
        for segment in ref[2:].split("/"):
            if not segment or any(c in segment for c in "~%#"):
                raise _Stop(where, f"'$ref' {json.dumps(ref)}: the converter does not handle empty segments or "
                                   "escapes ('~0', '~1', '%xx') in a JSON pointer")
            if not isinstance(target, dict) or segment not in target:
                raise _Stop(where, f"'$ref' {json.dumps(ref)} points at nothing in this schema")
            target, path = target[segment], _join(path, segment)
        self.ref_paths.setdefault(ref, where)
        return target, path

    # -- oneOf: what an alternative's grammar can write --

    def summary(self, s: Any, depth: int) -> _Summary | None:
        """The JSON kinds (and, when known, the literal values) the grammar for `s` writes; None: anything."""
        if not isinstance(s, dict) or depth > MAX_DEPTH:
            return None
        if id(s) in self.summaries:  # memoised; None while in progress, so recursion gives up
            return self.summaries[id(s)]
        self.summaries[id(s)] = None
        found = self._summarise(s, depth)
        self.summaries[id(s)] = found
        return found

    def _summarise(self, s: dict, depth: int) -> _Summary | None:
        branch = _branch(s)
        if branch == "ref":
            return self.summary(self.resolve(s["$ref"], "")[0], depth + 1)
        if branch == "union":
            parts = [self.summary(alternative, depth + 1) for alternative in s[_union_key(s)]]
            if any(part is None for part in parts):
                return None
            kinds = frozenset().union(*(part.kinds for part in parts))
            known = all(part.literals is not None for part in parts)
            return _Summary(kinds, frozenset().union(*(part.literals for part in parts)) if known else None, {})
        if branch in ("const", "enum"):
            values = [s["const"]] if branch == "const" else s["enum"]
            return _Summary(frozenset(map(_kind, values)), frozenset(map(_canon, values)), {})
        if branch == "types":
            return _Summary(frozenset(map(_kind_of_type, s["type"])), None, {})
        if branch == "object":
            tags = {}
            for name in s.get("required", []):
                part = self.summary(s["properties"][name], depth + 1)
                if part is not None and part.literals is not None:
                    tags[name] = part.literals
            return _Summary(frozenset({"object"}), None, tags)
        kind = {"allof": "object", "anyobject": "object", "array": "array", "pattern": "string", "format": "string",
                "length": "string"}.get(branch) or _kind_of_type(s["type"])
        return _Summary(frozenset({kind}), None, {})


_HIDDEN = ("this '$ref' sits inside a schema that has a '$ref' of its own (such as definitions beside a root "
           "'$ref'), where the converter does not resolve references; put the referenced schema at the root instead")


def _scan_refs(root: Any) -> tuple[set[int], list[tuple[str, Any]]]:
    """What `SchemaConverter.resolve_refs` does with the `$ref`s anywhere in the document (in
    annotations and unused definitions too): the ids of the schemas with a `$ref` it never reaches
    (it does not look inside a schema that has a `$ref`, so using them fails), and the (path, `$ref`)
    of those it resolves (any it cannot makes the conversion fail)."""
    hidden, reached, stack = set(), [], [(root, "", False)]
    while stack:
        node, path, under_ref = stack.pop()
        if isinstance(node, list):
            stack.extend((item, _join(path, index), under_ref) for index, item in enumerate(node))
        elif isinstance(node, dict):
            has_ref = node.get("$ref") is not None
            if has_ref and under_ref:
                hidden.add(id(node))
            elif has_ref:
                reached.append((_join(path, "$ref"), node["$ref"]))
            stack.extend((value, _join(path, key), under_ref or has_ref) for key, value in node.items()
                         if key != "$ref")
    return hidden, reached


class _Summary(NamedTuple):
    kinds: frozenset  # "string", "number" (integers too), "boolean", "null", "object", "array"
    literals: frozenset | None  # canonical values, when the grammar writes only these
    tags: dict  # required property -> its literal values (objects only)


def _apart(a: _Summary | None, b: _Summary | None) -> bool:
    """Whether no value the grammar writes for one alternative can match the other."""
    if a is None or b is None:
        return False
    for kind in a.kinds & b.kinds:
        if a.literals is not None and b.literals is not None:
            if {v for v in a.literals if v[0] == kind} & {v for v in b.literals if v[0] == kind}:
                return False
        elif not (kind == "object" and any(name in b.tags and not a.tags[name] & b.tags[name] for name in a.tags)):
            return False
    return True


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", dict: "object", list: "array"}.get(type(value), "null")


def _kind_of_type(name: str) -> str:
    return "number" if name == "integer" else name


def _canon(value: Any) -> tuple:
    """A hashable form of a JSON value under JSON Schema equality (1 == 1.0, true != 1)."""
    kind = _kind(value)
    if kind == "number":
        return (kind, int(value) if isinstance(value, float) and value.is_integer() else value)
    if kind == "object":
        return (kind, tuple(sorted((k, _canon(v)) for k, v in value.items())))
    if kind == "array":
        return (kind, tuple(map(_canon, value)))
    return (kind, value)


# -- values ------------------------------------------------------------------------------------------


def _ignored(key: str, value: Any, where: str) -> str:
    if key == "format":
        known = value in FORMATS
        return f"format {json.dumps(value)} is not enforced by the grammar" + (
            where if known else " (the converter knows only date, time, date-time and uuid)")
    if key in NEVER_ENFORCED:
        return f"'{key}' is not enforced by the grammar"
    if key in ENFORCED_SOMEWHERE:
        return f"'{key}' is not enforced by the grammar{where}"
    return f"unknown keyword '{key}' is not enforced by the grammar"


def _check_type(t: Any, where: str) -> None:
    names = t if isinstance(t, list) else [t]
    if not names:
        raise _Stop(where, "an empty 'type' list allows no value")
    for index, name in enumerate(names):
        if not isinstance(name, str) or name not in JSON_TYPES:
            raise _Stop(_join(where, index) if isinstance(t, list) else where,
                        f"{json.dumps(name)} is not a JSON Schema type")


def _fits(value: Any, t: Any) -> bool:
    names = t if isinstance(t, list) else [t]
    kind = _kind(value)
    return any(
        name == kind or (name == "integer" and kind == "number" and (isinstance(value, int) or value.is_integer()))
        or (name == "number" and kind == "number")
        for name in names
    )


def _safe_text(text: str) -> bool:
    """Whether the converter copies `text` into a grammar literal intact (json.dumps needs no escape
    other than \\uXXXX for a character up to U+FFFF)."""
    return not any(c in '"\\' or ord(c) < 0x20 or 0xD800 <= ord(c) <= 0xDFFF or ord(c) > 0xFFFF for c in text)


def _check_literal(value: Any, where: str) -> None:
    if isinstance(value, str) and not _safe_text(value):
        raise _Stop(where, f"this string has a quote, backslash, control character or character beyond U+FFFF, and "
                           f"{_UNSAFE}")
    if isinstance(value, float) and not math.isfinite(value):
        raise _Stop(where, "a number that is not finite has no JSON form")
    if isinstance(value, list):
        for index, item in enumerate(value):
            _check_literal(item, _join(where, index))
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "$ref":
                raise _Stop(_join(where, key), "the converter treats a '$ref' key as a reference even inside a value")
            _check_literal(key, where)
            _check_literal(item, _join(where, key))


def _check_properties(s: dict, path: str) -> dict:
    properties = s.get("properties", {})
    if not isinstance(properties, dict):
        raise _Stop(_join(path, "properties"), "'properties' must map names to schemas")
    for name in properties:
        if not _safe_text(name):
            raise _Stop(_join(_join(path, "properties"), name), f"this property name has a quote, backslash, control "
                                                                f"character or character beyond U+FFFF, and {_UNSAFE}")
    required = s.get("required", [])
    if not isinstance(required, list):
        raise _Stop(_join(path, "required"), "'required' must be a list of property names")
    for index, name in enumerate(required):
        if not isinstance(name, str) or name not in properties:
            raise _Stop(_join(_join(path, "required"), index), f"required property {json.dumps(name)} has no schema "
                                                               "under 'properties', so the grammar never writes it")
    return properties


def _count(s: dict, key: str, path: str) -> int | None:
    value = s.get(key)
    if value is None and key not in s:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _Stop(_join(path, key), f"'{key}' must be a non-negative integer")
    if value > MAX_REPEAT:
        raise _Stop(_join(path, key), f"'{key}' above {MAX_REPEAT} is not supported (the grammar spells out every "
                                      "repetition)")
    return value


# -- pattern ----------------------------------------------------------------------------------------

_LITERAL_ESCAPES = "[](){}|*+?"  # what `_visit_pattern` turns into plain characters after a backslash
_UNSAFE_CHARS = "a quote, a backslash or a control character, which the grammar would write unescaped"
_QUANTIFIER = re.compile(r"\{(\d+)(,(\d*))?\}")


def _pattern_problem(pattern: str) -> str | None:
    """Why the converter cannot translate `pattern` faithfully into a grammar, or None.

    `_visit_pattern` is a one-pass translation: it needs `^...$`, treats a later `^` or `$` as a
    plain character, fails on `(?`, passes regex escapes such as `\\d` to GBNF (which rejects
    them), loops forever on an unescaped `]` or `}`, and repeats a whole literal run when a
    quantifier follows an escaped character. Its output is the raw text of the JSON string, so it
    must never be able to write a quote, backslash or control character."""
    if len(pattern) < 2 or pattern[0] != "^" or pattern[-1] != "$":
        return "the converter needs the pattern anchored: it must start with '^' and end with '$'"
    body = pattern[1:-1]
    if (len(body) - len(body.rstrip("\\"))) % 2:
        return "the pattern must end with an unescaped '$'"
    try:
        with warnings.catch_warnings():  # "possible nested set" and the like
            warnings.simplefilter("ignore")
            re.compile(pattern)
    except re.error as exc:
        return f"this is not a valid regular expression ({exc})"
    i, run, previous = 0, 0, "start"  # run: literal characters the converter has joined so far
    while i < len(body):
        c = body[i]
        if c == "\\":
            escaped = body[i + 1]
            if escaped not in _LITERAL_ESCAPES:
                hint = {"d": "; write [0-9]", ".": "; write [.]"}.get(escaped, "")
                return f"the escape '\\{escaped}' is not supported by the converter{hint}"
            if run and body[i + 2:i + 3] in ("*", "+", "?", "{"):
                return f"the converter would repeat the whole literal before '\\{escaped}', not only '{escaped}'; " \
                       f"write it in a group: (\\{escaped})"
            i, run, previous = i + 2, run + 1, "atom"
        elif c in "^$":
            return f"'{c}' is only supported at the very start or end of the pattern"
        elif c == ".":
            return f"'.' is not supported: it could match {_UNSAFE_CHARS}; use a character class"
        elif c == "(":
            if body[i + 1:i + 2] == "?":
                return "groups starting '(?' (non-capturing, lookaround, named) are not supported by the converter"
            if body[i + 1:i + 2] in (")", "|"):
                return "empty groups or alternatives are not supported"
            i, run, previous = i + 1, 0, "open"
        elif c == ")":
            i, run, previous = i + 1, 0, "atom"
        elif c == "|":
            if body[i + 1:i + 2] in ("", "|", ")") or previous in ("start", "open"):
                return "empty groups or alternatives are not supported"
            i, run, previous = i + 1, 0, "alternative"
        elif c == "[":
            i, problem = _class_problem(body, i)
            if problem:
                return problem
            run, previous = 0, "atom"
        elif c in "*+?{":
            if c == "{":
                match = _QUANTIFIER.match(body, i)
                if not match:
                    return "a '{' that is not a quantifier ({n}, {n,} or {n,m}) is not supported; write '\\{'"
                counts = [int(n) for n in (match.group(1), match.group(3)) if n]
                if max(counts) > MAX_REPEAT or (match.group(2) and match.group(3) == "0") or match.group(0) == "{0}":
                    return f"quantifier {match.group(0)} is not supported (at most {MAX_REPEAT}, at least one)"
                step = match.end() - i
            else:
                step = 1
            if previous == "quantifier":
                return "lazy or possessive quantifiers ('*?', '+?', '*+', ...) are not supported by the converter"
            i, run, previous = i + step, 0, "quantifier"
        elif c in "]}":
            return f"an unescaped '{c}' is not supported by the converter; write '\\{c}'"
        elif c == '"' or ord(c) < 0x20:
            return f"the pattern could match {_UNSAFE_CHARS}"
        else:
            i, run, previous = i + 1, run + 1, "atom"
    return None


def _class_problem(body: str, i: int) -> tuple[int, str | None]:
    """Check the character class at body[i] ('['), as GBNF will read it: plain characters, `\\[`,
    `\\]`, `\\xHH`, `\\uHHHH` and ranges. Returns the index after it and any problem."""
    j = i + 1
    if body[j:j + 1] == "^":
        return j, f"negated classes [^...] are not supported: they could match {_UNSAFE_CHARS}"
    if body[j:j + 1] == "]":
        return j, "a class starting with ']' is not supported by the converter; write '\\]'"

    def char(k: int) -> tuple[int, int | str]:
        if body[k] != "\\":
            return k + 1, ord(body[k])
        escaped = body[k + 1:k + 2]
        if escaped in ("[", "]"):
            return k + 2, ord(escaped)
        digits = {"x": 2, "u": 4}.get(escaped)
        if digits and re.fullmatch(r"[0-9a-fA-F]+", body[k + 2:k + 2 + digits] or "-") and len(
                body[k + 2:k + 2 + digits]) == digits:
            return k + 2 + digits, int(body[k + 2:k + 2 + digits], 16)
        return k, f"the escape '\\{escaped}' inside a character class is not supported by the converter"

    while body[j] != "]":
        j, low = char(j)
        if isinstance(low, str):
            return j, low
        high = low
        if body[j] == "-" and body[j + 1] != "]":
            j, high = char(j + 1)
            if isinstance(high, str):
                return j, high
        if low <= 0x1F or any(low <= c <= high for c in (0x1F, 0x22, 0x5C)):
            return j, f"this character class could match {_UNSAFE_CHARS}"
    return j + 1, None


# -- the conversion ------------------------------------------------------------------------------------

_BUILTINS = {**PRIMITIVE_RULES, **STRING_FORMAT_RULES}
_BY_CONTENT = {rule.content: rule for rule in _BUILTINS.values()}


class _Converter(SchemaConverter):
    """json_schema_to_gbnf's converter, recording which schema each rule name was made for."""

    def __init__(self):
        super().__init__(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
        self.made: dict[str, list[dict]] = {}
        self.uses: list[tuple[str, str]] = []

    def visit(self, schema, name):
        rule = super().visit(schema, name)
        self.made.setdefault(rule, []).append(schema)
        return rule

    def _resolve_ref(self, ref):
        rule = super()._resolve_ref(ref)
        self.uses.append((ref, rule))
        return rule


def _misnamed(converter: _Converter, walk: _Walk, root: str) -> tuple[str, str] | None:
    """A rule the converter found by name but made for another schema (see the module docstring)."""
    if root != "root":
        return "", "the converter did not name this schema's rule 'root'"
    for ref, rule in converter.uses:
        target = converter._refs[ref]
        if not any(made is target for made in converter.made.get(rule, ())):
            local = ref[ref.index("#"):]
            found = (f"would use the rule named '{rule}', made for another part of the schema, in its place"
                     if rule in converter._rules else
                     f"would refer to a rule named '{rule}' that does not exist (it renamed the rule it made)")
            return walk.ref_paths.get(local, ""), (
                f"the converter finds the rule for '$ref' {json.dumps(local)} by the pointer's last segment and "
                f"{found}; rename the definition (letters, digits and '-', unlike any other definition or property)")
    rules = converter._rules
    for body in list(rules.values()):
        builtin = _BY_CONTENT.get(body)
        for dep in builtin.deps if builtin else ():
            if rules.get(dep) != _BUILTINS[dep].content:
                culprit = next(iter(converter.made.get(dep, ())), None)
                return walk.paths.get(id(culprit), ""), (
                    f"the converter names this part's rule '{dep}', like one of its built-in rules, and would use it "
                    "in the built-in's place; rename it")
    return None
