"""All configured models, looked up by name or alias."""

from __future__ import annotations

from pathlib import Path

from workers.config import ModelConfig, ModelConfigError, load_model_config

CONFIG_SUFFIXES = (".yaml", ".yml")


class ModelRegistry:
    """The model configs of one models dir; every name and alias is unique."""

    def __init__(self, configs: list[ModelConfig]):
        self._configs = list(configs)
        self._by_name: dict[str, ModelConfig] = {}
        for config in self._configs:
            for field, name in _names_with_field(config):
                other = self._by_name.get(name)
                if other is not None:
                    raise ModelConfigError(
                        f"{config.source}: {field}: model name {name!r} is already "
                        f"used by {other.source}"
                    )
                self._by_name[name] = config

    @classmethod
    def load(cls, models_dir: Path | str) -> ModelRegistry:
        """Read every `*.yaml`/`*.yml` in `models_dir`, in name order."""
        models_dir = Path(models_dir)
        if not models_dir.is_dir():
            raise ModelConfigError(f"{models_dir}: models directory does not exist")
        paths = sorted(p for p in models_dir.iterdir() if p.suffix in CONFIG_SUFFIXES)
        return cls([load_model_config(path, models_dir) for path in paths])

    def list(self) -> list[ModelConfig]:
        """The configs in load order."""
        return list(self._configs)

    def resolve(self, name: str) -> ModelConfig | None:
        """The config whose name or alias is `name`, or None."""
        return self._by_name.get(name)


def _names_with_field(config: ModelConfig):
    """(field, name) pairs, so a clash can say which field of the file caused it."""
    yield "name", config.name
    for index, alias in enumerate(config.aliases):
        yield f"aliases.{index}", alias
