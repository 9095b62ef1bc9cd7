"""One model config file (LocalAI's YAML format plus our `device` and `aliases`).

Validation happens here, at start-up, so a typo in a config stops the process
with a message naming the file and the field instead of failing a request later.
"""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from marshmallow import INCLUDE, Schema, ValidationError, fields, post_load, validate, validates_schema


class ModelConfigError(ValueError):
    """A model config file is unreadable or invalid; the message starts with its path."""


#: `parameters.model: package://<distribution>/<path inside it>` names a file shipped in an
#: installed Python distribution; it is located with importlib.metadata, never imported.
PACKAGE_SCHEME = "package://"

#: A text model's context size (tokens) when its config sets none.
DEFAULT_CONTEXT_SIZE = 2048
#: Sequences a text-generation model runs at once when its config sets no `parallel`: on a CPU
#: four already use most of what batching gains (the cores are the limit); a GPU keeps gaining
#: well past that. Each sequence has its own `context_size` of KV cache.
DEFAULT_PARALLEL = {"cpu": 4, "gpu": 8}
#: `tool_format` values: automatic, constrained by a grammar, or a native format of workers/tools/formats
TOOL_FORMATS = ("auto", "constrained", "hermes", "llama3", "mistral", "json")
MAX_PARALLEL = 256


class StrictFloat(fields.Float):
    """YAML already types numbers, so a quoted "0.7" or a `true` is a mistake to report."""

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, (bool, str)):
            raise self.make_error("invalid")
        return super()._deserialize(value, attr, data, **kwargs)


def _integer(**kwargs) -> fields.Integer:
    return fields.Integer(strict=True, **kwargs)


class ParametersSchema(Schema):
    """Default sampling parameters; open-ended, but the well-known keys are type-checked."""

    class Meta:
        unknown = INCLUDE

    model = fields.String(validate=[validate.Length(min=1), lambda ref: _check_model_ref(ref)])
    temperature = StrictFloat()
    top_p = StrictFloat()
    min_p = StrictFloat()
    typical_p = StrictFloat()
    repeat_penalty = StrictFloat()
    frequency_penalty = StrictFloat()
    presence_penalty = StrictFloat()
    top_k = _integer()
    max_tokens = _integer(validate=validate.Range(min=1))
    seed = _integer()
    repeat_last_n = _integer()


def _no_or_two_markers(markers: list) -> None:
    if len(markers) not in (0, 2):
        raise ValidationError("two markers (where thinking starts, where it ends), or none")


class ModelConfigSchema(Schema):
    """The whole file; unknown top-level keys are rejected (marshmallow's default)."""

    name = fields.String(required=True, validate=validate.Length(min=1))
    backend = fields.String(validate=validate.Length(min=1))
    description = fields.String()
    parameters = fields.Nested(ParametersSchema, load_default=dict)
    context_size = _integer(validate=validate.Range(min=1))
    threads = _integer(validate=validate.Range(min=1))
    # text generation: sequences decoded together by the batching engine (default DEFAULT_PARALLEL)
    parallel = _integer(validate=validate.Range(min=1, max=MAX_PARALLEL))
    # load the model when a worker serving it starts, so that its first request does not wait
    preload = fields.Boolean(load_default=False)
    gpu_layers = _integer()
    f16 = fields.Boolean()
    mmap = fields.Boolean()
    embeddings = fields.Boolean(load_default=False)
    embedding_dimensions = _integer(validate=validate.Range(min=1))
    stopwords = fields.List(fields.String(), load_default=list)
    # tool calls: "auto" (the template's own format where it has one, else constrained), "constrained"
    # (a grammar from the tools' schemas, any model), or a native format (workers/tools/formats)
    tool_format = fields.String(validate=validate.OneOf(TOOL_FORMATS), load_default="auto")
    # reasoning models: the markers around their thinking, e.g. ["<think>", "</think>"] (default:
    # those, when the chat template writes them; [] for none)
    reasoning_markers = fields.List(fields.String(validate=validate.Length(min=1)), validate=_no_or_two_markers)
    # chat models that read images: their vision projector (LocalAI's key; a path or package:// reference)
    mmproj = fields.String(validate=validate.Length(min=1))
    template = fields.Dict(keys=fields.String(), load_default=dict)
    known_usecases = fields.List(fields.String(), load_default=list)
    device = fields.String(validate=validate.OneOf(["cpu", "gpu"]), load_default="cpu")
    aliases = fields.List(fields.String(validate=validate.Length(min=1)), load_default=list)
    # placement: pin to these GPU indexes (device gpu only), or to a named pool of workers
    # (`localq worker --pool NAME`); see tasks/routing.py for the queue each choice means
    gpus = fields.List(_integer(validate=validate.Range(min=0)), validate=validate.Length(min=1))
    pool = fields.String(validate=validate.Regexp(r"^[A-Za-z0-9_-]{1,64}$",
                                                  error="a pool name is 1-64 letters, digits, '_' or '-'"))
    # image models, in LocalAI's shape: `diffusers: {pipeline_type, scheduler_type, cuda,
    # enable_parameters, img2img, clip_skip}`, default steps and guidance scale
    diffusers = fields.Dict(keys=fields.String(), load_default=dict)
    step = _integer(validate=validate.Range(min=1))
    cfg_scale = fields.Float(validate=validate.Range(min=0))
    # speech models: voice name clients send -> voice model (path or package:// reference)
    voices = fields.Dict(keys=fields.String(), values=fields.String(), load_default=dict)

    @validates_schema
    def _placement(self, data: dict[str, Any], **_) -> None:
        if data.get("gpus") and data.get("device", "cpu") != "gpu":
            raise ValidationError("GPU indexes need device: gpu", "gpus")
        if data.get("gpus") and data.get("pool"):
            raise ValidationError("pin a model to GPU indexes or to a pool, not both", "pool")

    @post_load
    def _freeze_lists(self, data: dict[str, Any], **_) -> dict[str, Any]:
        for key in ("stopwords", "known_usecases", "aliases"):
            data[key] = tuple(data[key])
        if "reasoning_markers" in data:
            data["reasoning_markers"] = tuple(data["reasoning_markers"])
        if "gpus" in data:
            data["gpus"] = tuple(sorted(set(data["gpus"])))
        return data


@dataclass(frozen=True)
class ModelConfig:
    """A validated model config, plus where it came from."""

    name: str
    source: Path
    created: int
    model_file: Path | None
    backend: str | None = None
    description: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    context_size: int | None = None
    threads: int | None = None
    parallel: int | None = None
    preload: bool = False
    gpu_layers: int | None = None
    f16: bool | None = None
    mmap: bool | None = None
    embeddings: bool = False
    stopwords: tuple[str, ...] = ()
    tool_format: str = "auto"
    reasoning_markers: tuple[str, ...] | None = None  # None: as the chat template shows
    template: dict[str, Any] = field(default_factory=dict)
    mmproj_file: Path | None = None  # a vision projector (`mmproj`), resolved like `parameters.model`
    mmproj_ref: str | None = None
    known_usecases: tuple[str, ...] = ()
    device: str = "cpu"
    aliases: tuple[str, ...] = ()
    gpus: tuple[int, ...] = ()
    pool: str | None = None
    embedding_dimensions: int | None = None
    model_ref: str | None = None
    diffusers: dict[str, Any] = field(default_factory=dict)
    step: int | None = None
    cfg_scale: float | None = None
    voices: dict[str, str] = field(default_factory=dict)

    @property
    def context_tokens(self) -> int:
        """The context size a text model runs with: prompts must be shorter than this."""
        return self.context_size or DEFAULT_CONTEXT_SIZE

    @property
    def default_parallel(self) -> int:
        """`parallel`, or the device's default (`DEFAULT_PARALLEL`)."""
        return self.parallel or DEFAULT_PARALLEL[self.device]

    @property
    def names(self) -> tuple[str, ...]:
        """Every id clients may use for this model: its name, then its aliases."""
        return (self.name, *self.aliases)

    def locate_mmproj(self) -> Path:
        """The vision projector file; ModelConfigError naming this config if it is missing."""
        if self.mmproj_file is None or not self.mmproj_file.is_file():
            raise ModelConfigError(f"{self.source}: mmproj: {self.mmproj_ref!r} is not a file (model {self.name!r})")
        return self.mmproj_file

    def locate_model(self) -> Path:
        """The model file (or folder) to load; ModelConfigError naming this config if it is missing."""
        prefix = f"{self.source}: parameters.model"
        if self.model_ref is None and self.model_file is None:
            raise ModelConfigError(f"{prefix}: not set, so model {self.name!r} has nothing to load")
        if self.model_file is None:
            distribution = _split_package_ref(self.model_ref)[0]
            raise ModelConfigError(
                f"{prefix}: {self.model_ref!r} names the Python distribution {distribution!r}, "
                "which is not installed"
            )
        if not self.model_file.exists():
            raise ModelConfigError(
                f"{prefix}: {self.model_file} does not exist (model {self.name!r})"
            )
        return self.model_file


def load_model_config(path: Path, models_dir: Path) -> ModelConfig:
    """Read and validate one file; `parameters.model` resolves against `models_dir`."""
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelConfigError(f"{path}: cannot read file: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ModelConfigError(f"{path}: invalid YAML: {_describe_yaml_error(exc)}") from exc
    if not isinstance(document, dict):
        raise ModelConfigError(f"{path}: expected a mapping of config fields at the top level")
    try:
        values = ModelConfigSchema().load(document)
    except ValidationError as exc:
        raise ModelConfigError(f"{path}: {format_errors(exc.messages)}") from exc
    model = values["parameters"].get("model")
    projector = values.pop("mmproj", None)
    return ModelConfig(
        **values,
        mmproj_file=resolve_model_ref(projector, models_dir) if projector else None,
        mmproj_ref=projector,
        source=path,
        created=int(os.stat(path).st_mtime),
        model_file=resolve_model_ref(model, models_dir) if model else None,
        model_ref=model,
    )


def resolve_model_ref(ref: str, models_dir: Path) -> Path | None:
    """Where `parameters.model` points: a path inside an installed distribution for
    `package://dist/path`, else `ref` relative to `models_dir` (an absolute path stays as is).

    None when the distribution is not installed; whether the path exists is checked only when
    the model is loaded (`ModelConfig.locate_model`), so configs for absent models still list.
    """
    if not ref.startswith(PACKAGE_SCHEME):
        return models_dir / ref
    distribution, inner = _split_package_ref(ref)
    try:
        located = importlib.metadata.distribution(distribution).locate_file(inner)
    except importlib.metadata.PackageNotFoundError:
        return None
    return Path(os.fspath(located))


def _split_package_ref(ref: str) -> tuple[str, str]:
    distribution, _, inner = ref[len(PACKAGE_SCHEME) :].partition("/")
    return distribution, inner


def _check_model_ref(ref: str) -> bool:
    if ref.startswith(PACKAGE_SCHEME):
        distribution, inner = _split_package_ref(ref)
        if not distribution or not inner.strip("/"):
            raise ValidationError(
                "expected package://<distribution>/<path inside the distribution>"
            )
    return True


def format_errors(messages: dict | list, prefix: str = "") -> str:
    """Flatten marshmallow's nested messages into `field.sub: message` parts."""
    if isinstance(messages, list):
        return f"{prefix}: {' '.join(map(str, messages))}"
    return "; ".join(
        format_errors(inner, f"{prefix}.{key}" if prefix else str(key))
        for key, inner in messages.items()
    )


def _describe_yaml_error(exc: yaml.YAMLError) -> str:
    """`line L, column C: problem` when PyYAML knows where, else its own text."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if mark is None or problem is None:
        return " ".join(str(exc).split())
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
