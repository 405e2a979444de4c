"""Settings of the training-like commands (`pretrain`, `rasa`), one system for both: typed dataclasses filled from
a YAML file (a bundled recipe by name, or a path) and `key=value` overrides by OmegaConf structured configs, so
unknown keys and wrong types are errors that name the key and where it came from.

    load_settings(PretrainConfig, "demo", ["optim.total_steps=100"], bundled=CONFIG_DIR)  # franca-hf pretrain
    load_settings(RasaRunSettings, None, ["model=...", "steps=8"])  # franca-hf rasa

Below both trainers: it imports OmegaConf and `franca_hf.errors` only.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from .errors import UsageError

Settings = TypeVar("Settings")


def list_configs(bundled: Path) -> list[str]:
    """The names of the YAML recipes in the folder `bundled`."""
    return sorted(p.stem for p in bundled.glob("*.yaml"))


def resolve_config_path(name_or_path: str | Path, bundled: Path | None = None) -> Path:
    """A YAML file path, or the name of a recipe in the folder `bundled` (see `list_configs`)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    if bundled is not None and (bundled / f"{name_or_path}.yaml").is_file():
        return bundled / f"{name_or_path}.yaml"
    choices = "a YAML file" + (f" or one of {list_configs(bundled)}" if bundled is not None else "")
    raise UsageError(f"No config {str(name_or_path)!r}: give {choices}.", setting="config")


def _explain(error: OmegaConfBaseException, source: str) -> UsageError:
    """OmegaConf's error as one line that names the key, what was wrong and where it came from."""
    key = getattr(error, "full_key", None) or getattr(error, "key", None)
    message = str(error).splitlines()[0].rstrip(".")
    if "is not a ListConfig" in message and key:  # a single value where the schema holds a list
        message = f"{key} takes a list, {key}=[a,b,...]; got {getattr(error, 'value', '?')}"
    elif isinstance(error, MissingMandatoryValue) and key:
        message = f"{key} must be set ({key}=...)"
    elif isinstance(error, ConfigKeyError) and key:
        parent = getattr(error, "parent_node", None)
        allowed = sorted(parent.keys()) if parent is not None else []
        message = f"unknown key {key}" + (f"; allowed here: {allowed}" if allowed else "")
    elif key:
        message = f"{key}: {message}"
    return UsageError(f"{source}: {message}.", setting=str(key) if key else None)


def load_settings(
    schema: type[Settings],
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    bundled: Path | None = None,
) -> Settings:
    """An instance of the dataclass `schema`: its defaults, then the YAML `config` (a path, or a recipe name in the
    folder `bundled`), then each `key=value` override, checked for keys and types, then `validate()` if the schema
    has one."""
    merged = OmegaConf.structured(schema)
    layers = []
    if config is not None:
        path = resolve_config_path(config, bundled)
        layers.append((OmegaConf.load(path), str(path)))
    for text in overrides:
        key = text.split("=", 1)[0]
        if "=" not in text or not key or key.startswith("-"):
            raise UsageError(f"Override {text!r} must look like key=value (e.g. optim.total_steps=100).")
        layers.append((OmegaConf.from_dotlist([text]), f"override {text!r}"))
    for values, source in layers:
        try:
            merged = OmegaConf.merge(merged, values)
        except OmegaConfBaseException as error:
            raise _explain(error, source) from None
    try:
        settings = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:  # a required value left unset
        raise _explain(error, "settings") from None
    if hasattr(settings, "validate"):
        settings.validate()
    return settings
