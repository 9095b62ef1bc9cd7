"""Model configs: good files load, every kind of bad file names its path and field."""

from __future__ import annotations

import pytest

from api.settings import DEFAULT_MODELS_DIR
from workers.config import ModelConfigError
from workers.registry import ModelRegistry

CHAT = {
    "name": "chat",
    "backend": "llama-cpp",
    "aliases": ["gpt-4o-mini"],
    "context_size": 2048,
    "stopwords": ["</s>"],
    "parameters": {"model": "chat.gguf", "temperature": 0.2, "top_k": 40, "mirostat": 2},
}


def test_loads_full_config(models_dir, write_model):
    path = write_model("chat.yaml", CHAT)
    (config,) = ModelRegistry.load(models_dir).list()
    assert config.name == "chat"
    assert config.backend == "llama-cpp"
    assert config.context_size == 2048
    assert config.stopwords == ("</s>",)
    assert config.parameters["mirostat"] == 2  # unknown parameters pass through
    assert config.device == "cpu"
    assert config.model_file == models_dir / "chat.gguf"
    assert config.source == path
    assert config.created == int(path.stat().st_mtime)


def test_placement_fields(models_dir, write_model):
    write_model("a.yaml", {"name": "pinned", "device": "gpu", "gpus": [1, 0, 1]})
    write_model("b.yaml", {"name": "pooled", "pool": "slow"})
    registry = ModelRegistry.load(models_dir)
    assert registry.resolve("pinned").gpus == (0, 1) and registry.resolve("pinned").pool is None
    assert registry.resolve("pooled").gpus == () and registry.resolve("pooled").pool == "slow"


def test_absolute_model_path_is_kept(models_dir, write_model, tmp_path):
    write_model("chat.yaml", {"name": "chat", "parameters": {"model": str(tmp_path / "x.gguf")}})
    assert ModelRegistry.load(models_dir).resolve("chat").model_file == tmp_path / "x.gguf"


def test_resolves_name_and_alias(models_dir, write_model):
    write_model("chat.yaml", CHAT)
    registry = ModelRegistry.load(models_dir)
    assert registry.resolve("chat").name == "chat"
    assert registry.resolve("gpt-4o-mini").name == "chat"
    assert registry.resolve("gpt-4") is None


def test_reads_yaml_and_yml_sorted_ignoring_other_files(models_dir, write_model):
    write_model("b.yml", {"name": "b"})
    write_model("a.yaml", {"name": "a"})
    write_model("notes.txt", "not a config")
    assert [c.name for c in ModelRegistry.load(models_dir).list()] == ["a", "b"]


def test_default_configs_load():
    registry = ModelRegistry.load(DEFAULT_MODELS_DIR)
    assert registry.resolve("gpt-4o-mini").backend == "llama-cpp"
    assert registry.resolve("gpt-3.5-turbo").context_size == 2048
    embeddings = registry.resolve("text-embedding-3-small")
    assert embeddings.backend == "sentence-transformers"
    assert embeddings.embeddings is True
    assert registry.resolve("text-embedding-ada-002") is embeddings


@pytest.mark.parametrize(
    ("content", "field"),
    [
        ({"name": "chat", "context_size": "big"}, "context_size: Not a valid integer."),
        ({"name": "chat", "context_size": True}, "context_size: Not a valid integer."),
        ({"name": "chat", "f16": "maybe"}, "f16: Not a valid boolean."),
        ({"name": "chat", "parameters": {"temperature": "hot"}}, "parameters.temperature"),
        ({"name": "chat", "parameters": {"top_k": 1.5}}, "parameters.top_k"),
        ({"name": "chat", "parameters": "chat.gguf"}, "parameters"),
        ({"name": "chat", "stopwords": ["ok", 3]}, "stopwords.1"),
        ({"name": "chat", "device": "tpu"}, "device"),
        ({"name": "chat", "parallel": 0}, "parallel: Must be greater than or equal to 1"),
        ({"name": "chat", "parallel": "4"}, "parallel: Not a valid integer."),
        ({"name": "chat", "preload": "yes please"}, "preload: Not a valid boolean."),
        ({"name": "chat", "aliases": "gpt-4o"}, "aliases"),
        ({"name": "chat", "gpu_layer": 10}, "gpu_layer: Unknown field."),
        ({"name": "chat", "gpus": [0]}, "gpus: GPU indexes need device: gpu"),
        ({"name": "chat", "device": "gpu", "gpus": [-1]}, "gpus.0"),
        ({"name": "chat", "device": "gpu", "gpus": []}, "gpus"),
        ({"name": "chat", "device": "gpu", "gpus": [0], "pool": "big"}, "pool: pin a model to GPU indexes or to a pool"),
        ({"name": "chat", "pool": "no spaces"}, "pool: a pool name is"),
        ({"backend": "llama-cpp"}, "name: Missing data for required field."),
        ({"name": ""}, "name"),
    ],
)
def test_invalid_config_names_file_and_field(models_dir, write_model, content, field):
    path = write_model("chat.yaml", content)
    with pytest.raises(ModelConfigError) as error:
        ModelRegistry.load(models_dir)
    assert str(error.value).startswith(f"{path}: ")
    assert field in str(error.value)


def test_yaml_syntax_error_names_file_and_line(models_dir, write_model):
    path = write_model("chat.yaml", "name: chat\nparameters: [unclosed\n")
    with pytest.raises(ModelConfigError, match="invalid YAML: line 3") as error:
        ModelRegistry.load(models_dir)
    assert str(error.value).startswith(f"{path}: ")


@pytest.mark.parametrize("text", ["", "- name: chat\n", "just a string\n"])
def test_top_level_must_be_a_mapping(models_dir, write_model, text):
    path = write_model("chat.yaml", text)
    with pytest.raises(ModelConfigError, match="expected a mapping") as error:
        ModelRegistry.load(models_dir)
    assert str(error.value).startswith(f"{path}: ")


def test_duplicate_name_across_files(models_dir, write_model):
    first = write_model("a.yaml", {"name": "chat"})
    second = write_model("b.yaml", {"name": "chat"})
    with pytest.raises(ModelConfigError) as error:
        ModelRegistry.load(models_dir)
    assert str(error.value) == f"{second}: name: model name 'chat' is already used by {first}"


def test_alias_clashing_with_another_models_name(models_dir, write_model):
    write_model("a.yaml", {"name": "chat"})
    second = write_model("b.yaml", {"name": "other", "aliases": ["x", "chat"]})
    with pytest.raises(ModelConfigError, match=r"aliases\.1: model name 'chat'") as error:
        ModelRegistry.load(models_dir)
    assert str(error.value).startswith(f"{second}: ")


def test_alias_repeated_within_one_file(models_dir, write_model):
    path = write_model("a.yaml", {"name": "chat", "aliases": ["chat"]})
    with pytest.raises(ModelConfigError, match=r"aliases\.0") as error:
        ModelRegistry.load(models_dir)
    assert str(error.value).startswith(f"{path}: ")


def test_missing_models_dir(tmp_path):
    with pytest.raises(ModelConfigError, match="does not exist"):
        ModelRegistry.load(tmp_path / "nowhere")
