"""Translate the (overlaid) OpenAPI document into the source of the generated marshmallow module.

Only names, types, constraints and defaults are carried over, never the spec's prose. The output is
deterministic: components in name order, properties in spec order, literals through `repr`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

HTTP_METHODS = ("get", "post", "put", "patch", "delete")

# Operation groups whose schemas we generate: the ones localq implements now or will.
SCOPE_PREFIXES = (
    "/chat/completions",
    "/completions",
    "/embeddings",
    "/images/",
    "/audio/speech",
    "/audio/transcriptions",
    "/audio/translations",
    "/models",
    "/files",
    "/batches",
    "/moderations",
    "/organization/projects",
    "/organization/usage/",
    "/responses",
)

EXTENSIONS_MARKER = "x-localq-extensions-property"


def in_scope(path: str, operation: dict) -> bool:
    if "localq" in operation.get("tags", []):
        return True
    bare = path.split("?")[0]
    return any(bare == p.rstrip("/") or bare.startswith(p.rstrip("/") + "/") or bare.startswith(p) and p.endswith("/")
               for p in SCOPE_PREFIXES)


def camel(text: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in re.split(r"[^0-9A-Za-z]+", text) if part)


class Kwargs(list):
    """Keyword arguments of a field being written, plus its documentation-only metadata."""

    def __init__(self, items=(), meta: dict | None = None):
        super().__init__(items)
        self.meta = dict(meta or {})


@dataclass
class Generator:
    spec: dict
    schema_defs: dict[str, str] = field(default_factory=dict)  # name -> source of its definition
    type_defs: dict[str, str] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)
    # Descriptions written in our overlay: the only prose the generated module may carry.
    own_descriptions: frozenset[str] = frozenset()

    @property
    def components(self) -> dict:
        return self.spec["components"]["schemas"]

    # ----- resolving and normalising ----------------------------------------------------------

    def ref_name(self, node: dict) -> str | None:
        ref = node.get("$ref") if isinstance(node, dict) else None
        if ref and ref.startswith("#/components/schemas/"):
            return ref.rsplit("/", 1)[1]
        return None

    def deref(self, node: dict) -> dict:
        name = self.ref_name(node)
        return self.normalise(self.components[name]) if name else self.normalise(node)

    def normalise(self, node: Any) -> dict:
        """Merge allOf parts (later parts override, `required` collected) into one schema."""
        if not isinstance(node, dict):
            return {}
        for key in ("anyOf", "oneOf"):
            members = node.get(key)
            if members and len(members) == 2 and any(isinstance(m, dict) and m.get("type") == "null" for m in members):
                # `anyOf: [X, {type: null}]` is X, nullable
                (member,) = [m for m in members if not (isinstance(m, dict) and m.get("type") == "null")]
                siblings = {k: v for k, v in node.items() if k != key}
                if self.ref_name(member):
                    return {**siblings, **member, "nullable": True}
                return self.normalise({**member, **siblings, "nullable": True})
        if "allOf" not in node:
            return node
        parts = node["allOf"]
        siblings = {k: v for k, v in node.items() if k != "allOf"}
        if len(parts) == 1 and not self.is_object(self.deref(parts[0])) and not siblings.get("properties"):
            merged = dict(parts[0]) if self.ref_name(parts[0]) else dict(self.normalise(parts[0]))
            merged.update({k: v for k, v in siblings.items() if k not in ("description", "title")})
            return merged
        merged: dict = {}
        for part in [*parts, siblings]:
            resolved = self.deref(part) if part is not siblings else part
            for key, value in resolved.items():
                if key == "properties":
                    merged.setdefault("properties", {}).update(value)
                elif key == "required":
                    merged["required"] = list(dict.fromkeys([*merged.get("required", []), *value]))
                else:
                    merged[key] = value
        if "properties" in merged:
            merged.setdefault("type", "object")
        return merged

    @staticmethod
    def presence_groups(node: dict) -> list[list[str]] | None:
        """`anyOf`/`oneOf` members that only list required names: presence rules, not a union."""
        for key in ("anyOf", "oneOf"):
            members = node.get(key)
            if members and all(isinstance(m, dict) and set(m) <= {"required", "description"} and m.get("required")
                               for m in members):
                return [list(m["required"]) for m in members]
        return None

    def is_object(self, node: dict) -> bool:
        node = self.normalise(node)
        if any(k in node for k in ("oneOf", "anyOf")) and self.presence_groups(node) is None:
            return False
        return node.get("type") == "object" and "properties" in node or (
            "properties" in node and "type" not in node
        )

    def is_nullable(self, node: dict) -> bool:
        node = self.normalise(node)
        if node.get("nullable") is True:
            return True
        if isinstance(node.get("type"), list) and "null" in node["type"]:
            return True
        for key in ("anyOf", "oneOf"):
            if any(isinstance(m, dict) and m.get("type") == "null" for m in node.get(key, [])):
                return True
        name = self.ref_name(node)
        return bool(name) and self.is_nullable(self.components[name])

    # ----- field expressions -------------------------------------------------------------------

    def use_component(self, name: str) -> None:
        if name not in self.schema_defs and name not in self.type_defs and name not in self.pending:
            self.pending.append(name)

    def field(self, node: Any, owner: str, *, required: bool = False, nullable: bool = False) -> str:
        """Python source of a field that validates `node`; `owner` names inline object schemas."""
        if not isinstance(node, dict):
            node = {}
        nullable = nullable or self.is_nullable(node)
        kwargs = Kwargs()
        if node.get("description") in self.own_descriptions:
            kwargs.meta["description"] = node["description"]
        if required:
            kwargs.append("required=True")
        if nullable:
            kwargs.append("allow_none=True")

        node = self.normalise(node)
        name = self.ref_name(node)
        if name:
            self.use_component(name)
            default = node.get("default", self.components[name].get("default"))
            if default is not None and default_fits(self.deref(node), default):
                kwargs.meta["default"] = default
            if self.is_object(self.components[name]):
                return f"nested({name!r}{self._kw(kwargs)})"
            return f"Ref({name!r}{self._kw(kwargs)})"

        if "default" in node and node["default"] is not None and default_fits(node, node["default"]):
            kwargs.meta["default"] = node["default"]

        for key in ("oneOf", "anyOf"):
            if key in node and not self.is_object(node):
                members = [m for m in node[key] if not (isinstance(m, dict) and m.get("type") == "null")]
                if len(members) == 1:
                    inner = dict(members[0]) if isinstance(members[0], dict) else {}
                    if not self.ref_name(inner):
                        inner = {**{k: v for k, v in node.items() if k not in (key, "nullable")}, **inner}
                    return self.field(inner, owner, required=required, nullable=nullable)
                return self.union(members, node.get("discriminator"), owner, kwargs)

        types = node.get("type")
        if isinstance(types, list):
            real = [t for t in types if t != "null"]
            if len(real) != 1:
                members = [{**node, "type": t} for t in real]
                return self.union(members, None, owner, kwargs)
            types = real[0]

        if self.is_object(node):
            schema_name = owner
            self.define_object(schema_name, node)
            return f"nested({schema_name!r}{self._kw(kwargs)})"
        if types == "object" or (types is None and "additionalProperties" in node):
            extra = node.get("additionalProperties")
            names = node.get("propertyNames")
            if isinstance(names, dict) and names:
                kwargs.append(f"keys={self.field({'type': 'string', **names}, owner + 'Key')}")
            if isinstance(extra, dict) and extra:
                return f"MapOf({self.field(extra, owner + 'Value')}{self._kw(kwargs, lead=True)})"
            return f"MapOf({self._kw(kwargs, lead=False)})"
        if types == "array":
            validators = self.length_validator(node, "minItems", "maxItems")
            if validators:
                kwargs.append(f"validate=[{validators}]")
            items = self.field(node.get("items", {}), owner + "Item")
            return f"ListOf({items}{self._kw(kwargs, lead=True)})"

        if types is None and ("enum" in node or "const" in node):
            values = [v for v in node.get("enum", [node.get("const")]) if v is not None]
            kinds = {type(v) for v in values}
            types = {str: "string", int: "integer", float: "number", bool: "boolean"}.get(kinds.pop()) if len(kinds) == 1 else None
        validators = []
        if "enum" in node or "const" in node:
            choices = node.get("enum", [node.get("const")])
            choices = [c for c in choices if c is not None]
            if choices:
                validators.append(f"OneOf({choices!r})")
        if types in ("integer", "number"):
            rng = self.range_validator(node)
            if rng:
                validators.append(rng)
        if types == "string":
            length = self.length_validator(node, "minLength", "maxLength")
            if length:
                validators.append(length)
            if "pattern" in node:
                validators.append(f"Pattern({node['pattern']!r})")
        if validators:
            kwargs.append(f"validate=[{', '.join(validators)}]")
        if types == "string" and node.get("format") == "binary":
            return f"Binary({self._kw(kwargs, lead=False)})"
        fmt = node.get("format") if types in ("string", "integer", "number") else None
        if fmt:
            kwargs.meta["format"] = fmt
        cls = {"string": "Str", "integer": "Int", "number": "Num", "boolean": "Bool"}.get(types)
        if cls is None:
            kwargs = Kwargs([k for k in kwargs if not k.startswith("validate=")], kwargs.meta)
            return f"Any_({self._kw(kwargs, lead=False)})"
        return f"{cls}({self._kw(kwargs, lead=False)})"

    def union(self, members: list, discriminator: dict | None, owner: str, kwargs: list[str]) -> str:
        tag = (discriminator or {}).get("propertyName")
        if tag:
            tagged = self.tagged_members(members, tag, (discriminator or {}).get("mapping"), owner)
            if tagged is not None:
                body = ", ".join(f"{value!r}: {expr}" for value, expr in tagged)
                return f"Tagged({tag!r}, {{{body}}}{self._kw(kwargs, lead=True)})"
        parts = [self.field(m, f"{owner}{i}") for i, m in enumerate(members)]
        return f"Union([{', '.join(parts)}]{self._kw(kwargs, lead=True)})"

    def tagged_members(self, members: list, tag: str, mapping: dict | None, owner: str):
        """(tag value, field) pairs, from the mapping or each member's one-value enum; None if neither."""
        if mapping:
            by_ref = {ref: value for value, ref in mapping.items()}
        pairs = []
        for index, member in enumerate(members):
            resolved = self.deref(member)
            if not self.is_object(resolved):
                return None
            values = []
            if mapping and member.get("$ref") in by_ref:
                values = [by_ref[member["$ref"]]]
            else:
                prop = self.normalise(resolved.get("properties", {}).get(tag, {}))
                if self.ref_name(prop):
                    prop = self.deref(prop)
                values = prop.get("enum") or ([prop["const"]] if "const" in prop else [])
            if not values:
                return None
            expr = self.field(member, f"{owner}{index}")
            pairs.extend((value, expr) for value in values)
        # members sharing a tag value (a `message` that is an input or an output message) are
        # tried in turn under it
        grouped: dict[str, list[str]] = {}
        for value, expr in pairs:
            grouped.setdefault(value, []).append(expr)
        return [(value, exprs[0] if len(exprs) == 1 else f"Union([{', '.join(exprs)}])")
                for value, exprs in grouped.items()]

    def range_validator(self, node: dict) -> str | None:
        lo, hi = node.get("minimum"), node.get("maximum")
        lo_incl = hi_incl = True
        if isinstance(node.get("exclusiveMinimum"), int | float) and not isinstance(node.get("exclusiveMinimum"), bool):
            lo, lo_incl = node["exclusiveMinimum"], False
        elif node.get("exclusiveMinimum") is True:
            lo_incl = False
        if isinstance(node.get("exclusiveMaximum"), int | float) and not isinstance(node.get("exclusiveMaximum"), bool):
            hi, hi_incl = node["exclusiveMaximum"], False
        elif node.get("exclusiveMaximum") is True:
            hi_incl = False
        if lo is None and hi is None:
            return None
        args = [f"min={lo!r}", f"max={hi!r}"]
        if not lo_incl:
            args.append("min_inclusive=False")
        if not hi_incl:
            args.append("max_inclusive=False")
        return f"Range({', '.join(args)})"

    def length_validator(self, node: dict, lo_key: str, hi_key: str) -> str | None:
        lo, hi = node.get(lo_key), node.get(hi_key)
        if lo is None and hi is None:
            return None
        return f"Length(min={lo!r}, max={hi!r})"

    @staticmethod
    def _kw(kwargs: list[str], lead: bool = True) -> str:
        items = list(kwargs)
        if getattr(kwargs, "meta", None):
            items.append(f"metadata={kwargs.meta!r}")
        if not items:
            return ""
        return (", " if lead else "") + ", ".join(items)

    # ----- definitions -------------------------------------------------------------------------

    def define_object(self, name: str, node: dict) -> None:
        if name in self.schema_defs:
            return
        self.schema_defs[name] = ""  # reserve: recursion ends here
        node = self.normalise(node)
        required = set(node.get("required", []))
        lines = []
        for prop, sub in node.get("properties", {}).items():
            expr = self.field(sub, f"{name}_{camel(prop)}", required=prop in required)
            lines.append(f"    {prop!r}: {expr},")
        extra = node.get("additionalProperties")
        unknown = "include" if extra is True or (isinstance(extra, dict) and extra != {}) or extra == {} else "raise"
        body = "\n".join(lines)
        rules = ""
        groups = self.presence_groups(node)
        if groups:
            rules += f", required_any_of={tuple(tuple(g) for g in groups)!r}"
        forbidden = node.get("not", {}).get("required") if set(node.get("not", {})) == {"required"} else None
        if forbidden:
            rules += f", forbidden_together={tuple(forbidden)!r}"
        self.schema_defs[name] = f"object_schema({name!r}, {{\n{body}\n}}, unknown={unknown!r}{rules})\n"

    def define_component(self, name: str) -> None:
        node = self.components[name]
        if self.is_object(node):
            self.define_object(name, node)
            return
        if name in self.type_defs:
            return
        self.type_defs[name] = ""
        expr = self.field(node, name)
        self.type_defs[name] = f"define_type({name!r}, lambda: {expr})\n"

    def drain(self) -> None:
        while self.pending:
            self.define_component(self.pending.pop(0))


_JSON_TYPES = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
               "array": (list,), "object": (dict,)}


def default_fits(node: dict, default: Any) -> bool:
    """Whether a default agrees with its schema's type and enum (the spec has a few that do not)."""
    types = node.get("type")
    types = types if isinstance(types, list) else [types] if types else []
    if types and not any(isinstance(default, _JSON_TYPES.get(t, object)) and not (
            isinstance(default, bool) and t in ("integer", "number")) for t in types if t != "null"):
        return False
    return "enum" not in node or default in node["enum"]


def resolve_ref(spec: dict, node: dict) -> dict:
    while isinstance(node, dict) and "$ref" in node:
        section, name = node["$ref"].split("/")[-2:]
        node = spec["components"][section][name]
    return node
