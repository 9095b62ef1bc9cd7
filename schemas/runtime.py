"""The building blocks the generated schemas are made of.

marshmallow validates objects, lists and scalars well; OpenAI's spec also needs strict JSON types
(a string is not a number), unions tried in order, unions picked by a tag, open enums, lazily
resolved references (the spec is recursive) and file parts of multipart bodies. Those live here,
hand-written and tested, so that the generated module stays a plain table of declarations.

Error messages carry the token `$param`; `schemas.errors` replaces it with the path of the
offending value (`messages[0].content`) once that path is known. Each message is a `Message`: its
OpenAI error code travels with it as data, through marshmallow's error structures, to the client.
"""

from __future__ import annotations

import keyword
import math
from collections.abc import Callable, Mapping
from typing import Any

from marshmallow import EXCLUDE, INCLUDE, RAISE, Schema, ValidationError, fields, validate, validates_schema

PARAM = "$param"

# OpenAI's error codes for request validation.
MISSING = "missing_required_parameter"
UNKNOWN = "unknown_parameter"
INVALID_TYPE = "invalid_type"
INVALID_VALUE = "invalid_value"


class Message(str):
    """An error message that carries its OpenAI error `code`; formatting it keeps the code
    (marshmallow formats the messages it is given before raising them)."""

    code: str

    def __new__(cls, text: str, code: str = INVALID_VALUE):
        message = super().__new__(cls, text)
        message.code = code
        return message

    def __getnewargs__(self):  # copy and pickle: marshmallow deep-copies fields with their messages
        return str(self), self.code

    def format(self, *args, **kwargs) -> Message:
        return Message(str.format(self, *args, **kwargs), self.code)


def code_of(message: str) -> str:
    """The error code a validation message carries; marshmallow's own messages are about values."""
    return getattr(message, "code", INVALID_VALUE)


# Every schema class the generated module defines, by its component name.
REGISTRY: dict[str, type[Schema]] = {}
# Every non-object component (unions, enums, scalars), by name: a factory of a fresh field.
TYPES: dict[str, Callable[..., fields.Field]] = {}


def kind_of(value: Any) -> str:
    """The JSON type of a decoded JSON value, in the words OpenAI's error messages use."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, Mapping):
        return "object"
    if is_file(value):
        return "file"
    return type(value).__name__


_ARTICLE = {
    "integer": "an integer",
    "number": "a number",
    "string": "a string",
    "boolean": "a boolean",
    "array": "an array",
    "object": "an object",
    "null": "null",
    "file": "a file",
}


def describe_kind(kind: str) -> str:
    return _ARTICLE.get(kind, kind)


def type_error(expected: list[str], value: Any) -> ValidationError:
    names = [describe_kind(k) for k in dict.fromkeys(expected)]
    wanted = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
    got = describe_kind(kind_of(value))
    text = f"Invalid type for {PARAM}: expected {wanted}, but got {got} instead."
    return ValidationError(Message(text, INVALID_TYPE))


def is_file(value: Any) -> bool:
    return hasattr(value, "stream") and hasattr(value, "filename")


def _common_messages() -> dict[str, str]:
    return {
        "required": Message(f"Missing required parameter: {PARAM}.", MISSING),
        "null": Message(f"Invalid type for {PARAM}: expected a value, but got null instead.", INVALID_TYPE),
    }


class _Strict:
    """Mixin: accept only the JSON kinds listed in `accepts`."""

    accepts: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()  # what the field is documented as, for error messages

    def _check_kind(self, value: Any) -> None:
        if kind_of(value) not in self.accepts:
            raise type_error(list(self.kinds or self.accepts), value)


class Str(_Strict, fields.String):
    accepts = ("string",)
    default_error_messages = _common_messages()

    def _deserialize(self, value, attr, data, **kwargs):
        self._check_kind(value)
        return value


class Int(_Strict, fields.Integer):
    accepts = ("integer", "number")
    kinds = ("integer",)
    default_error_messages = _common_messages()

    def _deserialize(self, value, attr, data, **kwargs):
        self._check_kind(value)
        if isinstance(value, float):
            if not (math.isfinite(value) and value.is_integer()):
                raise type_error(["integer"], value)
            value = int(value)
        return value


class Num(_Strict, fields.Float):
    accepts = ("integer", "number")
    kinds = ("number",)
    default_error_messages = _common_messages()

    def _deserialize(self, value, attr, data, **kwargs):
        self._check_kind(value)
        return value


class Bool(_Strict, fields.Boolean):
    accepts = ("boolean",)
    default_error_messages = _common_messages()

    def _deserialize(self, value, attr, data, **kwargs):
        self._check_kind(value)
        return value


class Any_(fields.Raw):
    """Any JSON value: the spec's `{}` and untyped schemas."""

    default_error_messages = _common_messages()


class Binary(fields.Raw):
    """A file part of a multipart body (`type: string, format: binary`)."""

    default_error_messages = _common_messages()

    def _deserialize(self, value, attr, data, **kwargs):
        if not is_file(value):
            raise ValidationError(Message(
                f"Invalid type for {PARAM}: expected a file upload, but got {describe_kind(kind_of(value))} instead.",
                INVALID_TYPE))
        return value


class ListOf(fields.List):
    default_error_messages = _common_messages()

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, list):
            raise type_error(["array"], value)
        # the length first: a list over its maxItems is refused as that, before any item is
        # loaded (100,000 inputs are "too many", not "input[0]: expected an integer")
        for validator in self.validators:
            if isinstance(validator, Length):
                validator(value)
        return super()._deserialize(value, attr, data, **kwargs)


class MapOf(fields.Field):
    """An object used as a map (`additionalProperties: <schema>`); errors keyed by the map key."""

    default_error_messages = _common_messages()

    def __init__(self, values: fields.Field | None = None, *, keys: fields.Field | None = None, **kwargs):
        super().__init__(**kwargs)
        self.value_field = values
        self.key_field = keys  # `propertyNames`: what every key must look like

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, Mapping):
            raise type_error(["object"], value)
        if self.key_field is not None:
            for key in value:
                try:
                    self.key_field.deserialize(key)
                except ValidationError as err:
                    # about the map: a key is not a place a value sits at
                    raise ValidationError(Message(f"Invalid key in {PARAM}: " + _first_text(err.messages))) from None
        if self.value_field is None:
            return dict(value)
        result, errors = {}, {}
        for key, item in value.items():
            try:
                result[key] = self.value_field.deserialize(item)
            except ValidationError as err:
                errors[key] = err.messages
        if errors:
            raise ValidationError(errors)
        return result


def _first_text(messages: Any) -> str:
    """The first message of a marshmallow error structure, with its `$param` token dropped."""
    while isinstance(messages, dict | list):
        messages = next(iter(messages.values() if isinstance(messages, dict) else messages), "")
    text = str(messages)
    return text.split(": ", 1)[1] if text.startswith("Invalid value for " + PARAM) else text


class Obj(fields.Nested):
    """A nested object schema, given by a callable so that forward and recursive references work."""

    default_error_messages = {**_common_messages(), "type": Message(f"Invalid type for {PARAM}: expected an object.",
                                                                    INVALID_TYPE)}

    def _deserialize(self, value, attr, data, partial=None, **kwargs):
        if not isinstance(value, Mapping):
            raise type_error(["object"], value)
        return super()._deserialize(value, attr, data, partial=partial, **kwargs)


class Ref(fields.Field):
    """A reference to a named non-object component (a union, an enum), resolved on first use."""

    default_error_messages = _common_messages()

    def __init__(self, name: str, **kwargs):
        super().__init__(**kwargs)
        self.name = name
        self._target: fields.Field | None = None

    @property
    def target(self) -> fields.Field:
        if self._target is None:
            self._target = TYPES[self.name]()
        return self._target

    def _deserialize(self, value, attr, data, **kwargs):
        return self.target.deserialize(value)


def _error_depth(messages: Any) -> int:
    """How far into a value a member got before it failed: deeper errors are closer misses."""
    if isinstance(messages, dict):
        return 1 + max((_error_depth(m) for m in messages.values()), default=0)
    return 0


def field_kinds(field: fields.Field) -> tuple[str, ...]:
    """The JSON kinds a field can accept at all, used to pick the member a union error is about."""
    if isinstance(field, Ref):
        return field_kinds(field.target)
    if isinstance(field, _Strict):
        return field.accepts
    if isinstance(field, ListOf):
        return ("array",)
    if isinstance(field, Obj | MapOf | Tagged):
        return ("object",)
    if isinstance(field, Union):
        return tuple(k for m in field.members for k in field_kinds(m))
    if isinstance(field, Binary):
        return ("file",)
    return ("any",)


def _documented_kinds(field: fields.Field) -> tuple[str, ...]:
    if isinstance(field, Ref):
        return _documented_kinds(field.target)
    if isinstance(field, _Strict):
        return field.kinds or field.accepts
    if isinstance(field, Union):
        return tuple(k for m in field.members for k in _documented_kinds(m))
    return field_kinds(field)


class Union(fields.Field):
    """`oneOf`/`anyOf` without a usable tag: members are tried in order; the closest miss is reported.

    A member is a candidate when it accepts the value's JSON kind; among failing candidates the one
    whose error lies deepest inside the value is the one the client most likely meant.
    """

    default_error_messages = _common_messages()

    def __init__(self, members: list[fields.Field], **kwargs):
        super().__init__(**kwargs)
        self.members = members

    def _deserialize(self, value, attr, data, **kwargs):
        kind = kind_of(value)
        candidates = [
            m for m in self.members if kind in field_kinds(m) or "any" in field_kinds(m)
            or (kind == "integer" and "number" in field_kinds(m))
        ]
        if not candidates:
            raise type_error([k for m in self.members for k in _documented_kinds(m)], value)
        best: ValidationError | None = None
        for member in candidates:
            try:
                return member.deserialize(value)
            except ValidationError as err:
                if best is None or _error_depth(err.messages) > _error_depth(best.messages):
                    best = err
        assert best is not None
        raise best


class Tagged(fields.Field):
    """A discriminated union: the member is chosen by the value of one property (`role`, `type`)."""

    default_error_messages = _common_messages()

    def __init__(self, tag: str, members: dict[str, fields.Field], **kwargs):
        super().__init__(**kwargs)
        self.tag = tag
        self.members = members

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, Mapping):
            raise type_error(["object"], value)
        if self.tag not in value:
            raise ValidationError({self.tag: [Message(f"Missing required parameter: {PARAM}.", MISSING)]})
        tag_value = value[self.tag]
        member = self.members.get(tag_value) if isinstance(tag_value, str) else None
        if member is None:
            supported = ", ".join(repr(v) for v in self.members)
            raise ValidationError(
                {self.tag: [Message(f"Invalid value for {PARAM}: {tag_value!r}. Supported values are: {supported}.")]}
            )
        return member.deserialize(value)


class OneOf(validate.OneOf):
    def __init__(self, choices):
        error = Message(f"Invalid value for {PARAM}: {{input!r}}. Supported values are: {{choices}}.")
        super().__init__(choices, error=error)

    def _format_error(self, value) -> str:
        return self.error.format(input=value, choices=", ".join(repr(c) for c in self.choices))


class Range(validate.Range):
    def __init__(self, min=None, max=None, *, min_inclusive=True, max_inclusive=True):
        super().__init__(min, max, min_inclusive=min_inclusive, max_inclusive=max_inclusive)

    def _format_error(self, value, message: str) -> str:
        bounds = []
        if self.min is not None:
            bounds.append(f"{'>=' if self.min_inclusive else '>'} {self.min}")
        if self.max is not None:
            bounds.append(f"{'<=' if self.max_inclusive else '<'} {self.max}")
        return Message(f"Invalid value for {PARAM}: {value!r} is out of range; it must be {' and '.join(bounds)}.")


class Length(validate.Length):
    def _format_error(self, value, message: str) -> str:
        unit = "items" if isinstance(value, list) else "characters"
        bounds = []
        if self.min is not None:
            bounds.append(f"at least {self.min}")
        if self.max is not None:
            bounds.append(f"at most {self.max}")
        return Message(f"Invalid value for {PARAM}: expected {' and '.join(bounds)} {unit}, got {len(value)}.")


class Pattern(validate.Regexp):
    def __init__(self, regex: str):
        error = Message(f"Invalid value for {PARAM}: {{input!r}} does not match the pattern {{regex}}.")
        super().__init__(regex, error=error)


class LocalqSchema(Schema):
    """Base of every generated object schema."""

    class Meta:
        unknown = RAISE

    error_messages = {"unknown": Message(f"Unrecognized request argument supplied: {PARAM}", UNKNOWN)}

    # `anyOf: [{required: [a]}, {required: [b]}]` and `not: {required: [a, b]}` beside properties:
    # which groups of names must be present (any one group), and which may not all be present.
    required_any_of: tuple[tuple[str, ...], ...] = ()
    forbidden_together: tuple[str, ...] = ()

    @validates_schema
    def _check_presence_rules(self, data, **kwargs):
        if self.required_any_of and not any(all(n in data for n in group) for group in self.required_any_of):
            options = " or ".join("'" + "' and '".join(group) + "'" for group in self.required_any_of)
            raise ValidationError(Message(f"Invalid value for {PARAM}: provide {options}."))
        if self.forbidden_together and all(n in data for n in self.forbidden_together):
            names = "', '".join(self.forbidden_together)
            raise ValidationError(Message(f"Invalid value for {PARAM}: '{names}' cannot be given together."))


_RESERVED = set(dir(LocalqSchema)) | {"Meta"}

UNKNOWN_MODES = {"raise": RAISE, "include": INCLUDE, "exclude": EXCLUDE}


def object_schema(
    name: str,
    properties: dict[str, fields.Field],
    *,
    unknown: str = "raise",
    required_any_of: tuple = (),
    forbidden_together: tuple = (),
) -> type[Schema]:
    """Build (and register) a schema class whose fields are keyed by their wire names.

    Wire names that are not usable as class attributes (`x-localai-extensions`, `type` is fine,
    `load` is not) get a safe attribute name; `data_key` and `attribute` keep the wire name on both
    sides, so loaded dicts always use the names the client sent.
    """
    attrs: dict[str, Any] = {}
    for wire_name, field in properties.items():
        attr = wire_name
        if not wire_name.isidentifier() or keyword.iskeyword(wire_name) or wire_name in _RESERVED or wire_name.startswith("_"):
            attr = "p_" + "".join(c if c.isalnum() else "_" for c in wire_name)
            while attr in attrs or attr in _RESERVED:
                attr += "_"
            field.data_key = wire_name
            field.attribute = wire_name
        attrs[attr] = field
    meta = type("Meta", (), {"unknown": UNKNOWN_MODES[unknown], "register": False})
    rules = {"required_any_of": required_any_of, "forbidden_together": forbidden_together}
    cls = type(name, (LocalqSchema,), {**attrs, **rules, "Meta": meta})
    REGISTRY[name] = cls
    return cls


def define_type(name: str, factory: Callable[[], fields.Field]) -> None:
    """Register the factory of a non-object component (a union, an enum) under its component name."""
    TYPES[name] = factory


def nested(name: str, **kwargs) -> Obj:
    return Obj(lambda: REGISTRY[name](), **kwargs)
