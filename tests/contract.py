"""Response bodies checked against OpenAPI component schemas, read as JSON Schema.

`upstream()` is OpenAI's spec (`../shared/openai-openapi/`) with localq's overlay applied, exactly
what `python -m schemas.generate` reads, so localq's own objects (jobs, workers, tokenize) are
checked the same way as OpenAI's. The spec is an OpenAPI 3.1 document that still writes OAS 3.0's
`nullable: true` in places; that is read as also allowing null. Everything else is the spec's own
JSON Schema, `additionalProperties` included (absent means extra properties are allowed).
`Contract(document)` does the same for any document, such as the one a server serves.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from jsonschema import Draft202012Validator, FormatChecker
from jsonschema.exceptions import ValidationError
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from schemas.generate import load_document
from tests.upstream import require_spec

BASE = "urn:localq:contract"


def allow_null(node: Any) -> Any:
    """A copy of a schema tree with each OAS 3.0 `nullable: true` turned into an `anyOf` with null."""
    if isinstance(node, list):
        return [allow_null(item) for item in node]
    if not isinstance(node, dict):
        return node
    converted = {key: allow_null(value) for key, value in node.items()}
    if converted.get("nullable") is True:
        del converted["nullable"]
        return {"anyOf": [converted, {"type": "null"}]}
    return converted


def _describe(error: ValidationError) -> str:
    where = "/".join(str(part) for part in error.absolute_path) or "(top)"
    text = f"{where}: {error.message[:300]}"
    if error.context:  # anyOf / oneOf: say why each branch failed
        reasons = sorted({f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message[:200]}"
                          for e in error.context})
        text += "\n      " + "\n      ".join(reasons[:8])
    return text


class Contract:
    """The component schemas of one OpenAPI document, ready to validate instances."""

    def __init__(self, document: dict, label: str):
        self.document = allow_null(document)
        self.label = label
        resource = Resource.from_contents(self.document, default_specification=DRAFT202012)
        self._registry = Registry().with_resource(BASE, resource)
        self._validators: dict[str, Draft202012Validator] = {}

    def has(self, schema_name: str) -> bool:
        return schema_name in self.document.get("components", {}).get("schemas", {})

    def validator(self, schema_name: str) -> Draft202012Validator:
        if not self.has(schema_name):
            raise KeyError(f"no component schema {schema_name!r} in {self.label}")
        if schema_name not in self._validators:
            self._validators[schema_name] = Draft202012Validator(
                {"$ref": f"{BASE}#/components/schemas/{schema_name}"}, registry=self._registry,
                format_checker=FormatChecker())
        return self._validators[schema_name]

    def violations(self, schema_name: str, instance: Any) -> list[str]:
        """What in `instance` breaks the component schema `schema_name` (empty when it conforms)."""
        return [_describe(error) for error in self.validator(schema_name).iter_errors(instance)]

    def assert_conforms(self, schema_name: str, instance: Any, what: str = "") -> None:
        found = self.violations(schema_name, instance)
        label = f"{what} as {schema_name} of {self.label}" if what else f"{schema_name} of {self.label}"
        assert not found, f"{label} breaks the schema:\n  " + "\n  ".join(found) + f"\nbody: {str(instance)[:1500]}"


@cache
def upstream() -> Contract:
    """OpenAI's spec plus localq's overlay (a missing spec skips the test, or fails it under CI)."""
    require_spec()
    return Contract(load_document(), "the upstream spec")
